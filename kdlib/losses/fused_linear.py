"""Sparse-KD + CE loss straight from hidden states and the LM head, never materializing [N, V] logits.

Shape notation:
    N: rows (flattened positions), H: hidden size, V: vocabulary, K: teacher top-k, C: rows per chunk.

Forward walks the rows in chunks of C: logits_c = hidden_c @ Wᵀ (+ b) [C, V], the fused loss's forward
and closed-form gradient on that chunk (same backend passes as :func:`kdlib.kd_loss`), then immediately

    grad_hidden_c = grad_logits_c @ W          [C, H]
    grad_W       += grad_logits_cᵀ @ hidden_c  [V, H]  (fp32 accumulator)
    grad_b       += Σ_rows grad_logits_c       [V]

so the peak extra memory is O(C × V) (the chunk's logits and their gradient) plus the [V, H] gradient
accumulator; the backward only scales the stored gradients by grad_output. Matmuls stay in PyTorch
(cuBLAS / MKL beat a hand-written kernel); the per-chunk V-pass uses Triton on CUDA.
"""

from __future__ import annotations

import dataclasses

import torch

from ._inputs import BACKENDS, FlatInputs, LossConfig, flatten_targets
from .fused import get_backend, resolve_backend, row_loss_and_grad_coefs

__all__ = ["kd_loss_from_hidden"]


def _slice_rows(flat: FlatInputs, r0: int, r1: int) -> FlatInputs:
    def cut(x):
        return None if x is None else x[r0:r1]

    return dataclasses.replace(
        flat, topk_ids=flat.topk_ids[r0:r1], topk_logprobs=flat.topk_logprobs[r0:r1], labels=cut(flat.labels),
        valid=flat.valid[r0:r1], teacher_lse=cut(flat.teacher_lse),
        teacher_lse_at_temperature=cut(flat.teacher_lse_at_temperature), lead_shape=torch.Size([r1 - r0]))


class FusedLinearSparseKDFunction(torch.autograd.Function):
    """Scalar loss from hidden [N, H] and W [V, H]; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, flat: FlatInputs, config: LossConfig, backend: str, chunk_size: int):
        backend_mod = get_backend(backend)
        n = hidden.shape[0]
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        row_scale = 1.0
        if config.reduction == "mean":
            row_scale = 1.0 / max(int(flat.valid.sum()), 1)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for r0 in range(0, n, chunk_size):
            r1 = min(n, r0 + chunk_size)
            h = hidden[r0:r1]  # [C, H]
            logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # [C, V]
            sub = _slice_rows(flat, r0, r1)
            out = row_loss_and_grad_coefs(logits, sub, config, backend_mod)
            total += out.rows.sum().to(acc_dtype)
            grad_logits = backend_mod.write_grad(
                logits, sub.topk_ids, torch.where(sub.valid, sub.labels, 0) if sub.labels is not None
                else torch.zeros_like(sub.valid, dtype=torch.int64), out.lse_1, out.lse_t,
                out.coef_1 * row_scale, out.coef_t * row_scale, out.grad_on_support * row_scale,
                config.temperature)  # [C, V] in the logits' dtype
            del logits
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[r0:r1])
            if grad_weight is not None:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:
                    grad_weight += (grad_logits.t() @ h).to(acc_dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=acc_dtype)
            del grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return (total * row_scale).to(acc_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        go = grad_output
        gh = None if grad_hidden is None else grad_hidden * go.to(grad_hidden.dtype)
        gw = None if grad_weight is None else (grad_weight * go).to(ctx.weight_dtype)
        gb = None if grad_bias is None else (grad_bias * go).to(ctx.bias_dtype)
        return gh, gw, gb, None, None, None, None


def kd_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    tau_squared: bool = True,
    ignore_index: int = -100,
    beta: float = 0.5,
    teacher_lse: torch.Tensor | None = None,
    teacher_lse_at_temperature: torch.Tensor | None = None,
    backend: str = "auto",
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """:func:`kdlib.kd_loss` of ``hidden @ lm_head_weightᵀ + lm_head_bias`` without materializing it.

    Same options and definitions as :func:`kdlib.kd_loss` (reduction ``mean`` or ``sum`` only). Gradients
    for ``hidden``, ``lm_head_weight`` and ``lm_head_bias`` are computed during the forward, ``chunk_size``
    rows at a time, so peak memory is O(chunk_size × V) instead of O(N × V).

    Args:
        hidden: [..., H] final hidden states (after the final norm).
        lm_head_weight: [V, H] output embedding.
        topk_ids, topk_logprobs, labels, teacher_lse, teacher_lse_at_temperature: as in kd_loss, with
            leading dims equal to hidden's.
        lm_head_bias: optional [V].
        chunk_size: rows per chunk (memory ∝ chunk_size × V).

    Returns:
        Scalar loss (fp32; fp64 for fp64 inputs).
    """
    config = LossConfig(ce_weight, kd_weight, temperature, divergence, tail, tau_squared, ignore_index, beta,
                        reduction)
    if reduction == "none":
        raise ValueError("kd_loss_from_hidden supports reduction='mean' or 'sum' (gradients are computed in the "
                         "forward); use kd_loss on materialized logits for per-position losses")
    if backend not in BACKENDS or backend == "reference":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton' for kd_loss_from_hidden, got {backend!r}")
    if lm_head_weight.dim() != 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(f"lm_head_weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(lm_head_weight.shape)}")
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (vocab,):
        raise ValueError(f"lm_head_bias must be [V={vocab}], got {tuple(lm_head_bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = tuple(hidden.shape[:-1])
    flat = flatten_targets(lead, vocab, hidden.device, topk_ids, topk_logprobs, labels, teacher_lse,
                           teacher_lse_at_temperature, config)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    resolved = resolve_backend(backend, hidden.device)
    return FusedLinearSparseKDFunction.apply(hidden_2d, lm_head_weight, lm_head_bias, flat, config, resolved,
                                             int(chunk_size))
