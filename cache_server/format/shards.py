"""Stored shards: where their files live, how they are written (Zarr v3) and decoded, and how they are checked.

Shape notation::

    S  sequences per shard          C  sequences per inner chunk
    n  rows in one shard (S, or fewer for the last shard)

A stored shard file is a Zarr v3 ``sharding_indexed`` chunk: the inner chunks (C sequences each, compressed
by the cache's codec preset) followed by the shard index (one little-endian uint64 (offset, nbytes) pair per
inner chunk, then the crc32c of those pairs). docs/FORMAT.md gives the byte layout.

Format v2 stores the slot groups (``topk_ids`` + ``topk_logprobs``, ``sample_ids`` + ``sample_counts`` +
``sample_logprobs``) by ascending id, the ids delta-coded by Zarr's ``numcodecs.delta`` filter
(``cache_server.format.slots``). :func:`write_shard` takes the arrays in any slot order and stores that form;
:func:`decode_shard` returns the canonical order again, reading the stored shard of the array that orders the
group as a companion (:func:`decode_inputs` names it); :func:`decode_shard_group` decodes a whole group with
one sort. Plain Zarr readers get the stored form: pairs (id, value) intact, in ascending-id order.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import warnings
from concurrent.futures import Executor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from cache_server.format.digests import shard_checksums
from cache_server.format.errors import CorruptShardError
from cache_server.format import slots
from cache_server.format.layout import CODEC_PRESETS, FORMAT_VERSION, ArraySpec, CacheLayout
from cache_server.format.manifest import FORMAT_NAME

__all__ = [
    "shard_relpath",
    "GROUP_ATTRIBUTES",
    "group_attributes",
    "create_arrays",
    "expected_metadata",
    "damaged_metadata",
    "write_shard",
    "decode_inputs",
    "decode_shard",
    "decode_shard_group",
    "decode_stored_shard",
    "iter_shard_files",
]

# The attributes of a cache's root Zarr group (what marks a directory as a kdcache cache to Zarr users).
GROUP_ATTRIBUTES = {"kdcache": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}}
# zarr-python warns that numcodecs filters are outside the Zarr v3 spec; the format documents the one it uses.
_NUMCODECS_WARNING = "Numcodecs codecs are not in the Zarr version 3 specification"
_METADATA_NAME = "zarr.json"

# Inner chunks that were never written are marked in the shard index by this (offset, nbytes) pair.
_MISSING_CHUNK = 0xFFFFFFFFFFFFFFFF
_INDEX_CHECKSUM_BYTES = 4  # crc32c of the index, appended by zarr's index codec chain


def shard_relpath(array: str, shard_index: int, ndim: int) -> str:
    """Path of a shard file relative to the cache directory (zarr v3 default chunk key encoding)."""
    return "/".join([array, "c", str(int(shard_index))] + ["0"] * (ndim - 1))


def group_attributes(layout: CacheLayout) -> dict[str, Any]:
    """The root group's attributes of a cache with ``layout`` (its format version: 1 for a v1 cache)."""
    return {"kdcache": {"format": FORMAT_NAME, "format_version": layout.format_version}}


