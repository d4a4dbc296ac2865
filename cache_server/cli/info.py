"""`kdcache info DIR [--json]`: what a cache holds and what it costs on disk.

Examples::

    kdcache info ./cache
    kdcache info ./cache --json | jq .stats.bytes_per_token
"""

from __future__ import annotations

import argparse
import json
import sys

from cache_server import format as fmt

__all__ = ["register", "run", "summarize"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="print a cache's manifest summary, sizes and teacher statistics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cache_dir", metavar="DIR", help="cache directory")
    parser.add_argument("--json", action="store_true", help="print the full manifest plus a summary as JSON")
    parser.set_defaults(func=run)


def summarize(manifest: dict) -> dict:
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


def run(args: argparse.Namespace) -> int:
    try:
        manifest = fmt.load_manifest(args.cache_dir)
    except fmt.CacheError as exc:
        print(f"kdcache info: {exc}", file=sys.stderr)
        return 2
    summary = summarize(manifest)
    if args.json:
        print(json.dumps({"summary": summary, "manifest": manifest}, indent=2, sort_keys=True))
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
        f"temperatures     {', '.join(f'{t:g}' for t in summary['temperatures'])}",
        f"shards           {summary['shards']} x {manifest['shard_seqs']} sequences "
        f"(inner chunks of {manifest['chunk_seqs']}), codec {manifest.get('codec')}",
    ]
    if summary["stored_bytes"] is not None:
        lines += [
            f"on disk          {summary['stored_bytes'] / 2**20:,.2f} MiB, {summary['bytes_per_token']:.1f} bytes/token",
            f"teacher tail     mean mass outside top-{summary['topk']}: {summary['mean_tail_mass']:.4f}",
            f"teacher entropy  {summary['mean_entropy']:.4f} nats/position; NLL {summary['mean_nll']:.4f} nats/token",
        ]
    print("\n".join(lines))
    return 0
