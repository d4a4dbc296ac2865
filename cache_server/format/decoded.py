"""Decoded copies of stored shards: where they live on local disk and how their integrity is recorded.

A reader decodes each stored (compressed) shard once into an uncompressed ``.npy`` file and memory-maps
it from then on. Those files sit outside the cache directory, on whatever local disk holds the decode
root, and nothing re-reads the stored shard once they exist, so a flipped bit in one would otherwise be
served to training silently. Each copy therefore carries its own crc32c: a small trailer after the
``.npy`` data, appended before the atomic rename that publishes the file (one file, so no window in which
a copy and its record disagree). A reader checks the crc32c once per process per file version: the first
time the process maps a copy with that (device, inode, mtime), whichever cache object maps it; a copy
replaced or rewritten (with a new mtime) is checked again. It decodes again from the stored shard (itself
checked against the manifest's sha256) on a mismatch or a missing trailer. The trailer is invisible to ``numpy.load``, which reads exactly the bytes the header
describes.

Shape notation::

    n  sequences in the shard (S, fewer in the last shard)

Layout under the decode root::

    <decode root>/<first 24 hex digits of sha256(manifest bytes)>/<array>/<shard index>.npy

    <shard index>.npy = npy header | data [n, *trailing] | b"kdcrc32c" | crc32c(header + data), uint32 LE

Keying the directory by the manifest's bytes means a rebuilt cache never meets stale copies.
Only numpy, the standard library and ``crc32c`` are used here (no torch): ``kdlib`` and
``kdcache verify --decoded`` share these functions.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from cache_server.format.manifest import MANIFEST_NAME, load_manifest

__all__ = [
    "DECODE_DIR_ENV",
    "default_decode_root",
    "decoded_cache_dir",
    "decoded_shard_path",
    "create_decoded_copy",
    "publish_decoded_copy",
    "write_decoded_copy",
    "decoded_copy_problem",
    "map_decoded_copy",
    "file_identity",
    "verify_decoded_copies",
]

DECODE_DIR_ENV = "KDCACHE_DECODE_DIR"
_MANIFEST_KEY_HEX_DIGITS = 24
_TRAILER_MAGIC = b"kdcrc32c"
_TRAILER = struct.Struct("<8sI")  # magic, crc32c of every byte before the trailer
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def default_decode_root() -> Path:
    """``$KDCACHE_DECODE_DIR``, else ``$XDG_CACHE_HOME/kdcache/decoded`` (``~/.cache/kdcache/decoded``)."""
    env = os.environ.get(DECODE_DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdcache" / "decoded"


def decoded_cache_dir(decode_root: str | os.PathLike, manifest_raw: bytes) -> Path:
    """The directory of one cache's decoded copies: ``decode_root`` / a key of the exact manifest bytes."""
    return Path(decode_root) / hashlib.sha256(manifest_raw).hexdigest()[:_MANIFEST_KEY_HEX_DIGITS]


def decoded_shard_path(decoded_cache_dir: str | os.PathLike, array: str, shard_index: int) -> Path:
    """Where the decoded copy of shard ``shard_index`` of ``array`` lives inside ``decoded_cache_dir``."""
    return Path(decoded_cache_dir) / array / f"{int(shard_index)}.npy"


def create_decoded_copy(tmp_path: str | os.PathLike, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new, writable ``.npy`` memory map at ``tmp_path`` for a decoder to fill; seal it with
    ``publish_decoded_copy`` once filled (and unmapped)."""
    return np.lib.format.open_memmap(tmp_path, mode="w+", dtype=dtype, shape=shape)


def publish_decoded_copy(tmp_path: str | os.PathLike, final_path: str | os.PathLike) -> None:
    """Append the crc32c trailer to a filled copy and rename it into place (atomic on POSIX).

    The caller must have flushed and dropped its writable map of ``tmp_path``: the checksum is computed from
    the file as it is on disk, so what a reader later checks is exactly what was written.
    """
    with open(tmp_path, "r+b") as file:
        crc = _crc32c_of_file(file.fileno(), os.fstat(file.fileno()).st_size)
        file.seek(0, os.SEEK_END)
        file.write(_TRAILER.pack(_TRAILER_MAGIC, crc))
    os.replace(tmp_path, final_path)


def write_decoded_copy(tmp_path: str | os.PathLike, final_path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a decoded shard held in memory as a sealed copy: header, data, crc32c trailer, atomic rename.

    The crc32c is computed from ``array``'s memory while the bytes are written (plain ``write`` calls, no
    memory map, no msync), so the data crosses memory once. What the page cache holds is what readers map; a
    crash before the kernel writes it back can leave a renamed file whose bytes are not all on disk, and the
    reader's once-per-process check then fails and the copy is decoded again.

    Args:
        tmp_path: a temporary path in the same directory as ``final_path`` (removed on failure).
        final_path: where the sealed copy is published.
        array: the decoded shard [n, *trailing], C-contiguous.

    Raises:
        ValueError: ``array`` is not C-contiguous plain data.
        OSError: the disk under the decode directory is full or failing (the message says what to do).
    """
    if not array.flags.c_contiguous or array.dtype.hasobject:
        raise ValueError("a decoded copy is written from a C-contiguous plain-data array; pass "
                         "np.ascontiguousarray(array)")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = memoryview(array.reshape(-1)).cast("B")
    crc = crc32c.crc32c(data, crc32c.crc32c(header.getvalue()))
    try:
        with open(tmp_path, "wb") as file:
            file.write(header.getvalue())
            file.write(data)
            file.write(_TRAILER.pack(_TRAILER_MAGIC, crc))
    except OSError as exc:
        Path(tmp_path).unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write a {len(data)}-byte decoded shard in {Path(tmp_path).parent} "
                      f"({exc.strerror}); free space or set {DECODE_DIR_ENV} / max_decoded_bytes") from exc
    os.replace(tmp_path, final_path)