def _zarr_filters(layout: CacheLayout, spec: ArraySpec):
    """The array-to-array filters of an array: Zarr's delta over the chunk for v2 slot-group ids, else none."""
    if not slots.delta_coded(layout, spec.name):
        return None
    from zarr.codecs.numcodecs import Delta

    return [Delta(dtype=spec.dtype.str)]


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
        stored = slots.stored_spec(layout, spec)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NUMCODECS_WARNING)
            group.create_array(
                stored.name,
                shape=stored.shape(layout.num_sequences),
                dtype=stored.dtype,
                chunks=(layout.chunk_seqs, *stored.trailing_shape),
                shards=(layout.shard_seqs, *stored.trailing_shape),
                filters=_zarr_filters(layout, stored),
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
        create_arrays(tmp, layout, attributes=group_attributes(layout))
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
    """Write one whole shard of every array and return ``{array: shard_checksums(file bytes)}``.

    The caller must be the only writer of this shard index (whole-shard writes are safe; partial writes
    from two processes lose data, zarr-python #3682). Returns checksums of the bytes actually on disk.
    Slot-group arrays may come in any slot order (format v2 stores them by id; readers get canonical order).
    """
    import zarr

    start, stop = layout.shard_range(shard_index)
    for spec in layout.arrays():
        _check_shard_array(spec, arrays, shard_index, stop - start)
    stored_arrays = slots.stored_form(layout, arrays)
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NUMCODECS_WARNING)
            # write_empty_chunks: zarr skips a chunk whose values all equal the fill value (a mixture's lse is 0
            # everywhere, a T = 1 cache's seq_nll too), and the create-time setting is not persisted; every
            # shard file must exist for the manifest's checksums.
            group[spec.name].with_config({"write_empty_chunks": True})[start:stop] = stored_arrays[spec.name]
        raw = path.read_bytes()
        checksums[spec.name] = shard_checksums(raw)
    return checksums


def _check_shard_array(spec: ArraySpec, arrays: Mapping[str, np.ndarray], shard_index: int, rows: int) -> None:
    if spec.name not in arrays:
        raise ValueError(f"shard {shard_index}: array {spec.name} is missing (every array of the layout is written)")
    data = np.asarray(arrays[spec.name])
    expected = spec.shape(rows)
    if data.shape != expected:
        raise ValueError(f"shard {shard_index}: array {spec.name} has shape {data.shape}, expected {expected}")
    if data.dtype != spec.dtype:
        raise ValueError(f"shard {shard_index}: array {spec.name} has dtype {data.dtype}, expected {spec.dtype}")


def _chunk_decoder(codec: str) -> Callable[[memoryview, np.ndarray], Any]:
    """``decode(frame, out)``: undo the inner-chunk compressor chain of a codec preset into ``out`` (a writable
    uint8 buffer of exactly the decoded size; a frame of another size raises)."""
    import numcodecs

    preset = CODEC_PRESETS[codec]
    if preset is None:
        def copy(frame: memoryview, out: np.ndarray) -> np.ndarray:
            if len(frame) != out.nbytes:
                raise ValueError(f"an uncompressed chunk of {len(frame)} bytes, expected {out.nbytes}")
            out[...] = np.frombuffer(frame, dtype=np.uint8)
            return out

        return copy
    name = preset[0]["name"]
    # Blosc and Zstd frames are self-describing: decoding needs no parameters.
    codec_obj = numcodecs.Blosc() if name == "blosc" else numcodecs.Zstd()
    return codec_obj.decode


# Per thread, per array: a reused buffer that inner chunks are decompressed into. Decompressing into a fresh
# allocation costs more than the decompression itself (a new mapping to fault in for every 1 MB chunk).
_SCRATCH = threading.local()


def _scratch(key: str, nbytes: int) -> np.ndarray:
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = buffers[key] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def decode_inputs(layout: CacheLayout, array: str) -> tuple[str, ...]:
    """The arrays whose stored shards :func:`decode_shard` reads to decode ``array``, ``array`` first.

    Format v2 slot-group members need the stored shard of the array that orders their group
    (``topk_ids`` needs ``topk_logprobs``; ``sample_ids`` and ``sample_logprobs`` need ``sample_counts``); every
    other array (and every array of a v1 cache) decodes from its own bytes.
    """
    group = slots.slot_group(layout, array)
    if group is None or array == group.order_by:
        return (array,)
    return (array, group.order_by)


