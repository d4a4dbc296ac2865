"""Hard-example selection: score every cached sequence, then pick what a student trains on.

* :func:`score_sequences` — per-sequence student-vs-teacher KL in one streaming, resumable no-grad pass.
* :func:`reference_nll` — a reference model's per-sequence NLL, the same way.
* :func:`hardest` / :func:`top_fraction`, :func:`bagging`, :func:`cluster_subsets`, :func:`difference_sampling`
  (with :func:`difference_scores`) — subsets for ``kdlib.make_loader(cache, B, subset=...)`` or counts for
  ``weights=``.

See docs/SELECTION.md for the workflows (boosting, bagging, specialization, MiniPLM-style difference sampling).
"""

from .scores import model_fingerprint, reference_nll, score_sequences, stream_scores
from .subsets import bagging, cluster_subsets, difference_sampling, difference_scores, hardest, top_fraction

__all__ = [
    "bagging",
    "cluster_subsets",
    "difference_sampling",
    "difference_scores",
    "hardest",
    "model_fingerprint",
    "reference_nll",
    "score_sequences",
    "stream_scores",
    "top_fraction",
]