def _crc32c_of_file(fd: int, nbytes: int) -> int:
    if nbytes == 0:
        return crc32c.crc32c(b"")
    with mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ) as view:
        return crc32c.crc32c(view)


def _trailer_problem(fd: int) -> str | None:
    """None when the file's bytes match its trailer, else what is wrong with it."""
    size = os.fstat(fd).st_size
    if size < _TRAILER.size:
        return f"is {size} bytes, too short to hold a decoded shard"
    magic, recorded = _TRAILER.unpack(os.pread(fd, _TRAILER.size, size - _TRAILER.size))
    if magic != _TRAILER_MAGIC:
        return "has no crc32c record (written by an older kdlib, or cut short)"
    actual = _crc32c_of_file(fd, size - _TRAILER.size)
    if actual != recorded:
        return f"has crc32c {actual:08x}, but {recorded:08x} was recorded when it was written"
    return None


def decoded_copy_problem(path: str | os.PathLike) -> str | None:
    """Check one decoded copy against its recorded crc32c: None if intact, else what is wrong.

    Raises:
        FileNotFoundError: there is no file at ``path``.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return _trailer_problem(fd)
    finally:
        os.close(fd)


def map_decoded_copy(
    path: str | os.PathLike, *, verify: bool = True, known_good: set[tuple[int, int, int]] | None = None
) -> tuple[np.memmap | None, str | None]:
    """Memory-map a decoded copy read-only, checking its crc32c first when ``verify`` is set.

    The checksum is computed on the very file that gets mapped (one open file), so a copy replaced in
    between by another process cannot slip through unchecked.

    Args:
        path: the decoded copy.
        verify: check the crc32c trailer before mapping.
        known_good: identities ``(st_dev, st_ino, st_mtime_ns)`` of files this process already checked (or
            wrote); a file found there is not checked again, a file that passes is added.

    Returns:
        ``(the map [n, *trailing], None)``, or ``(None, problem)`` when the copy is damaged.

    Raises:
        FileNotFoundError: there is no file at ``path`` (evicted or never decoded).
    """
    with open(path, "rb") as file:
        st = os.fstat(file.fileno())
        identity = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if verify and (known_good is None or identity not in known_good):
            problem = _trailer_problem(file.fileno())
            if problem is not None:
                return None, problem
            if known_good is not None:
                known_good.add(identity)
        try:
            version = np.lib.format.read_magic(file)
            if version not in _HEADER_READERS:
                return None, f"has a .npy header of unsupported version {version}"
            shape, fortran_order, dtype = _HEADER_READERS[version](file)
        except ValueError as exc:
            return None, f"has an unreadable .npy header ({exc})"
        if fortran_order or dtype.hasobject:
            return None, "is not a C-ordered plain-data .npy file"
        mapped = np.memmap(file, dtype=dtype, mode="r", offset=file.tell(), shape=shape)
    return mapped, None


def file_identity(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(st_dev, st_ino, st_mtime_ns)``: what ``map_decoded_copy``'s ``known_good`` remembers."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_mtime_ns


def verify_decoded_copies(cache_dir: str | os.PathLike, decode_root: str | os.PathLike | None = None) -> list[str]:
    """Check every decoded copy of the cache at ``cache_dir`` that exists under the decode root.

    Args:
        cache_dir: the cache directory (its manifest names the shards and keys the decoded directory).
        decode_root: the decode root readers used (default ``default_decode_root()``).

    Returns:
        One problem string per damaged copy, naming the array, the shard and the file; an empty list when
        every copy is intact or none was decoded yet. A damaged copy is harmless to readers (they check it
        and decode again), so this is for auditing a decode disk, not a precondition for training.

    Raises:
        CacheError: ``cache_dir`` holds no (finished) cache.
    """
    cache_dir = Path(cache_dir)
    manifest: dict[str, Any] = load_manifest(cache_dir)
    raw = (cache_dir / MANIFEST_NAME).read_bytes()
    copies_dir = decoded_cache_dir(decode_root if decode_root is not None else default_decode_root(), raw)
    problems: list[str] = []
    for array, shards in manifest["shards"].items():
        for shard_index in range(len(shards)):
            path = decoded_shard_path(copies_dir, array, shard_index)
            try:
                mapped, problem = map_decoded_copy(path)
            except FileNotFoundError:
                continue  # not decoded (yet, or evicted): nothing to check
            del mapped
            if problem is not None:
                problems.append(f"decoded copy of {array!r} shard {shard_index} at {path} {problem}; delete it "
                                "(readers also decode it again on their own)")
    return problems
