"""Which sequences a student trains on: the hardest, a bag, a cluster, the teacher-vs-reference difference.

Shape notation::

    N  sequences in the cache      M  sequences a helper selects

Every helper returns what ``kdlib.make_loader`` takes: sorted distinct indices [M] int64 (``subset=``), or
per-sequence counts [N] int64 (``weights=``). All are deterministic functions of their arguments (a seed where
there is randomness).

* :func:`top_fraction` / :func:`hardest`: the ``ceil(fraction * N)`` highest scores (boosting on the top-q %
  by student-vs-teacher KL, ``kdlib.selection.score_sequences``); ties go to the lower index.
* :func:`bagging`: ``round(f * N)`` draws with replacement, f uniform in [0.6, 0.8] from the seed unless
  given: the distinct sequences drawn (≈ 1 - exp(-f) of N), or every sequence's count.
* :func:`cluster_subsets`: one subset per cluster label (specialization).
* :func:`difference_scores` / :func:`difference_sampling`: MiniPLM-style difference sampling,
  ``score = ref_nll - teacher_nll`` per sequence (the cache's ``seq_nll`` against a small reference model's
  NLL, streamed by ``reference_nll`` or passed as an array), the top fraction kept: sequences the big teacher
  finds much easier than the small reference model are where it knows more.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Sequence

import numpy as np

from kdlib.order import seed64

from .scores import reference_nll

__all__ = ["top_fraction", "hardest", "bagging", "cluster_subsets", "difference_scores", "difference_sampling"]


def _check_fraction(fraction: float, what: str = "fraction") -> float:
    value = float(fraction)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be in (0, 1] (a share of the sequences, e.g. 0.1 for 10 %), got {fraction!r}")
    return value


def _check_scores(scores: Any, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (one score per sequence), got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} has {bad.size} NaN/inf value(s), e.g. at sequences {bad[:5].tolist()}; score "
                         "them again (kdlib.selection.score_sequences never returns NaN) or drop them first")
    return arr


def top_fraction(scores: Any, fraction: float) -> np.ndarray:
    """Sorted indices [M] int64 of the ``M = ceil(fraction * N)`` highest scores (ties: lower index first).

    Raises:
        ValueError: scores not a non-empty 1-D finite array, or fraction outside (0, 1].
    """
    arr = _check_scores(scores)
    keep = max(1, math.ceil(_check_fraction(fraction) * arr.size - 1e-9))  # 0.1 * 30 is 3, not 3.0000000000000004
    by_rank = np.lexsort((np.arange(arr.size), -arr))  # descending score, then ascending index
    return np.sort(by_rank[:keep]).astype(np.int64)


def hardest(scores: Any, fraction: float = 0.1) -> np.ndarray:
    """The top-q % hardest sequences for a boosting round: :func:`top_fraction` of per-sequence KL scores."""
    return top_fraction(scores, fraction)


def bagging(num_sequences: int, *, seed: int = 0, fraction: float | None = None, low: float = 0.6,
            high: float = 0.8, as_counts: bool = False) -> np.ndarray:
    """A bootstrap bag: ``round(fraction * N)`` sequences drawn uniformly with replacement, seeded.

    Args:
        num_sequences: N.
        seed: the bag's seed (one bag per ensemble member: seed = member number).
        fraction: the bag's size as a share of N; default drawn uniformly from [low, high] with the seed.
        low, high: the range of the drawn fraction (default 60-80 %).
        as_counts: return every sequence's count [N] int64 (for ``make_loader(weights=counts,
            num_samples=int(counts.sum()))``), else the sorted distinct sequences drawn [M] (for ``subset=``).

    Raises:
        ValueError: N < 1, a fraction outside (0, 1], or not 0 < low <= high <= 1.
    """
    if int(num_sequences) < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"need 0 < low <= high <= 1 for the bag's fraction range, got low={low}, high={high}")
    seed_u64 = seed64(seed)
    rng = np.random.default_rng([seed_u64 & 0xFFFFFFFF, seed_u64 >> 32, 0xBA6])  # 0xBA6: the bagging stream
    share = rng.uniform(low, high) if fraction is None else _check_fraction(fraction)
    draws = rng.integers(0, int(num_sequences), size=max(1, round(share * int(num_sequences))))
    counts = np.bincount(draws, minlength=int(num_sequences)).astype(np.int64)
    return counts if as_counts else np.flatnonzero(counts).astype(np.int64)


def cluster_subsets(labels: Any, *, ignore: Sequence[Hashable] = ()) -> dict[Any, np.ndarray]:
    """One subset per cluster: ``{label: sorted indices [M] int64 of the sequences with that label}``.

    Args:
        labels: [N] one cluster label per sequence (ints or strings, e.g. from k-means over embeddings).
        ignore: labels to leave out (e.g. ``(-1,)``, HDBSCAN's noise).

    Raises:
        ValueError: labels not a non-empty 1-D array, or every label ignored.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array (one cluster label per sequence), got shape "
                         f"{arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("labels has NaN/inf values: give every sequence a cluster (or a label to ignore)")
    skip = set(ignore)
    subsets = {label.item() if hasattr(label, "item") else label: np.flatnonzero(arr == label).astype(np.int64)
               for label in np.unique(arr) if label not in skip}
    if not subsets:
        raise ValueError(f"every label is ignored (ignore={list(ignore)}): no cluster is left")
    return subsets


def difference_scores(cache: Any, reference: Any, **stream_kwargs: Any) -> np.ndarray:
    """Per-sequence ``ref_nll - teacher_nll`` [N] float32 (MiniPLM's difference; high = the teacher knows more).

    Args:
        cache: an open cache (its ``seq_nll`` is the teacher's mean NLL per sequence).
        reference: the reference model's NLL per sequence [N] (same convention: mean over positions 0..T-2),
            or the reference model itself, run by :func:`kdlib.selection.reference_nll` (streamed, resumable).
        **stream_kwargs: :func:`~kdlib.selection.reference_nll` options (``batch_size``, ``out``, ``device``...).

    Raises:
        ValueError: a reference array of another length, or with NaN/inf.
    """
    teacher = cache.sequence_stats()["seq_nll"].numpy().astype(np.float64)  # [N]
    if callable(reference):  # a model (arrays and tensors are not callable)
        ref = reference_nll(reference, cache, **stream_kwargs).astype(np.float64)
    else:
        ref = _check_scores(reference, "reference NLL")
    if ref.shape != teacher.shape:
        raise ValueError(f"the reference NLL has {ref.shape[0]} entries but the cache has {teacher.shape[0]} "
                         "sequences: compute it over this cache (kdlib.selection.reference_nll)")
    return (ref - teacher).astype(np.float32)


def difference_sampling(cache: Any, reference: Any, fraction: float = 0.5,
                        **stream_kwargs: Any) -> np.ndarray:
    """MiniPLM-style difference sampling: sorted indices [M] of the top ``fraction`` of :func:`difference_scores`."""
    return top_fraction(difference_scores(cache, reference, **stream_kwargs), fraction)
