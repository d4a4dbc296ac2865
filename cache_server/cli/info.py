"""``kdcache info DIR [--json]``: what a cache holds, what it costs on disk, and the command that built it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from typing import Any, Mapping

from cache_server import format as fmt
from cache_server.cli import add_command
from cache_server.format import storage

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
  kdcache info s3://bucket/caches/run1            # a cache on an object store (AWS_* credentials, profiles)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "info", help="print a cache's contents, size, teacher statistics and build command",
        description=DESCRIPTION, epilog=EPILOG, run=run, user_errors=user_errors,
    )
    parser.add_argument("cache_dir", metavar="DIR", help="cache directory, or an fsspec URL (s3://bucket/prefix)")
    parser.add_argument("--json", action="store_true", help="print the full manifest plus a summary as JSON")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help=f"fsspec options for a URL, as a JSON object (default ${storage.STORAGE_OPTIONS_ENV})")


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
        "targets": (manifest.get("targets") or {}).get("kind", "topk"),
        "topk": manifest["topk"],
        "samples": (manifest.get("targets") or {}).get("samples"),
        "sample_slots": (manifest.get("targets") or {}).get("slots"),
        "sample_temperature": (manifest.get("targets") or {}).get("sample_temperature"),
        "truncated_draws": stats.get("truncated_draws"),
        "mean_unique_per_position": stats.get("mean_unique_per_position"),
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
    teacher_argv = _teacher_args(manifest)
    if teacher_argv is None or not dataset.get("source"):
        return None  # not built by `kdcache build` (e.g. written directly through the writer, or merged)
    argv = ["kdcache", "build", *teacher_argv]
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
    argv += [*_target_args(manifest), "--seq-len", str(manifest["seq_len"]), "--out", storage.redact_url(cache_dir) if storage.is_url(cache_dir) else os.path.abspath(cache_dir)]
    temperatures = _build_temperatures(manifest)
    if temperatures:
        argv += ["--temperatures", ",".join(_exact(t) for t in temperatures)]
    compute_dtype = settings.get("compute_dtype", teacher.get("dtype"))
    if compute_dtype is not None:
        argv += ["--dtype", str(compute_dtype)]
    argv += ["--logprob-dtype", fmt.layout_from_manifest(manifest).logprob_dtype,
             "--codec", str(manifest.get("codec", fmt.DEFAULT_CODEC))]
    argv += ["--shard-seqs", str(manifest["shard_seqs"]), "--chunk-seqs", str(manifest["chunk_seqs"])]
    used, available = dataset.get("sequences_used"), dataset.get("sequences_available")
    if isinstance(used, int) and isinstance(available, int) and used < available:
        argv += ["--max-sequences", str(used)]
    return shlex.join(argv)


def _teacher_args(manifest: Mapping[str, Any]) -> list[str] | None:
    """``--teacher`` (once per teacher of a mixture, with ``--teacher-weights``), or None when not recorded."""
    teachers = manifest.get("teachers")
    if teachers:
        if not all(t.get("path") for t in teachers):
            return None
        argv = [arg for t in teachers for arg in ("--teacher", str(t["path"]))]
        return argv + ["--teacher-weights", ",".join(repr(float(t["weight"])) for t in teachers)]
    teacher = manifest.get("teacher") or {}
    return ["--teacher", str(teacher["path"])] if teacher.get("path") else None


def _target_args(manifest: Mapping[str, Any]) -> list[str]:
    """--targets / --topk / --samples ... of the build command (just --topk K for a top-k cache)."""
    targets = manifest.get("targets") or {"kind": "topk"}
    kind = targets["kind"]
    argv = [] if kind == "topk" else ["--targets", kind]
    if kind != "sample":
        argv += ["--topk", str(manifest["topk"])]
    if kind == "topk":
        return argv
    argv += ["--samples", str(targets["samples"])]
    if targets["slots"] != targets["samples"]:
        argv += ["--sample-slots", str(targets["slots"])]
    if float(targets["sample_temperature"]) != 1.0:
        argv += ["--sample-temperature", _exact(targets["sample_temperature"])]
    if "sample_logprobs" not in manifest["arrays"]:
        argv.append("--no-sample-logprobs")
    return argv


def _build_temperatures(manifest: Mapping[str, Any]) -> list[float]:
    """The --temperatures a build was given: the stored ones, less the sampling temperature the build added
    (unless the build recorded that it was asked for it too, which it cannot tell: passing it again is a
    no-op, so leaving it out gives the same cache)."""
    tau_s = (manifest.get("targets") or {}).get("sample_temperature")
    return [t for t in manifest.get("temperatures", []) if tau_s is None or float(t) != float(tau_s)]


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


def _targets_lines(summary: Mapping[str, Any], arrays: Mapping[str, Any]) -> list[str]:
    """What each position holds: the top-k, the samples, or both (hybrid)."""
    lines = []
    if "topk_ids" in arrays:
        head = " (the exact head of a hybrid cache)" if summary["targets"] == "hybrid" else ""
        lines.append(f"top-k            {summary['topk']} of vocab {summary['vocab_size']:,}{head} "
                     f"(ids {arrays['topk_ids']['dtype']}, logprobs {arrays['topk_logprobs']['dtype']})")
    if "sample_ids" in arrays:
        rest = " from the vocabulary outside the head" if summary["targets"] == "hybrid" else ""
        logprobs = arrays.get("sample_logprobs", {}).get("dtype", "not stored")
        unique = summary["mean_unique_per_position"]
        lines.append(f"samples          {summary['targets']}: {summary['samples']} draws per position{rest} at "
                     f"temperature {_exact(summary['sample_temperature'])}, {summary['sample_slots']} slots "
                     f"(ids {arrays['sample_ids']['dtype']}, counts {arrays['sample_counts']['dtype']}, "
                     f"logprobs {logprobs})" + (f"; {unique:.2f} distinct ids per position" if unique else ""))
        if summary["truncated_draws"]:
            lines.append(f"                 {summary['truncated_draws']:,} draws dropped beyond the slots (those "
                         "positions are biased; rebuild with a larger --sample-slots)")
    return lines


def _provenance_lines(manifest: Mapping[str, Any]) -> list[str]:
    """Where an imported cache's targets came from and what that source lacks (none for a kdcache build)."""
    provenance = manifest.get("provenance")
    if not provenance:
        return []
    return [f"imported from    {provenance.get('imported_from')}, teacher tail {fmt.teacher_tail(manifest)}"
            + (f": {provenance['lacks']}" if provenance.get("lacks") else "")]


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
    storage.use_storage_options(args.storage_options)
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
        f"cache            {storage.redact_url(args.cache_dir) if storage.is_url(args.cache_dir) else args.cache_dir}",
        f"format           {manifest['format']} v{manifest['format_version']} (tool {manifest.get('tool_version')})",
        f"created          {manifest.get('created_at')}",
        f"teacher          {teacher.get('name') or teacher.get('path')} ({teacher.get('architecture', '?')}, "
        f"{teacher.get('dtype', '?')})",
        f"dataset          {dataset.get('source', '?')} fingerprint {manifest.get('dataset_fingerprint')}",
        f"sequences        {summary['sequences']:,} x {summary['seq_len']} = {summary['tokens']:,} tokens",
        *_targets_lines(summary, arrays),
        f"temperatures     {', '.join(_exact(t) for t in summary['temperatures'])}",
        f"shards           {summary['shards']} x {manifest['shard_seqs']} sequences "
        f"(inner chunks of {manifest['chunk_seqs']}), codec {manifest.get('codec')}",
        *_stats_lines(summary),
        *_provenance_lines(manifest),
        f"build settings   {_settings_text(manifest.get('build_args') or {})}",
        f"build command    {command or '(not recorded: the cache was not made by kdcache build)'}",
    ]
    relative = _relative_paths(manifest) if command else []
    if relative:
        lines.append(f"                 (run it from the directory the build ran in: {', '.join(relative)} "
                     "are recorded relative to it)")
    print("\n".join(lines))
    return 0
