"""Stored shards: where their files live, how they are written (Zarr v3) and decoded, and how they are checked.

Shape notation::

    S  sequences per shard          C  sequences per inner chunk
    n  rows in one shard (S, or fewer for the last shard)

A stored shard file is a Zarr v3 ``sharding_indexed`` chunk: the inner chunks (C sequences each, compressed
by the cache's codec preset) followed by the shard index (one little-endian uint64 (offset, nbytes) pair per
inner chunk, then the crc32c of those pairs). docs/FORMAT.md gives the byte layout.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cache_server.format.errors import CorruptShardError
from cache_server.format.layout import CODEC_PRESETS, ArraySpec, CacheLayout
from cache_server.format.manifest import FORMAT_NAME, FORMAT_VERSION

__all__ = [
    "shard_relpath",
    "shard_sha256",
    "GROUP_ATTRIBUTES",
    "create_arrays",
    "expected_metadata",
    "damaged_metadata",
    "write_shard",
    "verify_shard_bytes",
    "decode_shard",
    "iter_shard_files",
]

# The attributes of a cache's root Zarr group (what marks a directory as a kdcache cache to Zarr users).
GROUP_ATTRIBUTES = {"kdcache": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}}
_METADATA_NAME = "zarr.json"

# Inner chunks that were never written are marked in the shard index by this (offset, nbytes) pair.
_MISSING_CHUNK = 0xFFFFFFFFFFFFFFFF
_INDEX_CHECKSUM_BYTES = 4  # crc32c of the index, appended by zarr's index codec chain


def shard_relpath(array: str, shard_index: int, ndim: int) -> str:
    """Path of a shard file relative to the cache directory (zarr v3 default chunk key encoding)."""
    return "/".join([array, "c", str(int(shard_index))] + ["0"] * (ndim - 1))


def shard_sha256(data: bytes | memoryview) -> str:
    """Lowercase hex sha256 of a stored shard file's bytes (what the manifest records)."""
    return hashlib.sha256(data).hexdigest()


def _zarr_compressors(codec: str):
    from zarr.codecs import BloscCodec, ZstdCodec

    preset = CODEC_PRESETS[codec]
    if preset is None:
        return None
    out = []
    for conf in preset:
        conf = dict(conf)
        name = conf.pop("name")
        out.append(BloscCodec(**conf) if name == "blosc" else ZstdCodec(**conf))
    return out


