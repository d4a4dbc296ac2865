"""Disk space of a build: how much a cache needs, how much its filesystem has, and the error when it runs out.

Estimate of a cache's stored size:

* before any shard exists: the uncompressed size of every shard file (inner chunks are stored full-size,
  plus each shard's index). Compression usually stores less, so this is an upper bound;
* once shards are written: their bytes per sequence so far, times the sequences of the whole cache.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from cache_server import format as fmt
from cache_server.format import storage

__all__ = [
    "OutOfSpaceError",
    "is_out_of_space",
    "free_bytes",
    "human_bytes",
    "estimate_cache_bytes",
    "check_free_space",
    "out_of_space_error",
]

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_METADATA_BYTES = 64 << 10  # zarr.json files, the manifest and the build journal (a few KiB each)


class OutOfSpaceError(fmt.CacheError):
    """The output directory's filesystem is (or would be) full; the message has the numbers and what to do."""


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is "no space left on device" / "quota exceeded"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its nearest parent)."""
    return int(shutil.disk_usage(_existing(Path(path))).free)


def _mount_point(path: Path) -> Path:
    path = _existing(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 MiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while abs(n) >= 1024 and power < len(units) - 1:
        n /= 1024
        power += 1
    return f"{int(n)} B" if power == 0 else f"{n:.1f} {units[power]}"


def _uncompressed_shard_bytes(layout: fmt.CacheLayout, shard_index: int) -> int:
    start, stop = layout.shard_range(shard_index)
    chunks = -(-(stop - start) // layout.chunk_seqs)
    index_bytes = 16 * (layout.shard_seqs // layout.chunk_seqs) + 4
    return sum(chunks * layout.chunk_seqs * spec.bytes_per_sequence() + index_bytes for spec in layout.arrays())


def estimate_cache_bytes(layout: fmt.CacheLayout, written: Iterable[Mapping[str, Any]]) -> tuple[int, int, str]:
    """(estimated stored bytes of the whole cache, bytes of the shards already written, how it was estimated).

    Args:
        layout: the cache's layout.
        written: journal entries of the shards on disk (``{"shard": i, "files": {array: {"nbytes"}}}``).
    """
    written_bytes, written_sequences = 0, 0
    for entry in written:
        start, stop = layout.shard_range(int(entry["shard"]))
        written_bytes += sum(int(f["nbytes"]) for f in entry["files"].values())
        written_sequences += stop - start
    if written_sequences:
        total = written_bytes / written_sequences * layout.num_sequences
        basis = f"the {written_sequences} sequences written so far, scaled to all {layout.num_sequences}"
    else:
        total = sum(_uncompressed_shard_bytes(layout, i) for i in range(layout.num_shards))
        basis = "uncompressed size, an upper bound: compression usually stores less"
    return int(total) + _METADATA_BYTES, written_bytes, basis


def check_free_space(
    out_dir: Path, layout: fmt.CacheLayout, written: list[Mapping[str, Any]], reclaimable_bytes: int = 0
) -> None:
    """Refuse to start a build whose estimated remaining bytes exceed the free space of ``out_dir``.

    Args:
        out_dir: the cache directory (need not exist yet).
        layout: the cache's layout.
        written: journal entries of the shards already written (a resumed build).
        reclaimable_bytes: bytes the build deletes before writing (the old cache it overwrites).

    An object-store ``out_dir`` (a URL) is not checked: a bucket has no free-space figure (its staging
    directory holds one shard at a time).
    """
    if storage.is_url(out_dir):
        return
    total, written_bytes, basis = estimate_cache_bytes(layout, written)
    need, free = total - written_bytes, free_bytes(out_dir) + reclaimable_bytes
    if need > free:
        raise OutOfSpaceError(
            f"not enough free space for this cache: it needs about {human_bytes(total)} in all ({basis}), "
            f"{human_bytes(need)} of it still to write, but the filesystem of {str(out_dir)!r} (mounted at "
            f"{_mount_point(out_dir)}) has {human_bytes(free)} free. Free at least {human_bytes(need - free)} there or "
            "choose another --out; or pass --no-space-check to start anyway (a build that runs out of space "
            "stops with a clear error and resumes when rerun)"
        )


def out_of_space_error(out_dir: Path, layout: fmt.CacheLayout, written: list[Mapping[str, Any]], during: str) -> OutOfSpaceError:
    """The error for a build that hit "no space left on device" while doing ``during``."""
    total, written_bytes, basis = estimate_cache_bytes(layout, written)
    free = free_bytes(out_dir)
    short = total - written_bytes - free
    if short > 0:
        advice = f"Free at least {human_bytes(short)} there"
    else:  # the estimate says the rest fits: it was too low (or others filled the disk meanwhile)
        advice = (f"The estimate says the rest would fit, so it was too low: free clearly more than the "
                  f"{human_bytes(max(total - written_bytes, 0))} still to write there")
    return OutOfSpaceError(
        f"no space left on device while {during}: the filesystem of {str(out_dir)!r} (mounted at "
        f"{_mount_point(out_dir)}) is full ({human_bytes(free)} free). The cache needs about {human_bytes(total)} "
        f"in all ({basis}); {len(written)} of {layout.num_shards} shards ({human_bytes(written_bytes)}) are "
        f"complete and kept, and nothing partly written was kept. {advice} (or move the directory to a larger "
        "filesystem) and rerun the same command: it resumes from the shards already written"
    )
