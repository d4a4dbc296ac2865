"""The student side of sample and hybrid targets: the loss of weights a_j on ids, fused and naive.

Shape notation:
    N: rows (flattened positions), V: vocabulary, S: weighted ids per row (:class:`~.targets.WeightedTargets`).

:mod:`kdlib.losses.targets` turns sample and hybrid targets into weights a_j ≥ 0 on ids id_j and a teacher
term t_r (none of them depends on the student). With u = z/τ, log q^τ = log_softmax(u), A = Σ_j a_j,
kd_scale = kd_weight · τ² (tau_squared), c1 = ce_weight:

    L_r = kd_scale · (A · logsumexp(u) − Σ_j a_j u_{id_j} + t_r) + c1 · CE(z, label)        (valid rows; else 0)

    dL_r/dz_k = c1 · softmax(z)_k + ct · softmax(u)_k − c1 [k = label] − (kd_scale/τ) Σ_{j: id_j = k} a_j,
    ct = kd_scale · A / τ

i.e. exactly the fused top-k pass's shape ("per-row scalars × softmax, then S complete values"), so the V-wide
work is the same backend pass (:func:`kdlib.losses.backends.row_stats` and the backend's ``write_grad``: the
PyTorch chunks on CPU, the Triton kernels on CUDA). The S entries are written as complete values (dense part +
every slot's term for that id): duplicate ids (padding slots, a head id repeated as a padding id 0) all carry
the same total (:func:`slot_totals`), so the order of the scattered writes does not matter.

:func:`weighted_rows_reference` is the naive twin (full log_softmax, autograd) the fused pass is tested on.
"""

from __future__ import annotations

import torch

from . import torch_pass
from .backends import RowLossAndGrad, row_stats
from .options import KDLossOptions
from .targets import WeightedTargets

__all__ = ["weighted_loss_and_grad", "weighted_rows_reference", "slot_totals"]


def slot_totals(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per slot [N, S]: the sum of ``values`` [N, S] over the slots of its row holding the same id.

    Sort-based segment sums on the device (no host sync, no [N, V] buffer, no cancellation): ids sorted per
    row, a segment number per run of equal ids, ``index_add_`` per (row, segment), gathered back.
    """
    n, width = ids.shape
    if width == 0:
        return values
    sorted_ids, order = ids.sort(dim=1)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = starts.to(torch.int64).cumsum(1) - 1  # [N, S] 0.. per row, in sorted order
    keys = segment + torch.arange(n, device=ids.device).unsqueeze(1) * width  # [N, S]
    totals = torch.zeros(n * width, dtype=values.dtype, device=values.device)
    totals.index_add_(0, keys.reshape(-1), values.gather(1, order).reshape(-1))
    out = torch.empty_like(values)
    out.scatter_(1, order, totals[keys.reshape(-1)].reshape(n, width))
    return out


def weighted_loss_and_grad(logits: torch.Tensor, targets: WeightedTargets, options: KDLossOptions,
                           backend_mod) -> RowLossAndGrad:
    """Forward on [N, V] logits: per-row losses and the backward's coefficients (module docstring)."""
    tau = float(options.temperature)
    c1, kd_scale = float(options.ce_weight), options.kd_scale
    stats = row_stats(backend_mod, logits, targets.ids, targets.safe_labels, tau, need_lse_1=c1 > 0 or tau == 1.0,
                      need_tail=False, chunk_rows=options.chunk_rows)
    cdt = stats.lse_t.dtype
    valid = targets.valid.to(cdt)
    weights = targets.weights.to(cdt)
    weight_sum = weights.sum(1)  # [N] A
    soft_ce = weight_sum * stats.lse_t - (weights * stats.logits_on_support).sum(1) / tau
    rows = kd_scale * (soft_ce + targets.teacher_term.to(cdt))
    coef_1 = c1 * valid  # [N]
    if c1 > 0:
        rows = rows + c1 * (stats.lse_1 - stats.logit_at_label)
    rows = torch.where(targets.valid, rows, 0.0)
    coef_t = (kd_scale / tau) * weight_sum * valid  # [N]
    # complete gradient values at the slots: the dense part (the same for equal ids) + every slot sharing the id
    on_slots = (stats.logits_on_support / tau - stats.lse_t.unsqueeze(1)).exp() * coef_t.unsqueeze(1)
    if c1 > 0:
        p1 = (stats.logits_on_support - stats.lse_1.unsqueeze(1)).exp()
        at_label = (targets.ids == targets.safe_labels.unsqueeze(1)).to(cdt)
        on_slots = on_slots + coef_1.unsqueeze(1) * (p1 - at_label)
    on_slots = on_slots + slot_totals(targets.ids, -(kd_scale / tau) * weights)
    return RowLossAndGrad(rows, stats.lse_1, stats.lse_t, coef_1, coef_t, on_slots)


def weighted_rows_reference(student_logits: torch.Tensor, targets: WeightedTargets,
                            options: KDLossOptions) -> torch.Tensor:
    """Naive per-row loss [N]: full log_softmax over [N, V], autograd for the gradient."""
    tau = float(options.temperature)
    z = student_logits.reshape(-1, student_logits.shape[-1])
    z = z.to(torch_pass.compute_dtype(z.dtype))  # [N, V]
    log_q = torch.log_softmax(z / tau, dim=-1)  # [N, V]
    soft_ce = -(targets.weights.to(z.dtype) * log_q.gather(1, targets.ids)).sum(1)  # [N]
    rows = options.kd_scale * (soft_ce + targets.teacher_term.to(z.dtype))
    if options.ce_weight > 0:
        ce = torch.nn.functional.cross_entropy(z, targets.safe_labels, reduction="none")  # [N]
        rows = rows + float(options.ce_weight) * ce
    return torch.where(targets.valid, rows, 0.0)
