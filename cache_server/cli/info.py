"""``kdcache info DIR [--json]``: what a cache holds, what it costs on disk, and the command that built it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from typing import Any, Mapping

from cache_server import format as fmt
from cache_server.cli import add_command

__all__ = ["register", "run", "user_errors", "summarize", "build_command"]

DESCRIPTION = """\
Print a cache's contents (sequences, top-k, vocabulary, temperatures, shards), its size on disk, the
teacher's statistics, and the kdcache build command that made it. Rerunning that command resumes an
unfinished build and repairs damaged or missing shards.
"""

EPILOG = """\
examples:
  kdcache info ./cache
  kdcache info ./cache --json | jq .summary.bytes_per_token
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "info", help="print a cache's contents, size, teacher statistics and build command",
        description=DESCRIPTION, epilog=EPILOG, run=run, user_errors=user_errors,
    )
    parser.add_argument("cache_dir", metavar="DIR", help="cache directory")
    parser.add_argument("--json", action="store_true", help="print the full manifest plus a summary as JSON")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (besides CacheError, which the CLI always treats so)."""
    return ()


def summarize(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers people ask about first."""
    stats = manifest.get("stats", {})
    return {
        "sequences": manifest["num_sequences"],
        "seq_len": manifest["seq_len"],
        "tokens": manifest["num_sequences"] * manifest["seq_len"],
        "topk": manifest["topk"],
        "vocab_size": manifest["vocab_size"],
        "temperatures": [1.0, *manifest.get("temperatures", [])],
        "shards": manifest.get("num_shards"),
        "stored_bytes": stats.get("stored_bytes"),
        "bytes_per_token": stats.get("bytes_per_token"),
        "mean_tail_mass": stats.get("mean_tail_mass"),
        "mean_entropy": stats.get("mean_entropy"),
        "mean_nll": stats.get("mean_nll"),
    }


def _exact(value: float) -> str:
    """A float as short as ``:g`` writes it when that reads back exactly, else its ``repr`` (always exact)."""
    short = f"{float(value):g}"
    return short if float(short) == float(value) else repr(float(value))


def build_command(manifest: Mapping[str, Any], cache_dir: str) -> str | None:
    """The ``kdcache build`` command line that made this cache, or None when the manifest cannot tell.

    The command is reconstructed from what the manifest records: every setting a rerun is compared on
    (teacher, data, top-k, length, temperatures, dtypes, codec, sharding, sequences used) and what decides
    the data's token ids (``--data-dtype``, ``--text-documents``, the tokenizer), each with its exact value
    (temperatures written so that they read back as the same floats), so that rerunning it resumes or repairs
    this cache instead of being refused as "different settings". Paths are absolute (the build records
    them so, and ``--out`` is made absolute here), so the command runs from any directory.
    """
    teacher, dataset = manifest.get("teacher") or {}, manifest.get("dataset") or {}
    settings = manifest.get("build_args") or {}
    if not teacher.get("path") or not dataset.get("source"):
        return None  # not built by `kdcache build` (e.g. written directly through the writer)
    argv = ["kdcache", "build", "--teacher", str(teacher["path"])]
    if teacher.get("factory"):
        argv += ["--model-factory", str(teacher["factory"])]
    argv += ["--data", str(dataset["source"])]
    if dataset.get("data_dtype"):
        argv += ["--data-dtype", str(dataset["data_dtype"])]
    if dataset.get("text_documents"):
        argv += ["--text-documents", str(dataset["text_documents"])]
    tokenizer = manifest.get("tokenizer") or {}
    if tokenizer.get("path"):
        argv += ["--tokenizer", str(tokenizer["path"])]
    argv += ["--topk", str(manifest["topk"]), "--seq-len", str(manifest["seq_len"]),
             "--out", os.path.abspath(cache_dir)]
    if manifest.get("temperatures"):
        argv += ["--temperatures", ",".join(_exact(t) for t in manifest["temperatures"])]
    compute_dtype = settings.get("compute_dtype", teacher.get("dtype"))
    if compute_dtype is not None:
        argv += ["--dtype", str(compute_dtype)]
    argv += ["--logprob-dtype", str(manifest["arrays"]["topk_logprobs"]["dtype"]),
             "--codec", str(manifest.get("codec", fmt.DEFAULT_CODEC))]
    argv += ["--shard-seqs", str(manifest["shard_seqs"]), "--chunk-seqs", str(manifest["chunk_seqs"])]
    used, available = dataset.get("sequences_used"), dataset.get("sequences_available")
    if isinstance(used, int) and isinstance(available, int) and used < available:
        argv += ["--max-sequences", str(used)]
    return shlex.join(argv)


