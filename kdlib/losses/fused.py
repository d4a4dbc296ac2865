"""Fused sparse-KD + CE loss: a torch.autograd.Function with the closed-form backward.

Shape notation:
    N: rows (flattened positions), V: vocabulary, K: teacher top-k.

Forward reads the [N, V] logits once (:func:`row_stats` of the backend: logsumexps, the student tail
without cancellation, k + 1 gathers; the Triton pass re-reads only rows whose tail is < 1 % of their
mass), does the K-wide math of :mod:`.sparse_math` on [N, K] tensors, and saves only [N] and
[N, K] tensors. Backward reads the logits once more and writes the gradient once:

    dL_r/dz_j = c1_r · softmax(z_r)_j + ct_r · softmax(z_r / τ)_j − c1_r [j = label_r]     (j ∉ S)
    dL_r/dz_i = g_ri                                                                       (i ∈ S)
    with c1 = ce_weight, ct = kd_scale · a / τ, g = kd_scale · dD/du_S / τ + ce_weight (softmax(z)_S − [S = label])

(kd_scale = kd_weight · τ² if tau_squared), all times grad_output of the row and zero on ignored rows.
The backend is the PyTorch chunked pass (:mod:`.torch_pass`) or the Triton kernels
(:mod:`triton_kernels.sparse_kd`, imported only when selected).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import torch_pass
from ._inputs import FlatInputs, LossConfig, teacher_side
from .sparse_math import divergence_terms, uses_tail_category

__all__ = ["SparseKDFunction", "RowLossAndGrad", "row_loss_and_grad_coefs", "get_backend", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` means Triton on CUDA when triton is importable, else the PyTorch pass."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def get_backend(name: str):
    """Module with ``row_stats`` and ``write_grad`` for a resolved backend name."""
    if name == "torch":
        return torch_pass
    if name == "triton":
        try:
            from triton_kernels import sparse_kd
        except ImportError as exc:  # pragma: no cover - triton is installed in the dev env
            raise ValueError("backend='triton' needs the triton package: pip install 'kdcache[triton]'") from exc
        return sparse_kd
    raise ValueError(f"unknown backend {name!r}; choose 'auto', 'torch', 'triton' or 'reference'")


class RowLossAndGrad(NamedTuple):
    rows: torch.Tensor  # [N]    loss per row (0 on ignored rows), compute dtype
    lse_1: torch.Tensor  # [N]
    lse_t: torch.Tensor  # [N]
    coef_1: torch.Tensor  # [N]
    coef_t: torch.Tensor  # [N]
    grad_on_support: torch.Tensor  # [N, K]


def row_loss_and_grad_coefs(
    logits: torch.Tensor, flat: FlatInputs, config: LossConfig, backend_mod, chunk_rows: int | None = None
) -> RowLossAndGrad:
    """Forward of the fused loss on [N, V] logits: per-row losses and the backward's coefficients."""
    tau = config.temperature
    cdt = torch_pass.compute_dtype(logits.dtype)
    divergence = config.effective_divergence
    do_kd = config.kd_weight > 0
    do_ce = config.ce_weight > 0
    valid = flat.valid
    safe_labels = torch.where(valid, flat.labels, 0) if flat.labels is not None else torch.zeros_like(
        valid, dtype=torch.int64)
    need_tail = do_kd and uses_tail_category(divergence, config.tail)
    stats = backend_mod.row_stats(logits, flat.topk_ids, safe_labels, tau, need_lse_1=do_ce or tau == 1.0,
                                  need_tail=need_tail, chunk_rows=chunk_rows)
    zero = torch.zeros((), dtype=cdt, device=logits.device)
    rows = torch.zeros(valid.shape, dtype=cdt, device=logits.device)
    coef_1 = torch.zeros_like(rows)
    coef_t = torch.zeros_like(rows)
    grad_on_support = torch.zeros(flat.topk_ids.shape, dtype=cdt, device=logits.device)
    if do_kd:
        logq, log_tq = teacher_side(flat, config, cdt)
        student_logprobs = stats.logits_on_support / tau - stats.lse_t.unsqueeze(1)  # [N, K]
        terms = divergence_terms(student_logprobs, stats.log_tail, logq, log_tq, divergence=divergence,
                                 tail=config.tail, beta=float(config.beta))
        scale = config.kd_scale
        rows = torch.where(valid, scale * terms.divergence, zero)
        coef_t = torch.where(valid, (scale / tau) * terms.dense_coef, zero)
        grad_on_support = torch.where(valid.unsqueeze(1), (scale / tau) * terms.grad_on_support, zero)
    if do_ce:
        w = float(config.ce_weight)
        ce = stats.lse_1 - stats.logit_at_label  # [N]
        rows = rows + torch.where(valid, w * ce, zero)
        coef_1 = torch.where(valid, torch.full_like(rows, w), zero)
        p1_support = (stats.logits_on_support - stats.lse_1.unsqueeze(1)).exp()  # [N, K]
        at_label = (flat.topk_ids == safe_labels.unsqueeze(1)).to(cdt)
        grad_on_support = grad_on_support + coef_1.unsqueeze(1) * (p1_support - at_label)
    return RowLossAndGrad(rows, stats.lse_1, stats.lse_t, coef_1, coef_t, grad_on_support)


class SparseKDFunction(torch.autograd.Function):
    """Per-row fused loss [N] from logits [N, V]; gradient in closed form (see module docstring)."""

    @staticmethod
    def forward(ctx, logits, flat: FlatInputs, config: LossConfig, backend: str, chunk_rows):  # noqa: D401
        backend_mod = get_backend(backend)
        out = row_loss_and_grad_coefs(logits, flat, config, backend_mod, chunk_rows)
        valid = flat.valid
        safe_labels = torch.where(valid, flat.labels, 0) if flat.labels is not None else torch.zeros_like(
            valid, dtype=torch.int64)
        ctx.save_for_backward(logits, flat.topk_ids, safe_labels, out.lse_1, out.lse_t, out.coef_1, out.coef_t,
                              out.grad_on_support)
        ctx.temperature = config.temperature
        ctx.backend = backend
        ctx.chunk_rows = chunk_rows
        return out.rows.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_rows):
        logits, ids, safe_labels, lse_1, lse_t, coef_1, coef_t, grad_on_support = ctx.saved_tensors
        go = grad_rows.to(coef_1.dtype)  # [N]
        grad = get_backend(ctx.backend).write_grad(
            logits, ids, safe_labels, lse_1, lse_t, coef_1 * go, coef_t * go,
            grad_on_support * go.unsqueeze(1), ctx.temperature, chunk_rows=ctx.chunk_rows)
        return grad, None, None, None, None
