"""Synthetic caches written through the real writer (fast; no teacher needed).

Values are shaped like real teacher output: unique top-k ids per position, log-probs sorted descending
with Σ exp < 1 (a real tail), a peaked head with outliers, and matching per-temperature logsumexps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache_server import format as fmt
from cache_server.build.writer import CacheWriter
from cache_server.format import slots

__all__ = ["synthetic_arrays", "make_synthetic_cache"]


def synthetic_arrays(
    num_sequences: int, seq_len: int, topk: int, vocab_size: int, temperatures=(), seed: int = 0,
    logprob_dtype: str = "float16",
) -> dict[str, np.ndarray]:
    """Full-vocab teacher logits → exact top-k/lse arrays, for small vocabularies."""
    rng = np.random.default_rng(seed)
    ids_dtype = fmt.ids_dtype_for_vocab(vocab_size)
    N, T, K, V = num_sequences, seq_len, topk, vocab_size
    input_ids = rng.integers(0, V, size=(N, T)).astype(ids_dtype)
    out = {
        "input_ids": input_ids,
        "topk_ids": np.empty((N, T, K), ids_dtype),
        "topk_logprobs": np.empty((N, T, K), logprob_dtype),
        "lse": np.empty((N, T), np.float32),
        "seq_nll": np.empty((N,), np.float32),
        "seq_entropy": np.empty((N,), np.float32),
    }
    for tau in temperatures:
        out[fmt.temperature_key(tau)] = np.empty((N, T), np.float32)
    for n in range(N):
        logits = rng.standard_normal((T, V)) * 2.0
        logits[np.arange(T), rng.integers(0, V, T)] += 12.0  # peaked head
        lse = np.logaddexp.reduce(logits, axis=-1)
        logprobs = logits - lse[:, None]
        order = np.argsort(-logprobs, axis=-1, kind="stable")[:, :K]
        out["topk_ids"][n] = order
        out["topk_logprobs"][n] = np.take_along_axis(logprobs, order, axis=-1)
        out["lse"][n] = lse
        for tau in temperatures:
            out[fmt.temperature_key(tau)][n] = np.logaddexp.reduce(logits / tau, axis=-1)
        nxt = input_ids[n, 1:].astype(np.int64)
        out["seq_nll"][n] = -logprobs[np.arange(T - 1), nxt].mean() if T > 1 else 0.0
        out["seq_entropy"][n] = -(np.exp(logprobs) * logprobs).sum(-1).mean()
    return out


def make_synthetic_cache(
    out_dir: str | Path,
    num_sequences: int = 20,
    seq_len: int = 16,
    topk: int = 4,
    vocab_size: int = 100,
    temperatures=(),
    shard_seqs: int = 8,
    chunk_seqs: int = 4,
    seed: int = 0,
    codec: str = fmt.DEFAULT_CODEC,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write a complete cache and return (directory, the arrays as readers decode them)."""
    layout = fmt.CacheLayout(
        num_sequences=num_sequences, seq_len=seq_len, topk=topk, vocab_size=vocab_size,
        temperatures=tuple(temperatures), shard_seqs=shard_seqs, chunk_seqs=chunk_seqs, codec=codec,
    )
    arrays = synthetic_arrays(num_sequences, seq_len, topk, vocab_size, temperatures, seed)
    writer = CacheWriter(out_dir, layout, settings={"synthetic_seed": seed},
                         manifest_fields={"teacher": {"name": "synthetic"}})
    for i in writer.pending_shards():
        a, b = layout.shard_range(i)
        writer.write_shard(i, {k: v[a:b] for k, v in arrays.items()})
    writer.finalize()
    # What readers decode: format v2 restores the canonical slot order (fp16 ties by ascending id).
    return Path(out_dir), slots.canonicalize(layout, arrays)
