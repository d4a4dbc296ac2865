"""Off-by-one detection by content: does position t's top-k hold token t+1 (kdcache's convention), or a neighbour?

A teacher puts the token that actually follows among its top-k far more often than the token before or
after it, so the hit rate of ``input_ids[t + 1 + d] in ids[t]`` over the positions with teacher data peaks at
the shift d the data really has. Where it peaks clearly away from d = 0, the import stops with an error that
names the shift (the usual case: a source that stores each token's own distribution at its position, d = -1).
Data whose hit rates are all low (random test data, a very weak teacher) cannot be judged and passes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SHIFTS", "ShiftHits", "check_shift"]

SHIFTS = (-1, 0, 1)
MIN_RATE = 0.2  # below this at the best shift nothing can be said
MIN_RATIO = 2.0  # the best shift must beat d = 0 by this factor to be called a misalignment


class ShiftHits:
    """Hit counts per shift, summed over rows (see the module docstring)."""

    def __init__(self) -> None:
        self.hits = {d: 0 for d in SHIFTS}
        self.positions = {d: 0 for d in SHIFTS}

    def add(self, input_ids: np.ndarray, ids: np.ndarray, valid: np.ndarray) -> None:
        """One row: input_ids [L], ids [L, K], valid [L]."""
        L = input_ids.shape[0]
        for d in SHIFTS:
            t = np.arange(L)
            target = t + 1 + d
            keep = valid & (target >= 0) & (target < L)
            if not keep.any():
                continue
            self.hits[d] += int((ids[keep] == input_ids[target[keep], None]).any(axis=1).sum())
            self.positions[d] += int(keep.sum())

    def rates(self) -> dict[int, float]:
        return {d: self.hits[d] / self.positions[d] if self.positions[d] else 0.0 for d in SHIFTS}


def check_shift(hits: ShiftHits, source: str, fix: dict[int, str]) -> dict[str, float]:
    """Raise ValueError if the content says the targets are shifted; return the rates (for the manifest).

    Args:
        hits: the counts over the source.
        source: the source's name in the error.
        fix: per shift d, what the user should pass to import the data correctly.
    """
    rates = hits.rates()
    best = max(rates, key=rates.get)
    if best != 0 and rates[best] >= MIN_RATE and rates[best] >= MIN_RATIO * rates[0]:
        meaning = {-1: "the distribution over token t itself (each token's own distribution at its position)",
                   1: "the distribution over token t+2 (targets one position early)"}[best]
        raise ValueError(
            f"{source}: the teacher's top-k at position t holds token t+{1 + best} in {rates[best]:.0%} of the "
            f"positions but the next token t+1 in only {rates[0]:.0%}: the targets are off by {best:+d}, i.e. "
            f"position t stores {meaning}. {fix.get(best, 'Realign the source before importing it.')}")
    return {f"hit_rate_shift_{d:+d}": round(r, 4) for d, r in rates.items()}
