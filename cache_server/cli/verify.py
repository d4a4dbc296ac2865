"""``kdcache verify DIR``: check every stored shard against the manifest, and optionally every decoded copy."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cache_server import format as fmt
from cache_server.cli import add_command
from cache_server.format import storage

__all__ = ["register", "run", "user_errors", "verify_cache", "verify_decoded", "VerifyInputError"]

EXIT_DAMAGED = 1

DESCRIPTION = """\
Check every stored shard of a cache against its manifest: size, sha256 and (unless --quick) that it
decodes; and that the Zarr metadata files (zarr.json) are the ones the cache's layout implies. With
--decoded, also check every decoded copy of the cache that readers have made under the decode directory
(the local uncompressed copies training reads from).

Exit status: 0 when everything checked is intact, 1 when a shard or decoded copy is damaged or missing
(each one is named), 2 when DIR is not a readable cache. To repair damaged or missing shards or metadata,
rerun the kdcache build command that made the cache (kdcache info DIR prints it); a damaged decoded copy is made
again from the stored shard the next time a reader needs it.
"""

EPILOG = """\
examples:
  kdcache verify ./cache
  kdcache verify ./cache --quick                  # sizes and checksums only, no decoding
  kdcache verify ./cache --decoded                # also the decoded copies under $KDCACHE_DECODE_DIR
  kdcache verify ./cache --decode-dir /scratch/kd # decoded copies under another decode directory
  kdcache verify s3://bucket/caches/run1          # every object of a cache on an object store
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "verify", help="check every shard (and with --decoded every decoded copy) against the manifest",
        description=DESCRIPTION, epilog=EPILOG, run=run, user_errors=user_errors,
    )
    parser.add_argument("cache_dir", metavar="DIR", help="cache directory, or an fsspec URL (s3://bucket/prefix)")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help=f"fsspec options for a URL, as a JSON object (default ${storage.STORAGE_OPTIONS_ENV})")
    parser.add_argument("--quick", action="store_true", help="skip decoding (sizes and sha256 only)")
    parser.add_argument("--decoded", action="store_true",
                        help="also check the decoded copies of this cache (default decode directory: "
                        "$KDCACHE_DECODE_DIR or ~/.cache/kdcache/decoded)")
    parser.add_argument("--decode-dir", type=Path, default=None, metavar="D",
                        help="decode directory whose copies to check (implies --decoded)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class VerifyInputError(ValueError):
    """An option of ``kdcache verify`` is unusable (e.g. --decode-dir names a file)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (besides CacheError, which the CLI always treats so)."""
    return (VerifyInputError,)


def verify_cache(cache_dir: str | Path, decode: bool = True, progress: bool = False) -> list[str]:
    """Check the Zarr metadata and every stored shard the manifest lists; return one message per damaged or
    missing file.

    Args:
        cache_dir: the cache directory.
        decode: also decode each shard, proving its bytes are a well-formed shard of the manifest's layout
            and not only the bytes the manifest recorded; False checks sizes and sha256 only.
        progress: show a progress bar.

    Returns:
        Problem messages, ``"array 'lse' shard 2 (PATH): <reason>"`` or ``"Zarr metadata lse/zarr.json (PATH):
        <reason>"``; empty when the cache is intact.

    Raises:
        CacheError: the directory is not a readable, finished cache (its manifest is checked in full).
    """
    manifest = fmt.load_manifest(cache_dir)
    layout = fmt.layout_from_manifest(manifest)
    specs = {spec.name: spec for spec in layout.arrays()}
    if storage.is_url(cache_dir):
        return _verify_objects(storage.open_store(str(cache_dir)), manifest, layout, decode, progress)
    # The Zarr metadata is made again from the layout and compared (Zarr readers need it; we do not).
    problems = [f"Zarr metadata {relpath} ({Path(cache_dir) / relpath}): {why}"
                for relpath, why in sorted(fmt.damaged_metadata(cache_dir, layout).items())]
    items = list(fmt.iter_shard_files(cache_dir, manifest))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="verifying", unit="shard")
    for name, index, path in items:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            problems.append(f"array {name!r} shard {index} ({path}): the shard file is missing")
            continue
        except OSError as exc:
            problems.append(f"array {name!r} shard {index} ({path}): cannot be read ({exc.strerror or exc})")
            continue
        try:
            fmt.verify_shard_bytes(raw, manifest["shards"][name][index], name, index, where=str(path),
                                   every_digest=True)
            if decode:
                fmt.decode_stored_shard(raw, specs[name], layout, index)
        except fmt.CorruptShardError as exc:
            problems.append(f"array {exc.array!r} shard {exc.shard_index} ({path}): {exc.reason}")
    return problems


