"""DistillKit's compressed top-k log-prob codec (``DistributionQuantizationConfig``), in numpy.

The layout follows arcee-ai/DistillKit ``distillkit/compression/{config,bitpack,monotonic_logprobs}.py``
(``LogprobCompressor.compress_from_sparse`` / ``decompress_to_sparse``). Per position, K entries sorted by
descending log-prob, two byte strings:

    bytepacked_indices   the K ids, ceil(log2 d) bits each, MSB first, concatenated, zero-padded to a byte
    compressed_logprobs  [exact part][polynomial coefficients][per residual bin: scale, packed codes]

    exact part     the first ``exact_k`` values in ``exact_dtype`` (little-endian bytes)
    coefficients   ``len(polynomial_terms)`` values in ``term_dtype``: the least-squares fit of the remaining
                   K - exact_k values over t = 0..K-exact_k-1 (or linspace(0, 1) with ``normalize_t``); a term
                   is a power t^i or ``sqrt``/``exp`` of t
    residual bins  the fit's residuals, bin by bin: a scale (``scale_dtype``) = max |r| / 2^(b-1), then the
                   codes round(r / scale) clamped to [-2^(b-1), 2^(b-1) - 1], offset by +2^(b-1), b bits each
                   (b = 1: codes 0/1 for -scale/+scale); residuals past the bins are 0
    delta_encoding the values are first replaced by their successive differences (the first kept); decoding
                   takes the cumulative sum

Decoded values are as ``decompress_monotonic_logprobs`` gives them: residuals rounded to ``exact_dtype``, the
float32 polynomial fit added, concatenated after the exact part; with ``delta_encoding`` the cumulative sum is
rounded to ``exact_dtype``. The encoder here
is for tests and the storage benchmark: the naive quantizer (no error diffusion), as DistillKit's default.

Shape notation::

    R  positions    K  entries per position (config ``k``)    B  bytes per position
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

__all__ = ["CodecConfig", "pack_bits", "unpack_bits", "decode_logprobs", "encode_logprobs", "index_bits"]

_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": "bfloat16", "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class CodecConfig:
    """DistillKit's ``DistributionQuantizationConfig`` (the ``compression_config.yaml`` it writes beside the
    Parquet files; ``logprob_compressor`` in its training config)."""

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple[int | str, ...] = ()
    term_dtype: str = "float32"
    residual_bins: tuple[tuple[str, int, int], ...] = ()  # (scale_dtype, element_bits, num_elements)
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "CodecConfig":
        """From the YAML/JSON mapping DistillKit writes (``model_dump(mode="json")``); ValueError if invalid."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"the compression config must be a mapping, got {type(raw).__name__}")
        raw = dict(raw.get("logprob_compressor", raw))
        missing = [key for key in ("d", "k", "exact_k") if key not in raw]
        if missing:
            raise ValueError(f"the compression config lacks {missing} (DistillKit's DistributionQuantizationConfig)")
        bins = tuple((str(b["scale_dtype"]), int(b["element_bits"]), int(b["num_elements"]))
                     for b in raw.get("residual_bins") or [])
        config = cls(d=int(raw["d"]), k=int(raw["k"]), exact_k=int(raw["exact_k"]),
                     exact_dtype=str(raw.get("exact_dtype", "float32")),
                     polynomial_terms=tuple(raw.get("polynomial_terms") or ()),
                     term_dtype=str(raw.get("term_dtype", "float32")), residual_bins=bins,
                     delta_encoding=bool(raw.get("delta_encoding", True)),
                     error_diffusion=bool(raw.get("error_diffusion", False)),
                     normalize_t=bool(raw.get("normalize_t", False)))
        config.check()
        return config

    def check(self) -> None:
        for name in (self.exact_dtype, self.term_dtype, *(b[0] for b in self.residual_bins)):
            if name not in _DTYPES:
                raise ValueError(f"unknown dtype {name!r} in the compression config; DistillKit's are {list(_DTYPES)}")
        if not 0 <= self.exact_k <= self.k or self.d <= 0:
            raise ValueError(f"compression config needs d > 0 and 0 <= exact_k <= k, got d={self.d}, k={self.k}, "
                             f"exact_k={self.exact_k}")
        if sum(b[2] for b in self.residual_bins) > self.k - self.exact_k:
            raise ValueError("the residual bins hold more elements than k - exact_k")
        for term in self.polynomial_terms:
            if not (isinstance(term, int) or term in ("sqrt", "exp")):
                raise ValueError(f"polynomial term {term!r} is neither a power (int) nor 'sqrt'/'exp'")

    def logprob_bytes(self) -> int:
        """Bytes of one position's ``compressed_logprobs`` (``DistributionQuantizationConfig.logprob_bits``)."""
        bits = self.exact_k * 8 * _BYTES[self.exact_dtype] + len(self.polynomial_terms) * 8 * _BYTES[self.term_dtype]
        for scale_dtype, element_bits, count in self.residual_bins:
            bits += -(-(8 * _BYTES[scale_dtype] + element_bits * count) // 8) * 8
        return -(-bits // 8)


def index_bits(vocab_size: int) -> int:
    """Bits per packed id: ceil(log2 d), as DistillKit computes it (in float32)."""
    return int(math.ceil(float(np.log2(np.float32(vocab_size)))))


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[R, N] non-negative ints -> [R, ceil(N * bits / 8)] uint8, each value MSB first (``pack_to_bytes``)."""
    values = np.asarray(values, dtype=np.uint64) & np.uint64((1 << bits) - 1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((values[..., None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(*values.shape[:-1], -1)
    return np.packbits(stream, axis=-1)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[R, M] uint8 -> [R, count] int64 (``unpack_from_bytes``); ValueError if M bytes are too few."""
    packed = np.asarray(packed, dtype=np.uint8)
    if count * bits > packed.shape[-1] * 8:
        raise ValueError(f"{count} values of {bits} bits need {count * bits} bits, the bytes hold "
                         f"{packed.shape[-1] * 8}")
    stream = np.unpackbits(packed, axis=-1)[..., : count * bits].reshape(*packed.shape[:-1], count, bits)
    weights = (np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64))
    return (stream.astype(np.uint64) * weights).sum(axis=-1).astype(np.int64)


def _from_bytes(raw: np.ndarray, dtype: str, count: int) -> np.ndarray:
    """[R, count * size] uint8 -> [R, count] float32 values of ``dtype`` (little-endian; bfloat16 widened)."""
    raw = np.ascontiguousarray(raw)
    if dtype == "bfloat16":
        halves = raw.view("<u2").astype(np.uint32) << np.uint32(16)
        return halves.view(np.float32).reshape(raw.shape[0], count)
    return raw.view(_DTYPES[dtype]).reshape(raw.shape[0], count).astype(np.float32)


def _to_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """[R, n] float values -> [R, n * size] uint8 in ``dtype`` (bfloat16: round to nearest even)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "bfloat16":
        bits = values.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        return rounded.view(np.uint8).reshape(values.shape[0], -1)
    return values.astype(_DTYPES[dtype]).view(np.uint8).reshape(values.shape[0], -1)


def _round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    return _from_bytes(_to_bytes(values, dtype), dtype, values.shape[-1])


def _terms(config: CodecConfig, count: int) -> np.ndarray:
    """[count, terms] design matrix of the polynomial part (``polynomial_terms``)."""
    t = np.linspace(0, 1, count, dtype=np.float32) if config.normalize_t else np.arange(count, dtype=np.float32)
    columns = [t ** term if isinstance(term, int) else getattr(np, term)(t) for term in config.polynomial_terms]
    return np.stack(columns, axis=-1).astype(np.float32)


def decode_logprobs(raw: np.ndarray, config: CodecConfig) -> np.ndarray:
    """[R, B] ``compressed_logprobs`` bytes -> [R, K] float32 log-probs (``decompress_monotonic_logprobs``).

    Raises:
        ValueError: B is not the config's byte count (another config than the one the data was written with).
    """
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.shape[-1] != config.logprob_bytes():
        raise ValueError(f"compressed_logprobs has {raw.shape[-1]} bytes per position, but this compression config "
                         f"gives {config.logprob_bytes()}: use the config the logits were captured with")
    R, cursor = raw.shape[0], 0
    size = config.exact_k * _BYTES[config.exact_dtype]
    exact = _from_bytes(raw[:, :size], config.exact_dtype, config.exact_k)
    cursor = size
    approx_count = config.k - config.exact_k
    approx = np.zeros((R, approx_count), dtype=np.float32)
    coeffs = None
    if config.polynomial_terms:
        size = len(config.polynomial_terms) * _BYTES[config.term_dtype]
        coeffs = _from_bytes(raw[:, cursor:cursor + size], config.term_dtype, len(config.polynomial_terms))
        cursor += size
    start = 0
    for scale_dtype, element_bits, count in config.residual_bins:
        size = _BYTES[scale_dtype]
        scale = _from_bytes(raw[:, cursor:cursor + size], scale_dtype, 1)  # [R, 1]
        cursor += size
        packed = -(-(count * element_bits) // 8)
        codes = unpack_bits(raw[:, cursor:cursor + packed], element_bits, count)
        cursor += packed
        if element_bits == 1:
            approx[:, start:start + count] = (codes.astype(np.float32) * 2.0 - 1.0) * scale
        else:
            approx[:, start:start + count] = (codes - 2 ** (element_bits - 1)).astype(np.float32) * scale
        start += count
    approx = _round_to(approx, config.exact_dtype)  # DistillKit: residual.to(out_dtype), the exact dtype
    if coeffs is not None:
        approx = (_terms(config, approx_count)[None] * coeffs[:, None, :]).sum(axis=-1, dtype=np.float32) + approx
    values = np.concatenate([exact, approx], axis=-1)
    if config.delta_encoding:
        values = _round_to(np.cumsum(values, axis=-1, dtype=np.float32), config.exact_dtype)
    return values


def encode_logprobs(logprobs: np.ndarray, config: CodecConfig) -> np.ndarray:
    """[R, K] log-probs, descending along K -> [R, B] ``compressed_logprobs`` (``compress_monotonic_logprobs``
    with the naive quantizer); ValueError for error diffusion, which this encoder does not implement."""
    if config.error_diffusion:
        raise ValueError("this encoder implements DistillKit's naive quantizer only (error_diffusion: false)")
    values = np.asarray(logprobs, dtype=np.float32)
    if config.delta_encoding:
        values = np.concatenate([values[:, :1], np.diff(values, axis=-1)], axis=-1)
    chunks = [_to_bytes(values[:, : config.exact_k], config.exact_dtype)]
    residual = values[:, config.exact_k: config.k].astype(np.float64)
    if config.polynomial_terms:
        design = _terms(config, residual.shape[1]).astype(np.float64)
        u, sv, vh = np.linalg.svd(design, full_matrices=False)  # DistillKit: SVD, singular values <= 1e-5 cut
        inverse = np.where(sv > 1e-5, 1.0 / np.where(sv > 1e-5, sv, 1.0), 0.0)
        coeffs = _round_to(residual @ (u * inverse) @ vh, config.term_dtype)
        chunks.append(_to_bytes(coeffs, config.term_dtype))
        residual = residual - (design[None] * coeffs[:, None, :]).sum(axis=-1)
    start = 0
    for scale_dtype, element_bits, count in config.residual_bins:
        part = residual[:, start:start + count]
        top = 1.0 if element_bits == 1 else 2.0 ** (element_bits - 1)
        largest = np.abs(part).max(axis=-1, keepdims=True)
        scale = _round_to(np.where(largest == 0, 1.0, largest / top), scale_dtype).astype(np.float64)
        low, high = (0, 1) if element_bits == 1 else (-(2 ** (element_bits - 1)), 2 ** (element_bits - 1) - 1)
        codes = np.clip(np.rint(part / scale), low, high) - low
        chunks += [_to_bytes(scale, scale_dtype), pack_bits(codes.astype(np.int64), element_bits)]
        start += count
    return np.concatenate(chunks, axis=-1)
