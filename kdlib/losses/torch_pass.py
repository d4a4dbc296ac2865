"""The two V-wide passes of the fused loss in plain PyTorch, chunked over rows (CPU default backend).

Shape notation:
    N: rows, V: vocabulary, K: teacher top-k, C: rows per chunk.

Forward pass (:func:`row_stats`): per row the logsumexp of z (CE) and of z / τ (KD), the student's exact
tail mass outside S at τ, and k + 1 gathers. Backward pass (:func:`write_grad`): one write of

    grad_j = c1 · softmax(z)_j + ct · softmax(z / τ)_j − c1 · [j = label],   then grad_S = g_S (overwrite)

Only chunk-sized temporaries ([C, V]) are allocated besides the gradient itself, so memory stays at
logits + gradient. Chunks are large (:data:`CHUNK_ELEMENTS` = 2^23 elements, 32 MB of fp32): every op on
a chunk ends in an OpenMP barrier, and with ~1 MB chunks the thousands of barriers per call made the loss
7x slower than cross-entropy on a busy 2-core CPU; with 32 MB chunks it measured 0.61x CE's time and
0.33x CE's peak memory on a quiet machine (benchmarks/bench_loss.py).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

__all__ = ["row_stats", "write_grad", "chunk_rows_for", "compute_dtype", "CHUNK_ELEMENTS"]

Stats = TypeVar("Stats")

# Elements per row chunk: 2^23, i.e. 32 MB of fp32. Few, large ops: each op is an OpenMP barrier, and on a
# busy CPU thousands of small-chunk barriers cost more than the cache locality of L2-sized chunks gains
# (1 MB chunks: 7x CE's time on a loaded 2-core box; 32 MB: 0.61x CE's time on a quiet one).
CHUNK_ELEMENTS = 1 << 23


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows_for(vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(vocab, 1))


@torch.no_grad()
def row_stats(
    logits: torch.Tensor,  # [N, V]
    topk_ids: torch.Tensor,  # [N, K] int64
    safe_labels: torch.Tensor,  # [N] int64, ignored rows set to 0
    temperature: float,
    need_lse_1: bool,
    need_tail: bool,
    chunk_rows: int | None = None,
    *,
    log_tail_floor: float,
    stats_type: Callable[..., Stats],
) -> Stats:
    """lse_1, lse_t [N], z on S [N, K], z at the label [N] and the floored log tail [N] (or None) in the compute
    dtype, as ``stats_type(lse_1=, lse_t=, logits_on_support=, logit_at_label=, log_tail=)`` (the caller's record,
    :class:`kdlib.losses.backends.RowStats`)."""
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    chunk_rows = chunk_rows or chunk_rows_for(vocab)
    scaled = temperature != 1.0
    lse_1 = torch.empty(n, dtype=cdt, device=logits.device)
    lse_t = torch.empty(n, dtype=cdt, device=logits.device) if scaled else lse_1
    log_tail = torch.empty(n, dtype=cdt, device=logits.device) if need_tail else None
    z_support = torch.empty(topk_ids.shape, dtype=cdt, device=logits.device)
    z_label = torch.empty(n, dtype=cdt, device=logits.device)
    # chunk temporaries allocated once and reused: no allocator / page-fault traffic per chunk
    work = torch.empty((min(chunk_rows, n), vocab), dtype=cdt, device=logits.device)
    work_1 = torch.empty_like(work) if scaled and need_lse_1 else None
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        z = logits[r0:r1].to(cdt)  # [C, V]; a view for fp32
        ids = topk_ids[r0:r1]
        z_support[r0:r1] = z.gather(1, ids)
        z_label[r0:r1] = z.gather(1, safe_labels[r0:r1].unsqueeze(1)).squeeze(1)
        row_max = z.amax(1, keepdim=True)  # [C, 1]
        buf = torch.sub(z, row_max, out=work[: r1 - r0])
        if scaled:
            if need_lse_1:
                e1 = torch.exp(buf, out=work_1[: r1 - r0])
                lse_1[r0:r1] = row_max.squeeze(1) + e1.sum(1).log()
            buf.mul_(1.0 / temperature)
        buf.exp_()
        total = buf.sum(1)
        lse_t[r0:r1] = row_max.squeeze(1) / temperature + total.log()
        if need_tail:
            # zero S and sum again: the complement's mass without the cancellation of 1 − Σ_S p
            buf.scatter_(1, ids, 0.0)
            log_tail[r0:r1] = (buf.sum(1).log() - total.log()).clamp_min(log_tail_floor)
    return stats_type(lse_1=lse_1, lse_t=lse_t, logits_on_support=z_support, logit_at_label=z_label,
                      log_tail=log_tail)


@torch.no_grad()
def write_grad(
    logits: torch.Tensor,  # [N, V]
    topk_ids: torch.Tensor,  # [N, K] int64
    safe_labels: torch.Tensor,  # [N] int64
    lse_1: torch.Tensor,  # [N]
    lse_t: torch.Tensor,  # [N]
    coef_1: torch.Tensor,  # [N] multiplies softmax(z); also subtracted at the label
    coef_t: torch.Tensor,  # [N] multiplies softmax(z / τ)
    grad_on_support: torch.Tensor,  # [N, K] final gradient values at the top-k ids
    temperature: float,
    chunk_rows: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The [N, V] gradient in ``out_dtype`` (default the logits' dtype; the only [N, V] allocation)."""
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    chunk_rows = chunk_rows or chunk_rows_for(vocab)
    grad = torch.empty(logits.shape, dtype=out_dtype or logits.dtype, device=logits.device)
    direct = grad.dtype == cdt
    scaled = temperature != 1.0
    # τ = 1: both softmaxes are one; fold the coefficients so there is a single exp per element
    dense_1 = coef_1 if scaled else coef_1 + coef_t
    # skipping the CE softmax when no row has CE weight saves an exp per element; the test reads the data,
    # free on CPU but a host-device sync on CUDA, where the pass runs regardless
    use_p1 = (not scaled) or logits.device.type != "cpu" or bool((coef_1 != 0).any())
    rows = min(chunk_rows, n)
    work = None if direct else torch.empty((rows, vocab), dtype=cdt, device=logits.device)
    work_t = torch.empty((rows, vocab), dtype=cdt, device=logits.device) if scaled else None
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        z = logits[r0:r1].to(cdt)
        g = grad[r0:r1] if direct else work[: r1 - r0]
        if use_p1:
            torch.sub(z, lse_1[r0:r1].unsqueeze(1), out=g)
            g.exp_().mul_(dense_1[r0:r1].unsqueeze(1))
        else:
            g.zero_()
        if scaled:
            tmp = torch.mul(z, 1.0 / temperature, out=work_t[: r1 - r0])
            tmp.sub_(lse_t[r0:r1].unsqueeze(1)).exp_()
            g.addcmul_(tmp, coef_t[r0:r1].unsqueeze(1))
        g.scatter_add_(1, safe_labels[r0:r1].unsqueeze(1), -coef_1[r0:r1].unsqueeze(1))
        g.scatter_(1, topk_ids[r0:r1], grad_on_support[r0:r1])
        if not direct:
            grad[r0:r1].copy_(g)
    return grad