def _verify_objects(store: storage.ObjectStore, manifest: dict, layout: fmt.CacheLayout, decode: bool,
                    progress: bool) -> list[str]:
    """:func:`verify_cache` for a cache on an object store: each object read whole and checked."""
    expected = fmt.expected_metadata(layout)
    found = store.read_many(sorted(expected))
    problems = [f"Zarr metadata {relpath} ({store.child_url(relpath)}): "
                f"{'the object is missing' if relpath not in found else 'differs from what the layout implies'}"
                for relpath, raw in sorted(expected.items()) if found.get(relpath) != raw]
    specs = {spec.name: spec for spec in layout.arrays()}
    items = list(fmt.iter_shard_files("", manifest))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="verifying", unit="object")
    for name, index, path in items:
        where = store.child_url(path.as_posix())
        try:
            raw = store.read_bytes(path.as_posix())
            fmt.verify_shard_bytes(raw, manifest["shards"][name][index], name, index, where=where, every_digest=True)
            if decode:
                fmt.decode_stored_shard(raw, specs[name], layout, index)
        except FileNotFoundError:
            problems.append(f"array {name!r} shard {index} ({where}): the shard object is missing")
        except fmt.CorruptShardError as exc:
            problems.append(f"array {exc.array!r} shard {exc.shard_index} ({where}): {exc.reason}")
    return problems


def verify_decoded(cache_dir: str | Path, decode_root: Path | None = None) -> tuple[Path, list[str]]:
    """The decode root checked, and one message per damaged decoded copy of the cache under it.

    Args:
        cache_dir: the cache directory.
        decode_root: the decode root readers used (default: theirs, ``$KDCACHE_DECODE_DIR`` or
            ``~/.cache/kdcache/decoded``). A root that does not exist holds no copies: nothing is damaged.

    Raises:
        VerifyInputError: ``decode_root`` exists but is not a directory.
    """
    from cache_server.format.decoded import default_decode_root, verify_decoded_copies

    root = Path(decode_root) if decode_root is not None else default_decode_root()
    if root.exists() and not root.is_dir():
        raise VerifyInputError(f"--decode-dir {str(root)!r} is a file, not a decode directory; pass the "
                               "directory readers decode into (their decode_dir, or $KDCACHE_DECODE_DIR)")
    if storage.is_url(cache_dir):
        raise VerifyInputError("--decoded checks the decoded copies of a local cache directory; for a cache on "
                               "an object store, pass its manifest's decode directory to a reader instead")
    return root, list(verify_decoded_copies(Path(cache_dir), root))


def run(args: argparse.Namespace) -> int:
    """Verify the cache; exit status 0 intact, 1 damaged (each problem named on stderr)."""
    started = time.perf_counter()
    storage.use_storage_options(args.storage_options)
    shown = storage.redact_url(args.cache_dir) if storage.is_url(args.cache_dir) else args.cache_dir
    manifest = fmt.load_manifest(args.cache_dir)
    problems = verify_cache(args.cache_dir, decode=not args.quick, progress=not args.no_progress)
    n_files = sum(len(entries) for entries in manifest["shards"].values())
    n_metadata = len(fmt.layout_from_manifest(manifest).arrays()) + 1
    check_decoded = args.decoded or args.decode_dir is not None
    decode_root, decoded_problems = verify_decoded(args.cache_dir, args.decode_dir) if check_decoded else (None, [])
    elapsed_s = time.perf_counter() - started
    if problems or decoded_problems:
        total = len(problems) + len(decoded_problems)
        print(f"kdcache verify: {shown} is DAMAGED ({total} problem(s)):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        for line in decoded_problems:
            print(f"  {line}", file=sys.stderr)
        if problems:
            print(f"  repair: {fmt.REPAIR_HINT}", file=sys.stderr)
        return EXIT_DAMAGED
    decoded_note = f", and every decoded copy under {decode_root}" if check_decoded else ""
    print(f"kdcache verify: {shown} OK ({n_files} shard files and {n_metadata} metadata files checked"
          f"{decoded_note} in {elapsed_s:.2f}s)")
    return 0
