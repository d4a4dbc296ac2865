"""kdcache on-disk format v1: layout, manifest, shard encoding and decoding.

This is the ONE module that knows the format; the build job, the server and ``kdlib`` all go through it.
The specification lives in ``docs/FORMAT.md``; keep the two in step (tests pin exact manifest bytes).

Shape notation::

    N  number of sequences in the cache
    T  sequence length (positions per sequence)
    K  top-k entries kept per position
    V  teacher vocabulary size
    S  sequences per shard (the unit one writer writes whole, and the unit a reader decodes once)
    C  sequences per inner chunk (the unit of compression inside a shard)

Arrays of a cache (all sharded along axis 0 with the same S, so "shard i" means sequences [i*S, (i+1)*S)
in every array)::

    input_ids        [N, T]     uint16 | uint32   the tokens the teacher saw
    topk_ids         [N, T, K]  uint16 | uint32   teacher top-k ids at each position, by descending prob
    topk_logprobs    [N, T, K]  float16 | float32 log p_teacher(id | tokens[0..t]) at temperature 1
    lse              [N, T]     float32           logsumexp of the teacher's raw logits over the full vocab
    lse_t{tau:g}     [N, T]     float32           logsumexp(logits / tau) for each extra build temperature
    seq_nll          [N]        float32           mean teacher NLL of the actual next tokens (positions 0..T-2)
    seq_entropy      [N]        float32           mean teacher entropy over the T positions (full vocab)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ALIGNMENT_CONVENTION",
    "CacheError",
    "CorruptShardError",
    "ArraySpec",
    "CacheLayout",
    "ids_dtype_for_vocab",
    "temperature_key",
    "array_specs",
    "plan_chunking",
    "manifest_bytes",
    "load_manifest",
    "parse_manifest",
    "layout_from_manifest",
    "shard_relpath",
    "shard_sha256",
    "create_arrays",
    "write_shard",
    "decode_shard",
    "verify_shard_bytes",
]

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

ALIGNMENT_CONVENTION = (
    "position t of a sequence holds the teacher distribution over the token at t+1 given tokens[0..t] "
    "(the causal-LM shift); the last position T-1 holds the teacher's prediction of the token after the "
    "sequence, which has no label inside the sequence, so loaders set its label to ignore_index"
)

# Inner chunks that were never written are marked in the shard index by this (offset, nbytes) pair.
_MISSING_CHUNK = 0xFFFFFFFFFFFFFFFF
_INDEX_CHECKSUM_BYTES = 4  # crc32c of the index, appended by zarr's index codec chain

# Codec presets by name. Values are measured in docs/FORMAT.md ("Compression"); all are lossless.
CODEC_PRESETS: dict[str, list[dict[str, Any]] | None] = {
    "blosc-zstd": [{"name": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "shuffle"}],
    "blosc-zstd-bitshuffle": [{"name": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "bitshuffle"}],
    "blosc-lz4": [{"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"}],
    "zstd": [{"name": "zstd", "level": 3}],
    "none": None,
}
DEFAULT_CODEC = "blosc-zstd"


class CacheError(Exception):
    """A cache is missing, incomplete, of an unknown version, or otherwise unusable."""


class CorruptShardError(CacheError):
    """A shard's bytes do not match the manifest checksum or cannot be decoded."""

    def __init__(self, array: str, shard_index: int, detail: str, where: str = "") -> None:
        self.array = array
        self.shard_index = shard_index
        location = f" ({where})" if where else ""
        super().__init__(
            f"corrupt shard: array {array!r} shard {shard_index}{location}: {detail}. "
            "Rebuild the shard (rerun `kdcache build` with the same arguments after deleting it) or re-copy "
            "the cache; run `kdcache verify DIR` to list every damaged shard."
        )


def ids_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest exact unsigned integer dtype for token ids of a vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("uint16")
    if vocab_size <= 1 << 32:
        return np.dtype("uint32")
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 ids")


