"""DistillKit's compressed-logit Parquet (arcee-ai/DistillKit): read for ``kdcache import --from distillkit``.

``distillkit/sample_logits_vllm.py`` writes ``data_{i}.parquet`` files with ``compressed_logit_schema()``
(``sample_common.py``) and ``compression_config.yaml`` beside them::

    input_ids            list<uint64>          [L]      the prompt tokens (a pad token appended to short rows)
    compressed_logprobs  list<list<uint8>>     [L-1, B] per position the codec bytes (``distillkit_codec.py``)
    bytepacked_indices   list<list<uint8>>     [L-1, ceil(k * ceil(log2 d) / 8)]

Position j is vLLM's ``prompt_logprobs[j + 1]`` (the first, empty entry dropped): the distribution over token
j+1, kdcache's convention; the last token has none (filled). The values are vLLM's raw log-probs (normalized
over the full vocabulary), so the tail is implied, up to the codec's error: the polynomial part and the
quantized residuals are lossy (``provenance.codec_error``). The legacy ``packed_indices``/``exact_values``/
``coeffs`` layout is not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from cache_server.interop.distillkit_codec import CodecConfig, decode_logprobs, index_bits, unpack_bits
from cache_server.interop.positions import SourceRow
from cache_server.interop.source import Source
from cache_server.interop.tables import InteropError, column_names, iter_batches, list_rows, nested_rows, source_files

__all__ = ["DISTILLKIT_COLUMNS", "CONFIG_NAME", "DistillKitSource", "open_distillkit", "load_codec_config"]

DISTILLKIT_COLUMNS = ("input_ids", "compressed_logprobs", "bytepacked_indices")
CONFIG_NAME = "compression_config.yaml"


def load_codec_config(path: Path) -> CodecConfig:
    """The codec settings from DistillKit's YAML (``compression_config.yaml`` or a training config with
    ``logprob_compressor``)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
        return CodecConfig.from_dict(raw.get("teacher", raw) if isinstance(raw, dict) else raw)
    except (OSError, yaml.YAMLError, ValueError, TypeError, KeyError) as exc:
        raise InteropError(f"cannot read the DistillKit compression config {path} ({exc})") from exc


class DistillKitSource(Source):
    """DistillKit compressed-logit Parquet file(s) and their codec settings."""

    config: CodecConfig | None = None

    def rows(self) -> Iterator[SourceRow]:
        config = self.config
        bits = index_bits(config.d)
        for batch in iter_batches(self.files, list(DISTILLKIT_COLUMNS)):
            tokens = list_rows(batch.column("input_ids"), "input_ids")
            values = nested_rows(batch.column("compressed_logprobs"), "compressed_logprobs")
            packed = nested_rows(batch.column("bytepacked_indices"), "bytepacked_indices")
            for x, v, p in zip(tokens, values, packed):
                L, R = x.shape[0], v.shape[0]
                if R > L or p.shape[0] != R:
                    raise ValueError(f"a DistillKit row has {L} input_ids, {R} compressed positions and "
                                     f"{p.shape[0]} packed index rows; expected L-1 of each")
                ids = np.zeros((L, config.k), dtype=np.int64)
                lp = np.full((L, config.k), -np.inf, dtype=np.float32)
                if R:
                    with np.errstate(invalid="ignore", over="ignore"):
                        lp[:R] = decode_logprobs(v, config)
                    ids[:R] = unpack_bits(p, bits, config.k)
                valid = np.zeros(L, dtype=bool)
                valid[:R] = True
                yield SourceRow(x.astype(np.int64), ids, lp, valid & np.isfinite(lp).any(axis=1))


def open_distillkit(src: str | Path, compression_config: str | Path | None = None) -> DistillKitSource:
    """Open DistillKit's output directory (or file(s) plus ``compression_config``)."""
    files = source_files(src, (".parquet",))
    names = column_names(files[0])
    if "packed_indices" in names and "compressed_logprobs" not in names:
        raise InteropError(f"{files[0]} uses DistillKit's legacy compression (packed_indices/exact_values/coeffs), "
                           "which kdcache does not read; recapture with a logprob_compressor config")
    path = Path(compression_config) if compression_config else (Path(src) if Path(src).is_dir()
                                                                 else Path(src).parent) / CONFIG_NAME
    if not path.exists():
        raise InteropError(f"no DistillKit compression config at {path}; pass --compression-config FILE (the "
                           "logprob_compressor settings the logits were captured with)")
    config = load_codec_config(path)
    lossy = config.exact_k < config.k
    source = DistillKitSource(
        kind="distillkit", path=Path(src), files=files, vocab_size=config.d,
        provenance={"lacks": "no full-vocabulary logsumexp: the tail is what vLLM's raw log-probs imply; the "
                             "last position of each row has no data (filled)",
                    "codec": {"k": config.k, "exact_k": config.exact_k, "exact_dtype": config.exact_dtype,
                              "polynomial_terms": list(config.polynomial_terms),
                              "residual_bins": [list(b) for b in config.residual_bins],
                              "delta_encoding": config.delta_encoding},
                    "codec_error": (f"lossy: entries {config.exact_k + 1}..{config.k} of each position are a "
                                    "polynomial fit plus quantized residuals (DistillKit's codec), the first "
                                    f"{config.exact_k} are {config.exact_dtype}") if lossy else
                                   f"exact up to {config.exact_dtype} rounding"},
        shift_fix={-1: "The rows' positions are shifted against input_ids: check that input_ids are the tokens "
                       "the logits were captured for."})
    source.config = config
    return source
