"""Cache layout: which arrays a cache holds, their dtypes and shapes, and how they are sharded and chunked.

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

By target kind (``CacheLayout.targets``; W = sample slots per position, D = draws per position)::

    topk     the arrays above (default)
    sample   no topk_ids / topk_logprobs (K = 0), plus
      sample_ids       [N, T, W]  uint16 | uint32   unique drawn ids by descending count (ties: ascending id)
      sample_counts    [N, T, W]  uint8 (D <= 255) | uint16   draws of each id; padding slots: count 0, id 0
      sample_logprobs  [N, T, W]  float16 | float32 exact log p_teacher(id) at temperature 1 (0 on padding;
                                                    absent with sample_logprobs=False)
    hybrid   topk_ids / topk_logprobs with K = H (the exact head) plus the sample_* arrays, drawn from the
             teacher restricted to the vocabulary minus the head

Optional text offsets (``CacheLayout.offsets``, ``kdcache build --record-offsets``; absent otherwise, so other
caches are unchanged; ``offsets.py`` has the rules)::

    token_doc        [N, T]     uint32            the input document each token belongs to
    token_bytes      [N, T, 2]  uint32            [start, end) UTF-8 byte span of the token in that document
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ALIGNMENT_CONVENTION",
    "TARGET_KINDS",
    "MAX_SAMPLES",
    "CODEC_PRESETS",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "LOGPROB_CODECS",
    "ArraySpec",
    "CacheLayout",
    "ids_dtype_for_vocab",
    "temperature_key",
    "array_specs",
    "plan_chunking",
]

ALIGNMENT_CONVENTION = (
    "position t of a sequence holds the teacher distribution over the token at t+1 given tokens[0..t] "
    "(the causal-LM shift); the last position T-1 holds the teacher's prediction of the token after the "
    "sequence, which has no label inside the sequence, so loaders set its label to ignore_index"
)

# Codec presets by name (docs/FORMAT.md section 4); all are lossless.
CODEC_PRESETS: dict[str, list[dict[str, Any]] | None] = {
    "blosc-zstd": [{"name": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "shuffle"}],
    "blosc-zstd-bitshuffle": [{"name": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "bitshuffle"}],
    "blosc-lz4": [{"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"}],
    "zstd": [{"name": "zstd", "level": 3}],
    "none": None,
}
DEFAULT_CODEC = "blosc-zstd"

# Format versions: 2 is what new caches are written as; 1 (the stored form before issue 10) stays readable.
FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)
# How log-probs are stored (docs/FORMAT.md, "Log-prob codecs"): "exact" keeps every bit of the logprob dtype;
# "q8" (opt-in, lossy) stores each position's top value exactly and the rest as 8-bit steps below it.
LOGPROB_CODECS = ("exact", "q8")

# What a cache stores per position (docs/FORMAT.md, "Target kinds"): exact top-k, sampled ids with counts, or
# an exact top-H head plus draws from the rest of the vocabulary.
TARGET_KINDS = ("topk", "sample", "hybrid")
MAX_SAMPLES = (1 << 16) - 1  # draws per position: the counts are uint16 at most


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
        """The whole array's shape for ``num_sequences`` sequences: [N, *trailing]."""
        return (num_sequences, *self.trailing_shape)

    def bytes_per_sequence(self) -> int:
        """Uncompressed bytes of one sequence (one row along axis 0)."""
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
    targets: str = "topk"  # one of TARGET_KINDS
    samples: int = 0  # D draws per position (sample / hybrid)
    sample_slots: int = 0  # W slots per position (sample / hybrid), 1 <= W <= D
    sample_temperature: float = 1.0  # tau_s of the draws; != 1 must be among `temperatures`
    sample_logprobs: bool = True  # store sample_logprobs (sample / hybrid)
    shard_seqs: int = 64
    chunk_seqs: int = 8
    codec: str = DEFAULT_CODEC
    format_version: int = FORMAT_VERSION  # 1: v1 stored form (read only); 2: id-sorted slots (docs/FORMAT.md)
    logprob_codec: str = "exact"  # one of LOGPROB_CODECS; a lossy one needs format_version 2
    offsets: bool = False  # the optional text-offset arrays token_doc / token_bytes (offsets.py)

    def __post_init__(self) -> None:
        for name in ("num_sequences", "seq_len", "vocab_size", "shard_seqs", "chunk_seqs"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_targets(self)
        if self.shard_seqs % self.chunk_seqs:
            raise ValueError(
                f"shard_seqs ({self.shard_seqs}) must be a multiple of chunk_seqs ({self.chunk_seqs}): pass a "
                "--shard-seqs that --chunk-seqs divides"
            )
        if self.logprob_dtype not in ("float16", "float32"):
            raise ValueError(f"logprob_dtype must be float16 or float32, got {self.logprob_dtype!r}")
        if self.codec not in CODEC_PRESETS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {sorted(CODEC_PRESETS)}")
        if self.format_version not in FORMAT_VERSIONS:
            raise ValueError(f"format_version must be one of {FORMAT_VERSIONS}, got {self.format_version!r}")
        if self.logprob_codec not in LOGPROB_CODECS:
            raise ValueError(f"unknown logprob codec {self.logprob_codec!r}; choose one of {LOGPROB_CODECS}")
        if self.logprob_codec != "exact" and self.format_version < 2:
            raise ValueError(f"logprob codec {self.logprob_codec!r} needs format_version 2")
        keys: dict[str, float] = {}
        for tau in self.temperatures:
            key = temperature_key(tau)
            if float(tau) == 1.0:
                raise ValueError("temperature 1 is always stored (as `lse`); list only extra temperatures")
            if key in keys:
                raise ValueError(
                    f"temperatures {keys[key]!r} and {tau!r} both store as array {key!r}; list each temperature "
                    "once (they must differ within 6 significant digits)"
                )
            keys[key] = tau

    @property
    def has_topk(self) -> bool:
        """Whether the cache holds ``topk_ids`` / ``topk_logprobs`` (kinds topk and hybrid)."""
        return self.targets != "sample"

    @property
    def has_samples(self) -> bool:
        """Whether the cache holds the ``sample_*`` arrays (kinds sample and hybrid)."""
        return self.targets != "topk"

    @property
    def counts_dtype(self) -> np.dtype:
        """The dtype of ``sample_counts``: uint8 for up to 255 draws per position, else uint16."""
        return np.dtype("uint8") if self.samples <= 255 else np.dtype("uint16")

    @property
    def ids_dtype(self) -> np.dtype:
        """The dtype of ``input_ids`` and ``topk_ids`` (uint16 or uint32, from V)."""
        return ids_dtype_for_vocab(self.vocab_size)

    @property
    def num_shards(self) -> int:
        """ceil(N / S): the number of shards of every array."""
        return -(-self.num_sequences // self.shard_seqs)

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        """Sequence range [start, stop) of a shard."""
        if not 0 <= shard_index < self.num_shards:
            raise IndexError(f"shard {shard_index} out of range [0, {self.num_shards})")
        start = shard_index * self.shard_seqs
        return start, min(start + self.shard_seqs, self.num_sequences)

    def arrays(self) -> list[ArraySpec]:
        """The arrays of this layout, in manifest order (see :func:`array_specs`)."""
        return array_specs(self)

    def bytes_per_token_uncompressed(self) -> float:
        """Uncompressed bytes per position over all arrays."""
        return sum(spec.bytes_per_sequence() for spec in self.arrays()) / self.seq_len


def _check_targets(layout: CacheLayout) -> None:
    """The target-kind fields of a layout agree with each other (ValueError naming the build flag)."""
    kind, K, D, W = layout.targets, layout.topk, layout.samples, layout.sample_slots
    if kind not in TARGET_KINDS:
        raise ValueError(f"targets must be one of {TARGET_KINDS}, got {kind!r}")
    if not isinstance(K, (int, np.integer)) or isinstance(K, bool) or K < 0:
        raise ValueError(f"topk must be a non-negative integer, got {K!r}")
    if kind == "sample" and K:
        raise ValueError(f"a sample cache stores no top-k (topk={K}): drop --topk, or use --targets hybrid "
                         "for an exact head plus samples")
    if kind != "sample" and K == 0:
        raise ValueError(f"topk must be a positive integer for --targets {kind} (pass --topk K)")
    if kind == "topk" and K > layout.vocab_size:
        raise ValueError(f"topk={K} is larger than the teacher vocabulary ({layout.vocab_size}); "
                         f"use --topk {layout.vocab_size} or less")
    if kind == "hybrid" and K >= layout.vocab_size:
        raise ValueError(f"a hybrid head of topk={K} leaves nothing of the vocabulary ({layout.vocab_size}) to "
                         f"sample; use --topk {layout.vocab_size - 1} or less")
    if kind == "topk":
        if D or W:
            raise ValueError(f"samples ({D}) and sample_slots ({W}) are for --targets sample or hybrid")
        return
    for name, value in (("samples", D), ("sample_slots", W)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer for --targets {kind}, got {value!r}")
    if D > MAX_SAMPLES:
        raise ValueError(f"samples={D} is more than {MAX_SAMPLES} draws per position (counts are uint16)")
    if W > D:
        raise ValueError(f"sample_slots={W} is more than samples={D}: D draws have at most D distinct ids; "
                         f"use --sample-slots {D} or less (the default is --samples)")
    tau = layout.sample_temperature
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"sample_temperature must be a positive finite number, got {tau!r}")
    if float(tau) != 1.0 and float(tau) not in [float(t) for t in layout.temperatures]:
        raise ValueError(f"sample_temperature {tau!r} must also be a build temperature (its logsumexp is stored)")


def array_specs(layout: CacheLayout) -> list[ArraySpec]:
    """The arrays of a cache, in manifest order (the module docstring lists them per target kind)."""
    T, K = layout.seq_len, layout.topk
    ids = layout.ids_dtype
    logprobs = np.dtype(layout.logprob_dtype)
    specs = [ArraySpec("input_ids", ids, (T,))]
    if layout.offsets:
        specs += [ArraySpec("token_doc", np.dtype("uint32"), (T,)), ArraySpec("token_bytes", np.dtype("uint32"), (T, 2))]
    if layout.has_topk:
        specs += [ArraySpec("topk_ids", ids, (T, K)), ArraySpec("topk_logprobs", logprobs, (T, K))]
    if layout.has_samples:
        W = layout.sample_slots
        specs += [ArraySpec("sample_ids", ids, (T, W)), ArraySpec("sample_counts", layout.counts_dtype, (T, W))]
        if layout.sample_logprobs:
            specs.append(ArraySpec("sample_logprobs", logprobs, (T, W)))
    specs.append(ArraySpec("lse", np.dtype("float32"), (T,)))
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

    Inner chunks near ``target_chunk_bytes`` uncompressed keep Blosc/zstd at full speed and a random read
    small; shards near ``target_shard_bytes`` bound the work lost to a crash and keep the number of files
    manageable for very large caches. docs/FORMAT.md (Appendix A) has the measurements behind the defaults.

    Args:
        seq_len: T.
        topk: K.
        vocab_size: V (decides the ids dtype, hence the row size).
        num_sequences: N; when given, neither a chunk nor a shard is planned larger than the cache.
        target_chunk_bytes: uncompressed ``topk_ids`` bytes per inner chunk to aim for.
        target_shard_bytes: uncompressed ``topk_ids`` bytes per shard to aim for.

    Returns:
        ``(shard_seqs, chunk_seqs)``, with shard_seqs a multiple of chunk_seqs.
    """
    row_bytes = seq_len * topk * ids_dtype_for_vocab(vocab_size).itemsize
    chunk_seqs = max(1, target_chunk_bytes // row_bytes)
    chunks_per_shard = max(1, target_shard_bytes // (chunk_seqs * row_bytes))
    if num_sequences is not None:
        # Never plan shards (or chunks) larger than the whole cache: tiny caches stay tiny on disk.
        chunk_seqs = min(chunk_seqs, num_sequences)
        chunks_per_shard = min(chunks_per_shard, -(-num_sequences // chunk_seqs))
    return chunk_seqs * chunks_per_shard, chunk_seqs
