"""Fused sparse-KD + CE loss: a torch.autograd.Function with the closed-form backward.

Shape notation:
    N: rows (flattened positions), V: vocabulary, K: teacher top-k (or the S weighted ids of sample / hybrid
    targets, :mod:`.weighted`: same passes, same backward).

Forward reads the [N, V] logits once (:func:`row_stats` of the backend: logsumexps, the student tail
without cancellation, k + 1 gathers; the Triton pass re-reads only rows whose tail is < 1 % of their
mass), does the K-wide math of :mod:`.sparse_math` on [N, K] tensors, and saves only [N] and
[N, K] tensors. Backward reads the logits once more and writes the gradient once:

    dL_r/dz_j = c1_r · softmax(z_r)_j + ct_r · softmax(z_r / τ)_j − c1_r [j = label_r]     (j ∉ S)
    dL_r/dz_i = g_ri                                                                       (i ∈ S)
    with c1 = ce_weight, ct = kd_scale · a / τ, g = kd_scale · dD/du_S / τ + ce_weight (softmax(z)_S − [S = label])

(kd_scale = kd_weight · τ² if tau_squared), all times grad_output of the row and zero on ignored rows.
The backend is the PyTorch chunked pass (:mod:`.torch_pass`) or the Triton kernels
(:mod:`triton_kernels.sparse_kd`, imported only when selected), chosen by :mod:`.backends`.
"""

from __future__ import annotations

import torch

from . import torch_pass
from ._inputs import FlatInputs, teacher_side
from .backends import RowLossAndGrad, get_backend, row_stats
from .options import KDLossOptions
from .sparse_math import divergence_terms, uses_tail_category
from .targets import WeightedTargets
from .weighted import weighted_loss_and_grad

__all__ = ["SparseKDFunction", "RowLossAndGrad", "row_loss_and_grad_coefs"]


def row_loss_and_grad_coefs(logits: torch.Tensor, flat: FlatInputs | WeightedTargets, options: KDLossOptions,
                            backend_mod) -> RowLossAndGrad:
    """Forward of the fused loss on [N, V] logits: per-row losses and the backward's coefficients.

    Top-k targets (:class:`FlatInputs`) take the K-wide divergence math here; sample and hybrid targets
    (:class:`~.targets.WeightedTargets`) the weighted-ids math of :mod:`.weighted`. Both use the same V-wide
    passes of ``backend_mod`` and hand the backward the same record."""
    if isinstance(flat, WeightedTargets):
        return weighted_loss_and_grad(logits, flat, options, backend_mod)
    tau = options.temperature
    cdt = torch_pass.compute_dtype(logits.dtype)
    divergence = options.effective_divergence
    do_kd = options.kd_weight > 0
    do_ce = options.ce_weight > 0
    valid = flat.valid
    need_tail = do_kd and uses_tail_category(divergence, options.tail)
    stats = row_stats(backend_mod, logits, flat.topk_ids, flat.safe_labels, tau, need_lse_1=do_ce or tau == 1.0,
                      need_tail=need_tail, chunk_rows=options.chunk_rows)
    zero = torch.zeros((), dtype=cdt, device=logits.device)
    rows = torch.zeros(valid.shape, dtype=cdt, device=logits.device)
    coef_1 = torch.zeros_like(rows)
    coef_t = torch.zeros_like(rows)
    grad_on_support = torch.zeros(flat.topk_ids.shape, dtype=cdt, device=logits.device)
    if do_kd:
        logq, log_tq = teacher_side(flat, options, cdt)
        student_logprobs = stats.logits_on_support / tau - stats.lse_t.unsqueeze(1)  # [N, K]
        terms = divergence_terms(student_logprobs, stats.log_tail, logq, log_tq, divergence=divergence,
                                 tail=options.tail, beta=float(options.beta))
        scale = options.kd_scale
        rows = torch.where(valid, scale * terms.divergence, zero)
        coef_t = torch.where(valid, (scale / tau) * terms.dense_coef, zero)
        grad_on_support = torch.where(valid.unsqueeze(1), (scale / tau) * terms.grad_on_support, zero)
    if do_ce:
        w = float(options.ce_weight)
        ce = stats.lse_1 - stats.logit_at_label  # [N]
        rows = rows + torch.where(valid, w * ce, zero)
        coef_1 = torch.where(valid, torch.full_like(rows, w), zero)
        p1_support = (stats.logits_on_support - stats.lse_1.unsqueeze(1)).exp()  # [N, K]
        at_label = (flat.topk_ids == flat.safe_labels.unsqueeze(1)).to(cdt)
        grad_on_support = grad_on_support + coef_1.unsqueeze(1) * (p1_support - at_label)
    return RowLossAndGrad(rows, stats.lse_1, stats.lse_t, coef_1, coef_t, grad_on_support)


class SparseKDFunction(torch.autograd.Function):
    """Per-row fused loss [N] from logits [N, V]; gradient in closed form (see module docstring)."""

    @staticmethod
    def forward(ctx, logits, flat: FlatInputs, options: KDLossOptions, backend: str):  # noqa: D401
        out = row_loss_and_grad_coefs(logits, flat, options, get_backend(backend))
        ctx.save_for_backward(logits, flat.support_ids, flat.safe_labels, out.lse_1, out.lse_t, out.coef_1,
                              out.coef_t, out.grad_on_support)
        ctx.temperature = options.temperature
        ctx.backend = backend
        ctx.chunk_rows = options.chunk_rows
        return out.rows.to(torch_pass.compute_dtype(logits.dtype))

    @staticmethod
    def backward(ctx, grad_rows):
        logits, ids, safe_labels, lse_1, lse_t, coef_1, coef_t, grad_on_support = ctx.saved_tensors
        go = grad_rows.to(coef_1.dtype)  # [N]
        grad = get_backend(ctx.backend).write_grad(
            logits, ids, safe_labels, lse_1, lse_t, coef_1 * go, coef_t * go,
            grad_on_support * go.unsqueeze(1), ctx.temperature, chunk_rows=ctx.chunk_rows)
        return grad, None, None, None