def _relative_paths(manifest: Mapping[str, Any]) -> list[str]:
    """Paths a manifest of an older kdcache records relative to the directory its build ran in."""
    recorded = [(manifest.get(key) or {}).get(field) for key, field in
                (("teacher", "path"), ("dataset", "source"), ("tokenizer", "path"))]
    return [path for path in recorded if isinstance(path, str) and not os.path.isabs(path)]


def _stats_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = []
    if summary["stored_bytes"] is not None and summary["bytes_per_token"] is not None:
        lines.append(f"on disk          {summary['stored_bytes'] / 2**20:,.2f} MiB, "
                     f"{summary['bytes_per_token']:.1f} bytes/token")
    if summary["mean_tail_mass"] is not None:
        lines.append(f"teacher tail     mean mass outside top-{summary['topk']}: {summary['mean_tail_mass']:.4f}")
    if summary["mean_entropy"] is not None and summary["mean_nll"] is not None:
        lines.append(f"teacher entropy  {summary['mean_entropy']:.4f} nats/position; "
                     f"NLL {summary['mean_nll']:.4f} nats/token")
    return lines


def _settings_text(settings: Mapping[str, Any]) -> str:
    parts = []
    for key in sorted(settings):
        value = settings[key]
        if key == "teacher" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k != "weights_sha256"}  # per-file hashes: see --json
        parts.append(f"{key}={json.dumps(value, sort_keys=True)}")
    return ", ".join(parts) or "(none recorded)"


def run(args: argparse.Namespace) -> int:
    """Print the summary (or, with --json, the summary, the build command and the whole manifest)."""
    manifest = fmt.load_manifest(args.cache_dir)
    summary = summarize(manifest)
    command = build_command(manifest, args.cache_dir)
    if args.json:
        print(json.dumps({"summary": summary, "build_command": command, "manifest": manifest},
                         indent=2, sort_keys=True))
        return 0
    teacher = manifest.get("teacher") or {}
    dataset = manifest.get("dataset") or {}
    arrays = manifest["arrays"]
    lines = [
        f"cache            {args.cache_dir}",
        f"format           {manifest['format']} v{manifest['format_version']} (tool {manifest.get('tool_version')})",
        f"created          {manifest.get('created_at')}",
        f"teacher          {teacher.get('name') or teacher.get('path')} ({teacher.get('architecture', '?')}, "
        f"{teacher.get('dtype', '?')})",
        f"dataset          {dataset.get('source', '?')} fingerprint {manifest.get('dataset_fingerprint')}",
        f"sequences        {summary['sequences']:,} x {summary['seq_len']} = {summary['tokens']:,} tokens",
        f"top-k            {summary['topk']} of vocab {summary['vocab_size']:,} "
        f"(ids {arrays['topk_ids']['dtype']}, logprobs {arrays['topk_logprobs']['dtype']})",
        f"temperatures     {', '.join(_exact(t) for t in summary['temperatures'])}",
        f"shards           {summary['shards']} x {manifest['shard_seqs']} sequences "
        f"(inner chunks of {manifest['chunk_seqs']}), codec {manifest.get('codec')}",
        *_stats_lines(summary),
        f"build settings   {_settings_text(manifest.get('build_args') or {})}",
        f"build command    {command or '(not recorded: the cache was not made by kdcache build)'}",
    ]
    relative = _relative_paths(manifest) if command else []
    if relative:
        lines.append(f"                 (run it from the directory the build ran in: {', '.join(relative)} "
                     "are recorded relative to it)")
    print("\n".join(lines))
    return 0
