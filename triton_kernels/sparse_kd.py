"""Triton kernels for the V-wide passes of the sparse-KD + CE loss (one program per row).

Shape notation:
    N: rows, V: vocabulary, K: teacher top-k (ids unique per row).

Math (u = z / τ, lse_1 = logsumexp(z), lse_t = logsumexp(u), S = top-k ids, m = max(z)):

    forward   _row_stats_kernel: online logsumexp over V in BLOCK_V blocks with ONE running max m of z and
              two running sums (Σ e^(z−m) for CE, total = Σ e^((z−m)/τ) for KD: max(z/τ) = max(z)/τ for
              τ > 0), then the k + 1 gathers z_S, z_label. The student tail comes from the gathers:

                  tail ≈ total − Σ_S e^((z_S−m)/τ)                                     (estimate)

              which is accurate while tail/total is not small: the two sums round differently (~1e-7 ·
              total), so the relative error of the estimate is ~1e-7 · total/tail. Rows with
              tail < EXACT_TAIL_BELOW · total are flagged.
    exact     _exact_tail_kernel (flagged rows only): re-reads the row and sums e^((z_j−m)/τ) over j ∉ S
              directly (no cancellation). Membership is a merge of the ascending V blocks with the row's
              ids sorted ascending: each id is compared against ONE block, so the work is O(V + K·BLOCK_V)
              instead of the O(K·V) of comparing every id with every block.
    backward  _write_grad_kernel:  grad_j = c1 e^(z_j − lse_1) + ct e^(z_j/τ − lse_t) − c1 [j = label]
              for every j, then grad_i = g_i at the k ids (complete values computed on [N, K] by the
              caller, written after a barrier so they replace the dense value).

No host-device synchronization: the exact pass is launched over all N rows and unflagged programs exit
after reading one byte, so which rows need it is never copied to the host.

The K-wide divergence math (any divergence / tail) runs in PyTorch on [N, K] tensors in kdlib; this file
imports nothing from kdlib: what the two sides share is passed in by the caller, the floor of the log tail
mass (``log_tail_floor``) and the record type of the row statistics (``stats_type``, whose fields
:func:`row_stats` fills by name). Loads are contiguous along V (coalesced), accumulation is fp32, the grad is
stored in the logits' dtype (or ``out_dtype``). Works under TRITON_INTERPRET=1 on CPU tensors (the tests).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

import torch
import triton
import triton.language as tl

__all__ = ["row_stats", "write_grad", "launch_config", "LaunchConfig", "EXACT_TAIL_BELOW"]

Stats = TypeVar("Stats")

# Rows whose estimated tail is below this fraction of the row's mass take the exact pass. The estimate's
# relative error is ~1e-7 · total/tail (fp32 rounding of two sums that nearly cancel; worst case over 300
# random rows, the kernel's fp32 arithmetic emulated in numpy at V = 131072, BLOCK_V = 4096: 1.6e-5 at
# tail/total = 1e-2, 1e-4 at 1e-3; a GPU's approximate exp adds about an ulp per term). 1e-2 keeps every
# row within the 2e-5 the tests demand of the exact pass; a student confident enough to put 99 % of its
# mass on the teacher's top-k pays one more read of its row.
EXACT_TAIL_BELOW = 1e-2
# Launch configuration for Ampere (A100) / Hopper (H100). Reasoned from bandwidth and from ptxas -v on
# sm_80 / sm_90a (tests/test_triton_ptx.py), NOT timed on a GPU (none here):
# * One program per row: N = B·T is thousands of rows, far more than the 108/132 SMs, so rows need no
#   splitting, and a row's reductions stay in one program (no atomics, deterministic).
# * BLOCK_V ≤ 4096: the passes are bandwidth-bound, so each iteration should put many bytes in flight.
#   4096 bf16 = 8 KB per program per iteration; at the 46-52 registers/thread ptxas reports for the
#   forward and backward kernels, 4-5 programs of 8 warps fit on an SM: 32-40 KB in flight per SM,
#   above the ~15 KB Little's law asks (H100: 3.35 TB/s × ~0.6 µs / 132 SMs; A100 ~11 KB). Larger
#   blocks add registers (16 values per thread per live tensor at 4096 / 256 threads) and waste more of
#   the ragged last block. (The old [BLOCK_K, BLOCK_V] membership tile took 168-222 registers.)
# * num_warps = BLOCK_V / 256 (1..8): ≥ 8 contiguous elements per thread, i.e. 16-byte vector loads of
#   bf16/fp16 (two for fp32), and 16 per thread at BLOCK_V = 4096 with 8 warps.
# * BLOCK_K ≤ 64: the K gathers are a few hundred bytes per row; 64 covers the usual top-k in one step.
# Small N (fewer rows than ~4 × SMs) leaves SMs idle with one program per row; training batches do not.
MAX_BLOCK_V = 4096
MAX_BLOCK_K = 64


class LaunchConfig(NamedTuple):
    block_v: int
    block_k: int
    num_warps: int


def launch_config(vocab: int, k: int) -> LaunchConfig:
    """BLOCK_V, BLOCK_K and num_warps for a row of ``vocab`` logits and ``k`` top-k ids (see comment above)."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 16)))
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(max(k, 1)))
    return LaunchConfig(block_v, block_k, max(1, min(8, block_v // 256)))


@triton.jit
def _row_stats_kernel(
    z_ptr, z_row_stride,
    ids_ptr, ids_row_stride,
    labels_ptr,
    lse_1_ptr, lse_t_ptr, z_support_ptr, z_label_ptr, log_tail_ptr, needs_exact_ptr,
    V, K, inv_temperature, log_tail_floor, exact_below,
    SCALED: tl.constexpr, NEED_TAIL: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    ids_row = ids_ptr + row * ids_row_stride
    m = tl.full((), -float("inf"), tl.float32)
    sum_1 = tl.zeros((), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        in_vocab = offs < V
        z = tl.load(z_row + offs, mask=in_vocab, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # m starts at -inf: exp(-inf - finite) = 0 rescales the empty sums correctly
        sum_1 = sum_1 * tl.exp(m - m_new) + tl.sum(tl.where(in_vocab, tl.exp(z - m_new), 0.0), axis=0)
        if SCALED:
            e_t = tl.where(in_vocab, tl.exp((z - m_new) * inv_temperature), 0.0)
            sum_t = sum_t * tl.exp((m - m_new) * inv_temperature) + tl.sum(e_t, axis=0)
        m = m_new
    tl.store(lse_1_ptr + row, m + tl.log(sum_1))
    if SCALED:
        total_t = sum_t
        tl.store(lse_t_ptr + row, m * inv_temperature + tl.log(sum_t))
    else:
        total_t = sum_1
        tl.store(lse_t_ptr + row, m + tl.log(sum_1))
    sum_support = tl.zeros((), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ids = tl.load(ids_row + offs_k, mask=k_mask, other=0)
        z_s = tl.load(z_row + ids, mask=k_mask, other=0.0).to(tl.float32)
        tl.store(z_support_ptr + row * K + offs_k, z_s, mask=k_mask)
        if NEED_TAIL:
            sum_support += tl.sum(tl.where(k_mask, tl.exp((z_s - m) * inv_temperature), 0.0), axis=0)
    label = tl.load(labels_ptr + row)
    tl.store(z_label_ptr + row, tl.load(z_row + label).to(tl.float32))
    if NEED_TAIL:
        tail = total_t - sum_support
        # 1e-38 keeps log finite (tail can round to <= 0); log(total_t) >= 0 so the floor applies at K = V
        tl.store(log_tail_ptr + row, tl.maximum(tl.log(tl.maximum(tail, 1e-38)) - tl.log(total_t), log_tail_floor))
        tl.store(needs_exact_ptr + row, (tail < exact_below * total_t).to(tl.int8))


@triton.jit
def _exact_tail_kernel(
    z_ptr, z_row_stride,
    sorted_ids_ptr, ids_row_stride,
    needs_exact_ptr, log_tail_ptr,
    V, K, inv_temperature, log_tail_floor,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(needs_exact_ptr + row) != 0:
        z_row = z_ptr + row * z_row_stride
        ids_row = sorted_ids_ptr + row * ids_row_stride
        m = tl.full((), -float("inf"), tl.float32)
        sum_all = tl.zeros((), tl.float32)
        sum_tail = tl.zeros((), tl.float32)
        # merge of two ascending sequences: the V blocks and the sorted ids; next_id is the smallest id not
        # yet placed, and every id is compared against the one block that contains it
        pos = 0
        next_id = tl.load(ids_row)  # K >= 1
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            z = tl.load(z_row + offs, mask=in_vocab, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp((m - m_new) * inv_temperature)
            e_t = tl.where(in_vocab, tl.exp((z - m_new) * inv_temperature), 0.0)
            in_support = offs < 0
            while next_id < v0 + BLOCK_V:
                in_support = in_support | (offs == next_id)
                pos += 1
                # past the last id: a sentinel beyond every block ends the merge
                next_id = tl.load(ids_row + pos, mask=pos < K, other=V + BLOCK_V)
            sum_all = sum_all * alpha + tl.sum(e_t, axis=0)
            sum_tail = sum_tail * alpha + tl.sum(tl.where(in_support, 0.0, e_t), axis=0)
            m = m_new
        tl.store(log_tail_ptr + row,
                 tl.maximum(tl.log(tl.maximum(sum_tail, 1e-38)) - tl.log(sum_all), log_tail_floor))


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


def row_stats(
    logits: torch.Tensor,  # [N, V] fp32/bf16/fp16, rows contiguous
    topk_ids: torch.Tensor,  # [N, K] integer
    safe_labels: torch.Tensor,  # [N] int64, ignored rows set to any valid id
    temperature: float,
    need_lse_1: bool = True,
    need_tail: bool = False,
    chunk_rows: int | None = None,  # accepted for interface parity with the PyTorch pass
    *,
    log_tail_floor: float,  # the caller's floor of log T (kdlib: log 1e-30)
    stats_type: Callable[..., Stats],  # the caller's record of the results, filled by field name
) -> Stats:
    """Launch one program per row; returns ``stats_type(lse_1=, lse_t=, logits_on_support=, logit_at_label=,
    log_tail=)`` of fp32 lse_1, lse_t [N], z_S [N, K], z_label [N] and log_tail [N] (None unless ``need_tail``)."""
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
    needs_exact = torch.empty(n, dtype=torch.int8, device=dev) if need_tail else None
    z_support = torch.empty((n, k), dtype=torch.float32, device=dev)
    z_label = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return stats_type(lse_1=lse_1, lse_t=lse_t, logits_on_support=z_support, logit_at_label=z_label,
                          log_tail=log_tail)
    cfg = launch_config(vocab, k)
    inv_temperature = 1.0 / temperature
    _row_stats_kernel[(n,)](
        logits, logits.stride(0), ids, ids.stride(0), labels,
        lse_1, lse_t, z_support, z_label, log_tail if need_tail else lse_1, needs_exact if need_tail else lse_1,
        vocab, k, inv_temperature, log_tail_floor, EXACT_TAIL_BELOW,
        SCALED=temperature != 1.0, NEED_TAIL=need_tail, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )
    if need_tail:
        sorted_ids = ids.sort(dim=1).values  # [N, K] ascending, for the merge in the exact pass
        _exact_tail_kernel[(n,)](
            logits, logits.stride(0), sorted_ids, sorted_ids.stride(0), needs_exact, log_tail,
            vocab, k, inv_temperature, log_tail_floor,
            BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )
    return stats_type(lse_1=lse_1, lse_t=lse_t, logits_on_support=z_support, logit_at_label=z_label,
                      log_tail=log_tail)


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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The [N, V] gradient in ``out_dtype`` (default the logits' dtype), written once."""
    del chunk_rows
    n, vocab = logits.shape
    k = topk_ids.shape[1]
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    grad = torch.empty((n, vocab), dtype=out_dtype or logits.dtype, device=logits.device)
    if n == 0:
        return grad
    cfg = launch_config(vocab, k)
    f32 = torch.float32
    _write_grad_kernel[(n,)](
        logits, logits.stride(0), grad, grad.stride(0), topk_ids.contiguous(), k,
        safe_labels.contiguous(), lse_1.to(f32).contiguous(), lse_t.to(f32).contiguous(),
        coef_1.to(f32).contiguous(), coef_t.to(f32).contiguous(), grad_on_support.to(f32).contiguous(),
        vocab, k, 1.0 / temperature,
        SCALED=temperature != 1.0, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
    )
    return grad
