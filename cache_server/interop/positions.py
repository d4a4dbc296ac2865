"""One imported row in kdcache's convention, and what it becomes in a shard: filled gaps, sequence statistics.

Every reader (``axolotl.py``, ``distillkit.py``, ``vllm.py``, ``topk_parquet.py``) turns its source's rows into
:class:`SourceRow` s that follow ``cache_server.format.ALIGNMENT_CONVENTION`` (position t holds the teacher's
distribution over token t + 1); what the source convention was is the reader's business.

A kdcache cache has no mask: every position holds a distribution. Positions a source has no teacher data for
(the last one of a vLLM or DistillKit row, axolotl's padded/masked rows, entries of -inf) are FILLED: a
position without any entry becomes one-hot on its next token (the KD term there equals cross-entropy on the
label; the last position, whose label the loaders ignore, one-hot on id 0), and a missing entry of a position
that has others gets an unused id with the dtype's most negative log-prob (probability 0). The counts go to
the manifest's ``provenance``.

Shape notation::

    L  positions of a source row      T  positions kept (--seq-len)      K  entries per position
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SourceRow", "FillCounts", "fill_row", "sequence_stats"]


@dataclass
class SourceRow:
    """One source row in kdcache's convention (``valid[t]``: the source has teacher data for position t)."""

    input_ids: np.ndarray  # [L] int64
    ids: np.ndarray  # [L, K] int64
    logprobs: np.ndarray  # [L, K] float32; non-finite: the entry is missing
    valid: np.ndarray  # [L] bool
    lse: np.ndarray | None = None  # [L] float32: full-vocabulary logsumexp of the raw logits, when the source has it
    lse_t: dict[str, np.ndarray] | None = None  # lse at extra temperatures by array name (kdcache's own export)

    def __post_init__(self) -> None:
        L = self.input_ids.shape[0]
        if self.ids.shape != self.logprobs.shape or self.ids.shape[0] != L or self.valid.shape != (L,):
            raise ValueError(f"row shapes disagree: input_ids {self.input_ids.shape}, ids {self.ids.shape}, "
                             f"logprobs {self.logprobs.shape}, valid {self.valid.shape}")


@dataclass
class FillCounts:
    """Positions and entries :func:`fill_row` had to fill (sums over the rows written)."""

    positions: int = 0
    entries: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"filled_positions": self.positions, "filled_entries": self.entries}


def _placeholder_ids(first: np.ndarray, K: int) -> np.ndarray:
    """[P, K] distinct ids per position: ``first`` then the K-1 smallest other ids."""
    j = np.arange(K - 1, dtype=np.int64)[None, :]
    others = j + (j >= first[:, None])
    return np.concatenate([first[:, None], others], axis=1)


def fill_row(row: SourceRow, T: int, K: int, logprob_dtype: np.dtype, counts: FillCounts,
             where: str) -> tuple[np.ndarray, np.ndarray]:
    """The first T positions of ``row`` as (ids [T, K] int64, logprobs [T, K] in ``logprob_dtype``), gaps filled.

    A source with more than K entries per position keeps its K largest. Log-probs are clipped into
    [dtype min, 0]. ``where`` names the row in errors.

    Raises:
        ValueError: a position lists one id twice, or an id is negative.
    """
    ids = row.ids[:T].astype(np.int64)
    lp = row.logprobs[:T].astype(np.float32)
    if ids.shape[1] > K:
        keep = np.argsort(-np.nan_to_num(lp, nan=-np.inf), axis=1, kind="stable")[:, :K]
        ids, lp = np.take_along_axis(ids, keep, 1), np.take_along_axis(lp, keep, 1)
    finite = np.isfinite(lp)
    has_data = row.valid[:T] & finite.any(axis=1)
    low = float(np.finfo(logprob_dtype).min)
    nxt = np.zeros(T, dtype=np.int64)
    nxt[:-1] = row.input_ids[1:T]
    empty = np.flatnonzero(~has_data)
    if empty.size:
        ids[empty] = _placeholder_ids(nxt[empty], K)
        lp[empty] = low
        lp[empty, 0] = 0.0
        counts.positions += int(empty.size)
    partial = np.flatnonzero(has_data & ~finite.all(axis=1))
    for t in partial:  # rare: a source with fewer than K entries at a position
        missing = ~finite[t]
        present = set(ids[t, ~missing].tolist())
        spare = [i for i in range(K + len(present)) if i not in present][: int(missing.sum())]
        ids[t, missing] = spare
        lp[t, missing] = low
        counts.entries += int(missing.sum())
    if (ids < 0).any():
        raise ValueError(f"{where} holds a negative token id ({int(ids.min())})")
    ordered = np.sort(ids, axis=1)
    dup = np.flatnonzero((np.diff(ordered, axis=1) == 0).any(axis=1))
    if dup.size:
        t = int(dup[0])
        twice = int(ordered[t][np.flatnonzero(np.diff(ordered[t]) == 0)[0]])
        raise ValueError(f"{where} lists token id {twice} twice at position {t}; each position needs K distinct ids")
    return ids, np.clip(lp, low, 0.0).astype(logprob_dtype)


def sequence_stats(input_ids: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``seq_nll`` [n] and ``seq_entropy`` [n] from the stored top-k alone (an import has no full logits).

    nll: mean over positions 0..T-2 of -log p(x_{t+1}), with p = min(p_K, tail) (an upper bound of the true
    probability, so a lower bound of the NLL) where the next token is not stored; entropy: the top-k entropy
    plus the tail as one bucket (a lower bound of the full-vocabulary entropy). Exact when K = V.

    Args:
        input_ids: [n, T] tokens; ids / logprobs: [n, T, K] the stored entries.
    """
    lp = logprobs.astype(np.float64)
    p = np.exp(lp)
    tail = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)  # [n, T]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(p * lp).sum(axis=-1) - np.where(tail > 0, tail * np.log(np.where(tail > 0, tail, 1.0)), 0.0)
        hit = ids[:, :-1] == input_ids[:, 1:, None]  # [n, T-1, K]
        known = np.where(hit, lp[:, :-1], -np.inf).max(axis=-1)
        floor = np.log(np.where(tail[:, :-1] > 0, np.minimum(p[:, :-1].min(axis=-1), tail[:, :-1]),
                                p[:, :-1].min(axis=-1)))
        nll = -np.where(hit.any(axis=-1), known, floor)
    nll = np.nan_to_num(nll, posinf=np.finfo(np.float32).max / 4)
    return nll.mean(axis=1).astype(np.float32), entropy.mean(axis=1).astype(np.float32)