def create_arrays(cache_dir: str | os.PathLike, layout: CacheLayout, attributes: Mapping[str, Any] | None = None):
    """Create the Zarr v3 group and every (empty) array's metadata. Call once, from one process."""
    import zarr

    # Not mode="w": that empties the whole directory, the held build lock (.kdcache-build/) included.
    group = zarr.open_group(str(cache_dir), mode="a", attributes=dict(attributes or {}))
    compressors = _zarr_compressors(layout.codec)
    for spec in layout.arrays():
        shape = spec.shape(layout.num_sequences)
        group.create_array(
            spec.name,
            shape=shape,
            dtype=spec.dtype,
            chunks=(layout.chunk_seqs, *spec.trailing_shape),
            shards=(layout.shard_seqs, *spec.trailing_shape),
            compressors=compressors,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
    return group


def expected_metadata(layout: CacheLayout) -> dict[str, bytes]:
    """The Zarr metadata files of a cache with ``layout``: ``{path relative to the cache: bytes}``.

    :func:`create_arrays` writes them as a pure function of the layout (and the zarr version), so they are
    made again here, in a temporary directory, to be compared with (or to replace) a cache's own.
    """
    with tempfile.TemporaryDirectory(prefix="kdcache-metadata-") as tmp:
        create_arrays(tmp, layout, attributes=GROUP_ATTRIBUTES)
        return {path.relative_to(tmp).as_posix(): path.read_bytes() for path in sorted(Path(tmp).rglob(_METADATA_NAME))}


def damaged_metadata(cache_dir: str | os.PathLike, layout: CacheLayout) -> dict[str, str]:
    """The Zarr metadata files of ``cache_dir`` that are not what its layout implies: ``{relative path: why}``.

    A damaged ``zarr.json`` passes every shard check yet breaks Zarr readers; rerunning the build rewrites it.
    """
    problems = {}
    for relpath, expected in expected_metadata(layout).items():
        try:
            raw = (Path(cache_dir) / relpath).read_bytes()
        except FileNotFoundError:
            problems[relpath] = "the metadata file is missing"
            continue
        except OSError as exc:
            problems[relpath] = f"cannot be read ({exc.strerror or exc})"
            continue
        if raw != expected:
            problems[relpath] = ("differs from the Zarr metadata the cache's layout implies (damaged, or written "
                                 "by another zarr version)")
    return problems


def write_shard(
    cache_dir: str | os.PathLike, layout: CacheLayout, shard_index: int, arrays: Mapping[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Write one whole shard of every array and return ``{array: {"sha256", "nbytes"}}`` of the files.

    The caller must be the only writer of this shard index (whole-shard writes are safe; partial writes
    from two processes lose data, zarr-python #3682). Returns checksums of the bytes actually on disk.
    """
    import zarr

    start, stop = layout.shard_range(shard_index)
    group = zarr.open_group(str(cache_dir), mode="r+")
    checksums: dict[str, dict[str, Any]] = {}
    for spec in layout.arrays():
        path = Path(cache_dir) / shard_relpath(spec.name, shard_index, 1 + len(spec.trailing_shape))
        # A shard left by an interrupted build is rewritten from scratch: zarr merges a write that does not
        # cover the whole shard (the last, short one) into the file already there, so old bytes must go first,
        # and so must zarr's temporary "<name>.<uuid>.partial" files of a write killed half-way.
        path.unlink(missing_ok=True)
        if path.parent.exists():
            for leftover in path.parent.glob(f"{path.name}.*.partial"):
                leftover.unlink(missing_ok=True)
        data = np.asarray(arrays[spec.name])
        expected = spec.shape(stop - start)
        if data.shape != expected:
            raise ValueError(f"shard {shard_index}: array {spec.name} has shape {data.shape}, expected {expected}")
        if data.dtype != spec.dtype:
            raise ValueError(f"shard {shard_index}: array {spec.name} has dtype {data.dtype}, expected {spec.dtype}")
        group[spec.name][start:stop] = data
        raw = path.read_bytes()
        checksums[spec.name] = {"sha256": shard_sha256(raw), "nbytes": len(raw)}
    return checksums


def verify_shard_bytes(
    raw: bytes | memoryview, expected: Mapping[str, Any], array: str, shard_index: int, where: str = ""
) -> None:
    """Raise CorruptShardError unless ``raw`` has the manifest's size and sha256.

    Args:
        raw: the stored shard file's bytes.
        expected: the manifest's entry for the shard, ``{"sha256": hex, "nbytes": int}``.
        array: array name, for the error.
        shard_index: shard index, for the error.
        where: the file (or URL) the bytes came from, for the error.
    """
    if len(raw) != int(expected["nbytes"]):
        raise CorruptShardError(
            array, shard_index, f"size {len(raw)} bytes, manifest says {expected['nbytes']}", where
        )
    digest = shard_sha256(raw)
    if digest != expected["sha256"]:
        raise CorruptShardError(
            array, shard_index, f"sha256 {digest[:16]}… != manifest {expected['sha256'][:16]}…", where
        )


def _chunk_decoder(codec: str):
    """A bytes->bytes function undoing the inner-chunk compressor chain of a codec preset."""
    import numcodecs

    preset = CODEC_PRESETS[codec]
    if preset is None:
        return lambda buf: buf
    name = preset[0]["name"]
    # Blosc and Zstd frames are self-describing: decoding needs no parameters.
    codec_obj = numcodecs.Blosc() if name == "blosc" else numcodecs.Zstd()
    return codec_obj.decode


def decode_shard(
    raw: bytes | memoryview,
    spec: ArraySpec,
    layout: CacheLayout,
    shard_index: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode one stored shard file into a C-contiguous array of shape [n, *trailing] (n ≤ S).

    Reads the shard index at the end (uint64 offset/nbytes pairs, little-endian, then crc32c), checks it,
    and decompresses each inner chunk straight into the output buffer. Far cheaper than going through
    zarr's async machinery per chunk, and used once per shard (decoded shards are kept memory-mapped).
    """
    import crc32c

    start, stop = layout.shard_range(shard_index)
    rows = stop - start
    chunks_per_shard = layout.shard_seqs // layout.chunk_seqs
    index_nbytes = chunks_per_shard * 16
    raw = memoryview(raw).cast("B")
    if len(raw) < index_nbytes + _INDEX_CHECKSUM_BYTES:
        raise CorruptShardError(spec.name, shard_index, f"only {len(raw)} bytes, too short for the shard index")
    index_bytes = raw[len(raw) - index_nbytes - _INDEX_CHECKSUM_BYTES : len(raw) - _INDEX_CHECKSUM_BYTES]
    (stored_crc,) = struct.unpack("<I", raw[len(raw) - _INDEX_CHECKSUM_BYTES :])
    if crc32c.crc32c(index_bytes) != stored_crc:
        raise CorruptShardError(spec.name, shard_index, "shard index checksum mismatch")
    index = np.frombuffer(index_bytes, dtype="<u8").reshape(chunks_per_shard, 2)

    if out is None:
        out = np.empty((rows, *spec.trailing_shape), dtype=spec.dtype)
    flat = out.reshape(rows, -1) if spec.trailing_shape else out.reshape(rows, 1)
    row_items = flat.shape[1]
    decode = _chunk_decoder(layout.codec)
    chunk_rows = layout.chunk_seqs
    for c in range(chunks_per_shard):
        lo = c * chunk_rows
        if lo >= rows:
            break
        offset, nbytes = (int(v) for v in index[c])
        hi = min(lo + chunk_rows, rows)
        if offset == _MISSING_CHUNK and nbytes == _MISSING_CHUNK:
            flat[lo:hi] = 0  # fill_value
            continue
        if offset + nbytes > len(raw) - index_nbytes - _INDEX_CHECKSUM_BYTES:
            raise CorruptShardError(spec.name, shard_index, f"inner chunk {c} points past the end of the shard")
        try:
            decoded = decode(raw[offset : offset + nbytes])
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on damaged frames
            raise CorruptShardError(spec.name, shard_index, f"inner chunk {c} failed to decompress: {exc}") from exc
        # Inner chunks are always full-size (zarr pads the edge chunk); keep only the rows inside the array.
        chunk = np.frombuffer(decoded, dtype=spec.dtype.newbyteorder("<"))
        if chunk.size != chunk_rows * row_items:
            raise CorruptShardError(spec.name, shard_index, f"inner chunk {c} decoded to {chunk.size} items")
        flat[lo:hi] = chunk.reshape(chunk_rows, row_items)[: hi - lo]
    return out


def iter_shard_files(cache_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Iterable[tuple[str, int, Path]]:
    """Yield (array, shard_index, path) for every shard file the manifest lists."""
    for array, entries in manifest["shards"].items():
        ndim = len(manifest["arrays"][array]["shape"])
        for i in range(len(entries)):
            yield array, i, Path(cache_dir) / shard_relpath(array, i, ndim)