def temperature_key(temperature: float) -> str:
    """Array / batch key of the build-time logsumexp(logits / tau): ``lse_t2``, ``lse_t0.5``."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return f"lse_t{float(temperature):g}"


@dataclass(frozen=True)
class ArraySpec:
    """One array of a cache: name, dtype and per-sequence trailing shape."""

    name: str
    dtype: np.dtype
    trailing_shape: tuple[int, ...]  # shape after the sequence axis: (T, K), (T,) or ()

    def shape(self, num_sequences: int) -> tuple[int, ...]:
        return (num_sequences, *self.trailing_shape)

    def bytes_per_sequence(self) -> int:
        return int(np.prod(self.trailing_shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class CacheLayout:
    """Everything needed to lay out and decode a cache's arrays (a subset of the manifest)."""

    num_sequences: int
    seq_len: int
    topk: int
    vocab_size: int
    temperatures: tuple[float, ...] = ()
    logprob_dtype: str = "float16"
    shard_seqs: int = 64
    chunk_seqs: int = 8
    codec: str = DEFAULT_CODEC

    def __post_init__(self) -> None:
        for name in ("num_sequences", "seq_len", "topk", "vocab_size", "shard_seqs", "chunk_seqs"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.topk > self.vocab_size:
            raise ValueError(
                f"topk={self.topk} is larger than the teacher vocabulary ({self.vocab_size}); "
                f"use --topk {self.vocab_size} or less"
            )
        if self.shard_seqs % self.chunk_seqs:
            raise ValueError(
                f"shard_seqs ({self.shard_seqs}) must be a multiple of chunk_seqs ({self.chunk_seqs})"
            )
        if self.logprob_dtype not in ("float16", "float32"):
            raise ValueError(f"logprob_dtype must be float16 or float32, got {self.logprob_dtype!r}")
        if self.codec not in CODEC_PRESETS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {sorted(CODEC_PRESETS)}")
        for tau in self.temperatures:
            temperature_key(tau)
            if float(tau) == 1.0:
                raise ValueError("temperature 1 is always stored (as `lse`); list only extra temperatures")

    @property
    def ids_dtype(self) -> np.dtype:
        return ids_dtype_for_vocab(self.vocab_size)

    @property
    def num_shards(self) -> int:
        return -(-self.num_sequences // self.shard_seqs)

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        """Sequence range [start, stop) of a shard."""
        if not 0 <= shard_index < self.num_shards:
            raise IndexError(f"shard {shard_index} out of range [0, {self.num_shards})")
        start = shard_index * self.shard_seqs
        return start, min(start + self.shard_seqs, self.num_sequences)

    def arrays(self) -> list[ArraySpec]:
        return array_specs(self)

    def bytes_per_token_uncompressed(self) -> float:
        return sum(spec.bytes_per_sequence() for spec in self.arrays()) / self.seq_len


def array_specs(layout: CacheLayout) -> list[ArraySpec]:
    """The arrays of a cache, in manifest order."""
    T, K = layout.seq_len, layout.topk
    ids = layout.ids_dtype
    specs = [
        ArraySpec("input_ids", ids, (T,)),
        ArraySpec("topk_ids", ids, (T, K)),
        ArraySpec("topk_logprobs", np.dtype(layout.logprob_dtype), (T, K)),
        ArraySpec("lse", np.dtype("float32"), (T,)),
    ]
    specs += [ArraySpec(temperature_key(tau), np.dtype("float32"), (T,)) for tau in layout.temperatures]
    specs += [ArraySpec("seq_nll", np.dtype("float32"), ()), ArraySpec("seq_entropy", np.dtype("float32"), ())]
    return specs


def plan_chunking(
    seq_len: int,
    topk: int,
    vocab_size: int,
    *,
    num_sequences: int | None = None,
    target_chunk_bytes: int = 1 << 20,
    target_shard_bytes: int = 32 << 20,
) -> tuple[int, int]:
    """Pick (shard_seqs, chunk_seqs) from byte targets on the largest array (``topk_ids``).

    Inner chunks of ~1 MiB uncompressed keep Blosc/zstd at full speed and a random read small; shards of
    ~32 MiB (tens of seconds of a 7B teacher per GPU) bound the work lost to a crash and keep the number of
    files manageable at 10B tokens. See docs/FORMAT.md ("Chunking") for the measurements.
    """
    row_bytes = seq_len * topk * ids_dtype_for_vocab(vocab_size).itemsize
    chunk_seqs = max(1, target_chunk_bytes // row_bytes)
    chunks_per_shard = max(1, target_shard_bytes // (chunk_seqs * row_bytes))
    if num_sequences is not None:
        # Never plan shards (or chunks) larger than the whole cache: tiny caches stay tiny on disk.
        chunk_seqs = min(chunk_seqs, num_sequences)
        chunks_per_shard = min(chunks_per_shard, -(-num_sequences // chunk_seqs))
    return chunk_seqs * chunks_per_shard, chunk_seqs


# ----------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """Canonical manifest bytes: UTF-8 JSON, sorted keys, 2-space indent, trailing newline."""
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def parse_manifest(raw: bytes, source: str = "manifest") -> dict[str, Any]:
    """Parse and validate manifest bytes; refuse other formats and unknown versions."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{source} is not valid JSON ({exc}); the cache is damaged") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{source} is not a kdcache manifest (missing \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{source} has format_version {version!r}, but this kdcache reads only version {FORMAT_VERSION}; "
            "upgrade kdcache (pip install -U kdcache) or rebuild the cache with this version"
        )
    for key in ("num_sequences", "seq_len", "topk", "vocab_size", "shard_seqs", "chunk_seqs", "arrays", "shards"):
        if key not in manifest:
            raise CacheError(f"{source} lacks the required field {key!r}; the cache is damaged")
    return manifest


def load_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``DIR/manifest.json``. A directory without one is an unfinished (or not a) cache."""
    cache_dir = Path(cache_dir)
    if not cache_dir.exists():
        raise CacheError(f"cache directory {str(cache_dir)!r} does not exist")
    if not cache_dir.is_dir():
        raise CacheError(f"{str(cache_dir)!r} is a file, not a cache directory")
    path = cache_dir / MANIFEST_NAME
    if not path.exists():
        hint = (
            "the build has not finished: rerun the same `kdcache build` command to resume it"
            if (cache_dir / "zarr.json").exists()
            else "it is not a kdcache cache"
        )
        raise CacheError(f"{str(cache_dir)!r} has no {MANIFEST_NAME}: {hint}")
    return parse_manifest(path.read_bytes(), source=str(path))


def layout_from_manifest(manifest: Mapping[str, Any]) -> CacheLayout:
    """The layout a manifest describes; a malformed manifest is a CacheError, not a KeyError/ValueError."""
    try:
        return _layout_from_manifest(manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"the manifest's layout fields are malformed ({type(exc).__name__}: {exc}); "
                         "the cache is damaged: re-copy or rebuild it") from exc


def _layout_from_manifest(manifest: Mapping[str, Any]) -> CacheLayout:
    return CacheLayout(
        num_sequences=int(manifest["num_sequences"]),
        seq_len=int(manifest["seq_len"]),
        topk=int(manifest["topk"]),
        vocab_size=int(manifest["vocab_size"]),
        temperatures=tuple(float(t) for t in manifest.get("temperatures", [])),
        logprob_dtype=str(manifest["arrays"]["topk_logprobs"]["dtype"]),
        shard_seqs=int(manifest["shard_seqs"]),
        chunk_seqs=int(manifest["chunk_seqs"]),
        codec=str(manifest.get("codec", DEFAULT_CODEC)),
    )


# ----------------------------------------------------------------------------------------------------------
# Shards on disk (Zarr v3, sharding_indexed codec, index at the end)
# ----------------------------------------------------------------------------------------------------------


def shard_relpath(array: str, shard_index: int, ndim: int) -> str:
    """Path of a shard file relative to the cache directory (zarr v3 default chunk key encoding)."""
    return "/".join([array, "c", str(int(shard_index))] + ["0"] * (ndim - 1))


def shard_sha256(data: bytes | memoryview) -> str:
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

    group = zarr.open_group(str(cache_dir), mode="w", attributes=dict(attributes or {}))
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


def verify_shard_bytes(raw: bytes | memoryview, expected: Mapping[str, Any], array: str, shard_index: int) -> None:
    """Raise CorruptShardError unless ``raw`` has the manifest's size and sha256."""
    if len(raw) != int(expected["nbytes"]):
        raise CorruptShardError(array, shard_index, f"size {len(raw)} bytes, manifest says {expected['nbytes']}")
    digest = shard_sha256(raw)
    if digest != expected["sha256"]:
        raise CorruptShardError(array, shard_index, f"sha256 {digest[:16]}… != manifest {expected['sha256'][:16]}…")


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
