"""Sparse knowledge-distillation losses on cached teacher top-k log-probs, fused with cross-entropy.

Public API:

* :func:`kd_loss` — the loss on student logits [..., V] (fused PyTorch on CPU, Triton on CUDA), for the three
  target kinds of a cache: top-k, sampled (``sample_ids``/``sample_counts``) and hybrid (both); every entry
  point picks the kind from what it is given (:mod:`.targets`: the sampled and hybrid estimators).
* :class:`KDLoss` — ``nn.Module`` holding the options.
* :class:`KDLossOptions` — every loss setting with its default and validation; each entry point takes its
  fields as keyword arguments or ``options=KDLossOptions(...)``.
* :func:`kd_loss_from_batch` — takes the teacher tensors from a cache-reader batch.
* :func:`kd_loss_from_hidden` — from hidden states and the LM head, never materializing [N, V].
* :func:`kd_loss_reference` — the naive implementation every backend is tested against.
* :func:`sampled_kd_loss` / :func:`sampled_kd_loss_reference` — ``kd_loss`` / ``kd_loss_reference`` on sampled
  targets only (unbiased forward KL in value and gradient; importance-weighted when sampled at another
  temperature).

See docs/LOSSES.md for every formula, its gradient and the mapping to peers' conventions.
"""

from .api import KDLoss, kd_loss, kd_loss_from_batch, lse_key_for_temperature
from .fused_linear import kd_loss_from_hidden
from .options import KDLossOptions
from .reference import kd_loss_reference
from .sampled import sampled_kd_loss, sampled_kd_loss_reference
from .sparse_math import DIVERGENCES, TAILS

__all__ = [
    "DIVERGENCES",
    "KDLoss",
    "KDLossOptions",
    "TAILS",
    "kd_loss",
    "kd_loss_from_batch",
    "kd_loss_from_hidden",
    "kd_loss_reference",
    "lse_key_for_temperature",
    "sampled_kd_loss",
    "sampled_kd_loss_reference",
]
