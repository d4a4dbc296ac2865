"""Re-verifying a finished cache before a rerun of its build: which shards must be rebuilt.

Rerunning the same ``kdcache build`` command on a finished cache first rewrites damaged or missing Zarr
metadata files (``zarr.json``: a pure function of the layout, so they are made again, not rebuilt), then
checks every shard file (this rank's shards) against the manifest's size and sha256, with a progress bar.
Shards with a damaged or missing file are rebuilt (all arrays of the shard, see
``CacheWriter.begin_repair``); an intact cache is left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from cache_server import format as fmt
from cache_server.build.writer import atomic_write_bytes
from cache_server.format import storage

__all__ = ["find_damaged_shards", "repair_metadata"]


def repair_metadata(cache_dir: Path, layout: fmt.CacheLayout, log: Callable[[str], None]) -> list[str]:
    """Rewrite the Zarr metadata files of ``cache_dir`` that are not what ``layout`` implies; return their
    paths relative to the cache. The manifest (which does not record them) stays as it is.

    ``cache_dir`` may be an object-store URL: its metadata objects are compared and rewritten (one PUT each).
    """
    if storage.is_url(cache_dir):
        return _repair_object_metadata(storage.open_store(str(cache_dir)), layout, log)
    damaged = fmt.damaged_metadata(cache_dir, layout)
    if not damaged:
        return []
    expected = fmt.expected_metadata(layout)
    for relpath, problem in sorted(damaged.items()):
        log(f"{cache_dir}: Zarr metadata {relpath}: {problem}; rewriting it")
        path = Path(cache_dir) / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, expected[relpath])
    return sorted(damaged)


def find_damaged_shards(
    cache_dir: str | Path, manifest: Mapping[str, Any], shards: list[int], progress: bool = True
) -> dict[int, list[str]]:
    """Check the files of ``shards`` against ``manifest``; return {shard: [what is wrong, ...]} for bad ones.

    Args:
        cache_dir: the cache directory.
        manifest: its manifest (already validated by ``fmt.load_manifest``).
        shards: the shard indices to check (a rank checks its own).
        progress: show a tqdm bar over the bytes read.
    """
    from tqdm.auto import tqdm

    wanted = set(shards)
    if storage.is_url(cache_dir):
        return _find_damaged_objects(storage.open_store(str(cache_dir)), manifest, wanted)
    files = [(name, i, path) for name, i, path in fmt.iter_shard_files(cache_dir, manifest) if i in wanted]
    total = sum(int(manifest["shards"][name][i]["nbytes"]) for name, i, _ in files)
    damaged: dict[int, list[str]] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {len(files)} shard files",
              disable=not progress, dynamic_ncols=True) as bar:
        for name, i, path in files:
            expected = manifest["shards"][name][i]
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                damaged.setdefault(i, []).append(f"{name}: the file is missing")
                continue
            try:
                fmt.verify_shard_bytes(raw, expected, name, i, str(path), every_digest=True)
            except fmt.CorruptShardError as exc:
                damaged.setdefault(i, []).append(f"{name}: {exc.reason}")
            bar.update(len(raw))
    return damaged


def _repair_object_metadata(store: storage.ObjectStore, layout: fmt.CacheLayout,
                            log: Callable[[str], None]) -> list[str]:
    """:func:`repair_metadata` on an object store."""
    expected = fmt.expected_metadata(layout)
    found = store.read_many(sorted(expected))
    damaged = sorted(relpath for relpath, raw in expected.items() if found.get(relpath) != raw)
    for relpath in damaged:
        log(f"{store.description}: Zarr metadata {relpath}: missing or not what the layout implies; rewriting it")
        store.write_bytes(relpath, expected[relpath])
    return damaged


def _find_damaged_objects(store: storage.ObjectStore, manifest: Mapping[str, Any],
                          wanted: set[int]) -> dict[int, list[str]]:
    """:func:`find_damaged_shards` on an object store (each object read whole, one shard at a time)."""
    damaged: dict[int, list[str]] = {}
    for name, i, path in fmt.iter_shard_files("", manifest):
        if i not in wanted:
            continue
        relpath = path.as_posix()
        try:
            fmt.verify_shard_bytes(store.read_bytes(relpath), manifest["shards"][name][i], name, i,
                                   store.child_url(relpath), every_digest=True)
        except FileNotFoundError:
            damaged.setdefault(i, []).append(f"{name}: the object is missing")
        except fmt.CorruptShardError as exc:
            damaged.setdefault(i, []).append(f"{name}: {exc.reason}")
    return damaged
