"""Naive PyTorch reference for every kd_loss mode: full log_softmax, gathers, autograd for gradients.

Shape notation:
    N: rows, V: vocabulary, K: teacher top-k.

Written for clarity, not speed: it materializes [N, V] log-probabilities (and a dense teacher for
``renormalize``) so that it checks the fused backends by a different route. In particular the student's
tail mass is an explicit masked logsumexp over the complement of S, and ``renormalize`` sums the
per-id terms over the whole vocabulary instead of using the tail-category shortcut. Sample and hybrid
targets take :func:`kdlib.losses.weighted.weighted_rows_reference` (the same naive route).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from ._inputs import reduce_rows, teacher_side
from .options import KDLossOptions, resolve_options
from .sparse_math import LOG_TAIL_FLOOR
from .targets import SampleTargets, WeightedTargets, flatten_any
from .torch_pass import compute_dtype
from .weighted import weighted_rows_reference

__all__ = ["kd_loss_reference"]


def _f(divergence: str, t: torch.Tensor, s: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-category divergence term with teacher mass t and student mass s (0 log 0 = 0)."""
    if divergence == "forward_kl":
        return torch.xlogy(t, t) - torch.xlogy(t, s)
    if divergence == "reverse_kl":
        return torch.xlogy(s, s) - torch.xlogy(s, t)
    if divergence == "jsd":
        m = beta * t + (1 - beta) * s
        return beta * (torch.xlogy(t, t) - torch.xlogy(t, m)) + (1 - beta) * (torch.xlogy(s, s) - torch.xlogy(s, m))
    return 0.5 * (t - s).abs()


def kd_loss_reference(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    teacher_lse_at_temperature: torch.Tensor | None = None,
    sample_ids: torch.Tensor | None = None,
    sample_counts: torch.Tensor | None = None,
    sample_logprobs: torch.Tensor | None = None,
    sample_temperature: float | torch.Tensor = 1.0,
    teacher_lse_sample_temperature: torch.Tensor | None = None,
    options: KDLossOptions | None = None,
    **option_kwargs: Any,
) -> torch.Tensor:
    """Same contract as :func:`kdlib.kd_loss` (see its docstring for every mode and target kind), computed
    naively.

    Takes the loss settings (``ce_weight`` ... ``reduction``) as keywords or ``options=``; ``backend``,
    ``validate`` and the chunking of an options object do not apply (ids and labels are always checked).
    """
    options = resolve_options(options, option_kwargs, entry_point="kd_loss_reference")
    if not options.validate:
        options = dataclasses.replace(options, validate=True)
    vocab = student_logits.shape[-1]
    lead = tuple(student_logits.shape[:-1])
    dtype = compute_dtype(student_logits.dtype)
    samples = SampleTargets.of(sample_ids, sample_counts, sample_logprobs, sample_temperature,
                               teacher_lse_sample_temperature)
    flat = flatten_any(lead, vocab, student_logits.device, dtype, topk_ids, topk_logprobs, labels, teacher_lse,
                       teacher_lse_at_temperature, samples, options)
    if isinstance(flat, WeightedTargets):
        return reduce_rows(weighted_rows_reference(student_logits, flat, options), flat.valid, options.reduction,
                           lead)
    z = student_logits.reshape(-1, vocab).to(dtype)  # [N, V]
    div = options.effective_divergence
    beta = float(options.beta)
    tail = options.tail

    logp = torch.log_softmax(z / options.temperature, dim=-1)  # [N, V]
    logp_s = logp.gather(-1, flat.topk_ids)  # [N, K]
    p_s = logp_s.exp()
    logq, log_tq = teacher_side(flat, options, dtype)
    q = logq.exp()  # [N, K]

    if tail == "none" or (tail == "renormalize" and div == "reverse_kl"):
        d = _f(div, q, p_s, beta).sum(-1)
    elif tail == "bucket":
        in_support = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, flat.topk_ids, True)
        log_student_tail = torch.logsumexp(logp.masked_fill(in_support, -math.inf), dim=-1)
        student_tail = log_student_tail.clamp_min(LOG_TAIL_FLOOR).exp()
        d = _f(div, q, p_s, beta).sum(-1) + _f(div, log_tq.exp(), student_tail, beta)
    else:  # renormalize: dense teacher over the full vocabulary, zero outside S
        q_dense = torch.zeros_like(logp).scatter_(-1, flat.topk_ids, q)
        d = _f(div, q_dense, logp.exp(), beta).sum(-1)

    valid = flat.valid
    zero = torch.zeros((), dtype=dtype, device=z.device)
    rows = torch.where(valid, options.kd_scale * d, zero)
    if options.ce_weight > 0:
        ce = F.cross_entropy(z, flat.safe_labels, reduction="none")
        rows = rows + torch.where(valid, options.ce_weight * ce, zero)
    return reduce_rows(rows, valid, options.reduction, lead)
