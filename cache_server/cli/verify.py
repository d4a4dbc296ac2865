"""`kdcache verify DIR`: check every shard against the manifest (size, sha256, decodability).

Exit status 0 when the cache is intact, 1 when any shard is damaged or missing (each one is named), 2 when
DIR is not a readable cache.

Examples::

    kdcache verify ./cache
    kdcache verify ./cache --quick   # sizes and checksums only, no decoding
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cache_server import format as fmt

__all__ = ["register", "run", "verify_cache"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check every shard against its checksum and the manifest's shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cache_dir", metavar="DIR", help="cache directory")
    parser.add_argument("--quick", action="store_true", help="skip decoding (sizes and sha256 only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def verify_cache(cache_dir: str | Path, decode: bool = True, progress: bool = False) -> list[str]:
    """Return one message per damaged or missing shard (empty when the cache is intact)."""
    manifest = fmt.load_manifest(cache_dir)
    layout = fmt.layout_from_manifest(manifest)
    specs = {spec.name: spec for spec in layout.arrays()}
    problems: list[str] = []
    for name, spec in specs.items():
        want_shape = list(spec.shape(layout.num_sequences))
        have = manifest["arrays"].get(name)
        if have is None or have.get("shape") != want_shape or have.get("dtype") != spec.dtype.name:
            problems.append(f"array {name!r}: manifest says {have}, layout implies shape {want_shape} {spec.dtype.name}")
        if len(manifest["shards"].get(name, [])) != layout.num_shards:
            problems.append(f"array {name!r}: manifest lists {len(manifest['shards'].get(name, []))} shards, "
                            f"expected {layout.num_shards}")
    items = list(fmt.iter_shard_files(cache_dir, manifest))
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="verifying", unit="shard")
    for name, index, path in iterator:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            problems.append(f"array {name!r} shard {index}: file {path} is missing")
            continue
        try:
            fmt.verify_shard_bytes(raw, manifest["shards"][name][index], name, index)
            if decode and name in specs:
                fmt.decode_shard(raw, specs[name], layout, index)
        except fmt.CorruptShardError as exc:
            problems.append(f"array {name!r} shard {index} ({path}): {str(exc).split(': ', 2)[-1].split('. Rebuild')[0]}")
    return problems


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        problems = verify_cache(args.cache_dir, decode=not args.quick, progress=not args.no_progress)
    except fmt.CacheError as exc:
        print(f"kdcache verify: {exc}", file=sys.stderr)
        return 2
    elapsed_s = time.perf_counter() - started
    if problems:
        print(f"kdcache verify: {args.cache_dir} is DAMAGED ({len(problems)} problem(s)):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    manifest = fmt.load_manifest(args.cache_dir)
    n_files = sum(len(v) for v in manifest["shards"].values())
    print(f"kdcache verify: {args.cache_dir} OK ({n_files} shard files checked in {elapsed_s:.2f}s)")
    return 0