def decode_shard(
    raw: bytes | memoryview,
    spec: ArraySpec,
    layout: CacheLayout,
    shard_index: int,
    out: np.ndarray | None = None,
    *,
    companions: Mapping[str, bytes | memoryview] | None = None,
    executor: Executor | None = None,
) -> np.ndarray:
    """Decode one stored shard file into a C-contiguous array of shape [n, *trailing] (n ≤ S).

    Reads the shard index at the end (uint64 offset/nbytes pairs, little-endian, then crc32c), checks it,
    and decompresses each inner chunk straight into the output buffer. Far cheaper than going through
    zarr's async machinery per chunk, and used once per shard (decoded shards are kept memory-mapped).
    A format v2 slot-group array comes out in canonical order (docs/FORMAT.md).

    Args:
        raw: the stored shard file's bytes (checked against the manifest by the caller).
        spec: the array's (decoded) spec, from ``layout.arrays()``.
        layout: the cache's layout.
        shard_index: which shard.
        out: C-contiguous [n, *trailing] buffer of ``spec.dtype`` to decode into (default: a new array).
        companions: ``{name: stored shard bytes}`` of the other arrays :func:`decode_inputs` names, for the
            same shard (checked by the caller like ``raw``).
        executor: threads to decode the inner chunks on, several at once (None: one after another, here).
            Blosc, zstd and numpy's sort release the GIL, so threads pay even on two cores; the values are
            the same either way.

    Raises:
        CorruptShardError: the bytes do not decode.
        ValueError: a companion the array needs is missing.
    """
    needed = decode_inputs(layout, spec.name)
    if len(needed) == 1 and slots.slot_group(layout, spec.name) is None:
        return _decode_stored(raw, spec, layout, shard_index, out, executor=executor)
    missing = [name for name in needed[1:] if name not in (companions or {})]
    if missing:
        raise ValueError(
            f"decoding {spec.name!r} of a format v{layout.format_version} cache needs the stored shard of "
            f"{missing} too (its slots are stored by id): pass companions={{name: bytes}} for the arrays "
            "format.decode_inputs names"
        )
    raws = {spec.name: raw, **{name: (companions or {})[name] for name in needed[1:]}}
    return decode_shard_group(raws, layout, shard_index, outs={spec.name: out}, executor=executor)[spec.name]


