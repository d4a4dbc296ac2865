"""Triton kernels for the V-wide passes of the sparse-KD + CE loss (one program per row).

Shape notation:
    N: rows, V: vocabulary, K: teacher top-k (ids unique per row).

Math (u = z / τ, lse_1 = logsumexp(z), lse_t = logsumexp(u), S = top-k ids):

    forward   _row_stats_kernel: online logsumexp over V in BLOCK_V blocks with ONE running max m of z and
              two running sums (Σ e^(z−m) for CE, Σ e^((z−m)/τ) for KD: max(z/τ) = max(z)/τ for τ > 0), plus
              the student tail Σ_{j∉S} e^((z_j−m)/τ) (membership test against the K ids, exact: no
              cancellation of 1 − Σ_S p), and the k + 1 gathers z_S, z_label.
    backward  _write_grad_kernel:  grad_j = c1 e^(z_j − lse_1) + ct e^(z_j/τ − lse_t) − c1 [j = label]
              for every j, then grad_i = g_i at the k ids (complete values computed on [N, K] by the
              caller, written after a barrier so they replace the dense value).

The K-wide divergence math (any divergence / tail) runs in PyTorch on [N, K] tensors in kdlib; this file
imports nothing from kdlib. Loads are contiguous along V (coalesced), accumulation is fp32, the grad is
stored in the logits' dtype. Works under TRITON_INTERPRET=1 on CPU tensors (used by the tests).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["RowStats", "row_stats", "write_grad"]

LOG_TAIL_FLOOR = math.log(1e-30)  # keep equal to kdlib.losses.sparse_math.LOG_TAIL_FLOOR


class RowStats(NamedTuple):
    lse_1: torch.Tensor  # [N]
    lse_t: torch.Tensor  # [N]
    logits_on_support: torch.Tensor  # [N, K] fp32
    logit_at_label: torch.Tensor  # [N] fp32
    log_tail: torch.Tensor | None  # [N]


@triton.jit
def _row_stats_kernel(
    z_ptr, z_row_stride,
    ids_ptr, ids_row_stride,
    labels_ptr,
    lse_1_ptr, lse_t_ptr, z_support_ptr, z_label_ptr, log_tail_ptr,
    V, K, inv_temperature, log_tail_floor,
    SCALED: tl.constexpr, NEED_TAIL: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    ids_row = ids_ptr + row * ids_row_stride
    m = tl.full((), -float("inf"), tl.float32)
    sum_1 = tl.zeros((), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    sum_tail = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        in_vocab = offs < V
        z = tl.load(z_row + offs, mask=in_vocab, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # m starts at -inf: exp(-inf - finite) = 0 rescales the empty sums correctly
        alpha_1 = tl.exp(m - m_new)
        e_1 = tl.where(in_vocab, tl.exp(z - m_new), 0.0)
        sum_1 = sum_1 * alpha_1 + tl.sum(e_1, axis=0)
        if SCALED:
            alpha_t = tl.exp((m - m_new) * inv_temperature)
            e_t = tl.where(in_vocab, tl.exp((z - m_new) * inv_temperature), 0.0)
            sum_t = sum_t * alpha_t + tl.sum(e_t, axis=0)
        else:
            alpha_t = alpha_1
            e_t = e_1
        if NEED_TAIL:
            in_support = tl.zeros((BLOCK_V,), tl.int32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                ids = tl.load(ids_row + offs_k, mask=offs_k < K, other=-1)
                hit = (offs[None, :] == ids[:, None]).to(tl.int32)  # [BLOCK_K, BLOCK_V]
                in_support += tl.sum(hit, axis=0)
            sum_tail = sum_tail * alpha_t + tl.sum(tl.where(in_support > 0, 0.0, e_t), axis=0)
        m = m_new
    lse_1 = m + tl.log(sum_1)
    tl.store(lse_1_ptr + row, lse_1)
    if SCALED:
        lse_t = m * inv_temperature + tl.log(sum_t)
        log_total_t = tl.log(sum_t)
    else:
        lse_t = lse_1
        log_total_t = tl.log(sum_1)
    tl.store(lse_t_ptr + row, lse_t)
    if NEED_TAIL:
        # sum_tail >= 1e-38 keeps log finite; log_total_t >= 0 so the floor still applies when S covers V
        tl.store(log_tail_ptr + row, tl.maximum(tl.log(tl.maximum(sum_tail, 1e-38)) - log_total_t, log_tail_floor))
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ids = tl.load(ids_row + offs_k, mask=k_mask, other=0)
        z_s = tl.load(z_row + ids, mask=k_mask, other=0.0).to(tl.float32)
        tl.store(z_support_ptr + row * K + offs_k, z_s, mask=k_mask)
    label = tl.load(labels_ptr + row)
    tl.store(z_label_ptr + row, tl.load(z_row + label).to(tl.float32))


@triton.jit
def _write_grad_kernel(
    z_ptr, z_row_stride,
    grad_ptr, grad_row_stride,
    ids_ptr, ids_row_stride,
    labels_ptr, lse_1_ptr, lse_t_ptr, coef_1_ptr, coef_t_ptr, grad_support_ptr,
    V, K, inv_temperature,
    SCALED: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    ids_row = ids_ptr + row * ids_row_stride
    label = tl.load(labels_ptr + row)
    lse_1 = tl.load(lse_1_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    coef_1 = tl.load(coef_1_ptr + row)
    coef_t = tl.load(coef_t_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        in_vocab = offs < V
        z = tl.load(z_row + offs, mask=in_vocab, other=0.0).to(tl.float32)
        if SCALED:
            g = coef_1 * tl.exp(z - lse_1) + coef_t * tl.exp(z * inv_temperature - lse_t)
        else:
            g = (coef_1 + coef_t) * tl.exp(z - lse_1)
        g = tl.where(offs == label, g - coef_1, g)
        tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_vocab)
    # the k support entries replace the dense values written above by this same program
    tl.debug_barrier()
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ids = tl.load(ids_row + offs_k, mask=k_mask, other=0)
        g_s = tl.load(grad_support_ptr + row * K + offs_k, mask=k_mask, other=0.0)
        tl.store(grad_row + ids, g_s.to(grad_ptr.dtype.element_ty), mask=k_mask)


def _block_sizes(vocab: int, k: int) -> tuple[int, int]:
    block_v = min(1024, triton.next_power_of_2(max(vocab, 16)))
    block_k = min(64, triton.next_power_of_2(max(k, 1)))
    return block_v, block_k


def row_stats(
    logits: torch.Tensor,  # [N, V] fp32/bf16/fp16, rows contiguous
    topk_ids: torch.Tensor,  # [N, K] integer
    safe_labels: torch.Tensor,  # [N] int64, ignored rows set to any valid id
    temperature: float,
    need_lse_1: bool = True,
    need_tail: bool = False,
    chunk_rows: int | None = None,  # accepted for interface parity with the PyTorch pass
) -> RowStats:
    """Launch one program per row; returns fp32 lse_1, lse_t [N], z_S [N, K], z_label [N], log_tail [N]."""
    del need_lse_1, chunk_rows  # the CE sum is a free by-product of the same loop
    n, vocab = logits.shape
    k = topk_ids.shape[1]
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    ids = topk_ids.contiguous()
    labels = safe_labels.contiguous()
    dev = logits.device
    lse_1 = torch.empty(n, dtype=torch.float32, device=dev)
    lse_t = torch.empty(n, dtype=torch.float32, device=dev)
    log_tail = torch.empty(n, dtype=torch.float32, device=dev) if need_tail else None
    z_support = torch.empty((n, k), dtype=torch.float32, device=dev)
    z_label = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return RowStats(lse_1, lse_t, z_support, z_label, log_tail)
    block_v, block_k = _block_sizes(vocab, k)
    _row_stats_kernel[(n,)](
        logits, logits.stride(0), ids, ids.stride(0), labels,
        lse_1, lse_t, z_support, z_label, log_tail if need_tail else lse_1,
        vocab, k, 1.0 / temperature, LOG_TAIL_FLOOR,
        SCALED=temperature != 1.0, NEED_TAIL=need_tail, BLOCK_V=block_v, BLOCK_K=block_k,
    )
    return RowStats(lse_1, lse_t, z_support, z_label, log_tail)


def write_grad(
    logits: torch.Tensor,  # [N, V]
    topk_ids: torch.Tensor,  # [N, K]
    safe_labels: torch.Tensor,  # [N]
    lse_1: torch.Tensor,  # [N]
    lse_t: torch.Tensor,  # [N]
    coef_1: torch.Tensor,  # [N]
    coef_t: torch.Tensor,  # [N]
    grad_on_support: torch.Tensor,  # [N, K]
    temperature: float,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The [N, V] gradient in the logits' dtype, written once."""
    del chunk_rows
    n, vocab = logits.shape
    k = topk_ids.shape[1]
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n == 0:
        return grad
    block_v, block_k = _block_sizes(vocab, k)
    f32 = torch.float32
    _write_grad_kernel[(n,)](
        logits, logits.stride(0), grad, grad.stride(0), topk_ids.contiguous(), k,
        safe_labels.contiguous(), lse_1.to(f32).contiguous(), lse_t.to(f32).contiguous(),
        coef_1.to(f32).contiguous(), coef_t.to(f32).contiguous(), grad_on_support.to(f32).contiguous(),
        vocab, k, 1.0 / temperature,
        SCALED=temperature != 1.0, BLOCK_V=block_v, BLOCK_K=block_k,
    )
    return grad