def decode_shard_group(
    raws: Mapping[str, bytes | memoryview],
    layout: CacheLayout,
    shard_index: int,
    outs: Mapping[str, np.ndarray | None] | None = None,
    *,
    executor: Executor | None = None,
) -> dict[str, np.ndarray]:
    """Decode several arrays of one format v2 slot group for one shard, sorting each position once.

    Args:
        raws: ``{name: stored shard bytes}``; must include the group's ordering array (``decode_inputs``).
        layout: the cache's layout.
        shard_index: which shard.
        outs: ``{name: C-contiguous buffer or None}`` of the arrays to produce (default: every name in ``raws``).
        executor: threads to decode the inner chunks on (see :func:`decode_shard`).

    Returns:
        ``{name: decoded [n, *trailing]}`` for the names of ``outs``, in canonical slot order.
    """
    specs = {spec.name: spec for spec in layout.arrays()}
    group = slots.slot_group(layout, next(iter(raws)))
    if group is None or any(slots.slot_group(layout, name) != group for name in raws):
        raise ValueError(f"arrays {sorted(raws)} are not all members of one format v2 slot group")
    if group.order_by not in raws:
        raise ValueError(f"decoding slot group {group.name!r} needs the stored shard of {group.order_by!r}")
    outs = dict(outs) if outs is not None else dict.fromkeys(raws)
    start, stop = layout.shard_range(shard_index)
    result = {}
    for name, buf in outs.items():
        spec = specs[name]
        if buf is None:
            buf = np.empty(spec.shape(stop - start), dtype=spec.dtype)
        if not buf.flags.c_contiguous:
            raise ValueError(f"the output buffer for {name!r} must be C-contiguous")
        result[name] = buf
    # One inner chunk at a time (decompress, undo the delta, sort): the chunk's stored arrays stay in the CPU
    # cache instead of whole-shard temporaries making several trips through memory (~2x faster per shard).
    stored = {name: _StoredShard(raw, slots.stored_spec(layout, specs[name]), layout, shard_index)
              for name, raw in raws.items()}
    T, C = layout.seq_len, layout.chunk_seqs

    def decode_chunk(c: int) -> None:
        lo, hi = c * C, min((c + 1) * C, stop - start)
        chunk = {name: part.chunk(c).reshape((hi - lo) * T, -1) for name, part in stored.items()}
        slots.from_storage(layout, group, chunk,
                           {name: buf[lo:hi].reshape((hi - lo) * T, -1) for name, buf in result.items()})

    _each_chunk(decode_chunk, -(-(stop - start) // C), executor)
    return result


def _each_chunk(decode_chunk: Callable[[int], None], num_chunks: int, executor: Executor | None) -> None:
    """``decode_chunk(c)`` for every inner chunk c: here in order, or on ``executor``'s threads (each chunk
    writes its own rows of the output, so the order does not matter); the first error is raised."""
    if executor is None or num_chunks < 2:
        for c in range(num_chunks):
            decode_chunk(c)
        return
    futures = [executor.submit(decode_chunk, c) for c in range(num_chunks)]
    futures_wait(futures)
    for future in futures:
        future.result()


def decode_stored_shard(raw: bytes | memoryview, spec: ArraySpec, layout: CacheLayout, shard_index: int) -> np.ndarray:
    """The array as stored, i.e. what plain Zarr reads (format v2 slot groups by ascending id, q8 as uint8).

    Needs no companion: for checking that a shard file decodes (``kdcache verify``), not for training data.
    """
    return _decode_stored(raw, slots.stored_spec(layout, spec), layout, shard_index)


def _decode_stored(
    raw: bytes | memoryview, spec: ArraySpec, layout: CacheLayout, shard_index: int, out: np.ndarray | None = None,
    *, executor: Executor | None = None,
) -> np.ndarray:
    """The array as stored (``spec`` is the stored spec): the inner chunks decompressed, the delta filter undone."""
    stored = _StoredShard(raw, spec, layout, shard_index)
    rows = stored.rows
    if out is None:
        out = np.empty((rows, *spec.trailing_shape), dtype=spec.dtype)
    flat = out.reshape(rows, -1) if spec.trailing_shape else out.reshape(rows, 1)
    chunk_rows = layout.chunk_seqs
    _each_chunk(lambda c: stored.chunk(c, out=flat[c * chunk_rows : (c + 1) * chunk_rows]), -(-rows // chunk_rows),
                executor)
    return out


class _StoredShard:
    """One stored shard file, its index checked, decoded an inner chunk at a time (rows of ``spec``)."""

    def __init__(self, raw: bytes | memoryview, spec: ArraySpec, layout: CacheLayout, shard_index: int) -> None:
        import crc32c

        start, stop = layout.shard_range(shard_index)
        self.spec, self.layout, self.shard_index, self.rows = spec, layout, shard_index, stop - start
        chunks_per_shard = layout.shard_seqs // layout.chunk_seqs
        index_nbytes = chunks_per_shard * 16
        self.raw = raw = memoryview(raw).cast("B")
        if len(raw) < index_nbytes + _INDEX_CHECKSUM_BYTES:
            raise CorruptShardError(spec.name, shard_index, f"only {len(raw)} bytes, too short for the shard index")
        self.data_end = len(raw) - index_nbytes - _INDEX_CHECKSUM_BYTES
        index_bytes = raw[self.data_end : len(raw) - _INDEX_CHECKSUM_BYTES]
        (stored_crc,) = struct.unpack("<I", raw[len(raw) - _INDEX_CHECKSUM_BYTES :])
        if crc32c.crc32c(index_bytes) != stored_crc:
            raise CorruptShardError(spec.name, shard_index, "shard index checksum mismatch")
        self.index = np.frombuffer(index_bytes, dtype="<u8").reshape(chunks_per_shard, 2)
        self.row_items = int(np.prod(spec.trailing_shape, dtype=np.int64))
        self.decode = _chunk_decoder(layout.codec)
        self.undelta = slots.delta_coded(layout, spec.name)

    def chunk(self, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """Inner chunk ``c``'s rows inside the array, [rows in the chunk, row items]: into ``out`` when given,
        else into a buffer of this thread that its next chunk of the same array overwrites."""
        spec, chunk_rows = self.spec, self.layout.chunk_seqs
        lo = c * chunk_rows
        hi = min(lo + chunk_rows, self.rows)
        offset, nbytes = (int(v) for v in self.index[c])
        if out is None:  # a view of this thread's buffer for the array: valid until its next chunk here
            out = _scratch(f"{spec.name}:rows", chunk_rows * self.row_items * spec.dtype.itemsize)
            out = out.view(spec.dtype)[: (hi - lo) * self.row_items].reshape(hi - lo, self.row_items)
        if offset == _MISSING_CHUNK and nbytes == _MISSING_CHUNK:
            out[...] = 0  # fill_value
            return out
        if offset + nbytes > self.data_end:
            raise CorruptShardError(spec.name, self.shard_index, f"inner chunk {c} points past the end of the shard")
        # Inner chunks are always full-size (zarr pads the edge chunk); keep only the rows inside the array.
        chunk_nbytes = chunk_rows * self.row_items * spec.dtype.itemsize
        direct = not self.undelta and hi - lo == chunk_rows and out.flags.c_contiguous and out.dtype.isnative
        target = out.reshape(-1).view(np.uint8) if direct else _scratch(spec.name, chunk_nbytes)
        try:
            self.decode(self.raw[offset : offset + nbytes], target)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on damaged frames (or a wrong size)
            raise CorruptShardError(spec.name, self.shard_index, f"inner chunk {c} failed to decompress: {exc}") from exc
        if direct:
            return out
        items = target.view(spec.dtype.newbyteorder("<"))
        if self.undelta and hi - lo == chunk_rows and out.flags.c_contiguous:
            prefix_sum_wrapping(items, out.reshape(-1))  # numcodecs.delta over the flattened chunk
            return out
        if self.undelta:
            items = prefix_sum_wrapping(items, np.empty(items.shape, spec.dtype))
        out[...] = items.reshape(chunk_rows, self.row_items)[: hi - lo]
        return out


_PREFIX_BLOCK = 16  # items per block of prefix_sum_wrapping: measured fastest for uint16 chunks of 0.5-1 MB


def prefix_sum_wrapping(items: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``np.cumsum(items, dtype=out.dtype, out=out)`` for 1-D unsigned integers (the inverse of numcodecs.delta,
    wrapping in the dtype), about 2x faster.

    numpy's cumsum is a scalar loop. Here the items are seen as blocks [m, 16]: the prefix within every block
    is 15 vectorized column adds, then each block adds the wrapped sum of all blocks before it (a cumsum over
    m = n/16 block totals). Modular addition is associative, so the result is bit-identical.
    """
    n, w = items.size, _PREFIX_BLOCK
    if n % w or n < 4 * w:
        return np.cumsum(items, dtype=out.dtype, out=out)
    blocks = out.reshape(-1, w)  # [m, w]
    blocks[...] = items.reshape(-1, w)
    for j in range(1, w):
        np.add(blocks[:, j], blocks[:, j - 1], out=blocks[:, j])
    before = np.cumsum(blocks[:-1, -1], dtype=out.dtype)  # [m-1]: the sum of every block before block i+1
    np.add(blocks[1:], before[:, None], out=blocks[1:])
    return out


def iter_shard_files(cache_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Iterable[tuple[str, int, Path]]:
    """Yield (array, shard_index, path) for every shard file the manifest lists."""
    for array, entries in manifest["shards"].items():
        ndim = len(manifest["arrays"][array]["shape"])
        for i in range(len(entries)):
            yield array, i, Path(cache_dir) / shard_relpath(array, i, ndim)
