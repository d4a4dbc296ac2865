"""Sparse-KD + CE loss straight from hidden states and the LM head, never materializing [N, V] logits.

Shape notation:
    N: rows (flattened positions), H: hidden size, V: vocabulary, K: teacher top-k (or the weighted ids of
    sample / hybrid targets, :mod:`.targets`), C: rows per chunk.

Forward walks the rows in chunks of C: logits_c = hidden_c @ Wᵀ (+ b) [C, V], the fused loss's forward
and closed-form gradient on that chunk (same backend passes as :func:`kdlib.kd_loss`), then immediately

    grad_hidden_c = grad_logits_c @ W          [C, H]
    grad_W       += grad_logits_cᵀ @ hidden_c  [V, H]  (fp32 accumulator)
    grad_b       += Σ_rows grad_logits_c       [V]

so the peak extra memory is O(C × V) (the chunk's logits and their gradient) plus the [V, H] gradient
accumulator; the backward only scales the stored gradients by grad_output (no matmul there). Matmuls stay in
PyTorch (cuBLAS / MKL beat a hand-written kernel); the per-chunk V-pass uses Triton on CUDA.

With the PyTorch pass and logits in the compute dtype (fp32 / fp64, the CPU default) the chunk's logits live
in one [C, V] buffer reused for every chunk, and :class:`ScratchPass` turns them into their gradient in place
(exp(z − m) computed once and kept: six passes over [C, V] instead of ~ten, no [C, V] allocation per chunk).
At [4096, 512] × [32000, 512] fp32 on 2 CPU cores that pass alone measured 5× faster than the keep-the-logits
pair (row_stats + write_grad) it replaces here; the three matmuls are then ~90 % of the time.

CE only: ``kd_weight=0`` with labels and no teacher targets (compare Cut Cross-Entropy's
``linear_cross_entropy``).

Low-precision (bf16/fp16) parameters: the chunk gradient is written in fp32 and accumulated into an fp32
[V, H] buffer with ``addmm_`` (the only copies are chunk-sized: [C, H] of hidden and the [C, V] gradient
cast back for ``grad_hidden``); the accumulator is cast to the parameter dtype once, after the last chunk.
Without grad mode (``torch.no_grad()``, eval) or when nothing requires grad, only the forward runs: no
gradient buffers, no [C, V] gradient, no extra matmuls.
"""

from __future__ import annotations

from typing import Any

import torch

from ._inputs import FlatInputs
from .backends import get_backend, resolve_backend
from .fused import row_loss_and_grad_coefs
from .options import KDLossOptions, resolve_options
from .targets import SampleTargets, WeightedTargets, flatten_any
from .torch_pass import compute_dtype

__all__ = ["kd_loss_from_hidden", "ScratchPass"]


class ScratchPass:
    """The PyTorch V-pass on scratch logits: the chunk's logits buffer becomes its gradient, in place.

    A backend object (``row_stats`` / ``write_grad`` as in :mod:`.backends`) for one call of the from-hidden
    loss, where the chunk's logits [C, V] are a buffer nobody else reads. ``row_stats`` gathers z on S and at
    the label, subtracts the row max in place and exponentiates there (``e = exp(z − m)``, the buffer now holds
    it); ``write_grad`` then scales the same buffer by ``coef / Σe`` and writes the label and S entries: six
    passes over [C, V] and no [C, V] allocation per chunk, against ~ten passes and a fresh [C, V] gradient for
    :func:`.torch_pass.row_stats` + :func:`.torch_pass.write_grad` (which must keep their logits intact).
    At τ ≠ 1 with the gradient wanted, exp((z − m)/τ) goes to one second [C, V] buffer allocated per call;
    without the gradient the CE logsumexp is taken first and exp((z − m)/τ) overwrites the buffer.

    Each ``write_grad`` must follow the ``row_stats`` of the same chunk (the pair shares the exponentials).
    """

    def __init__(self, grad_wanted: bool):
        self.grad_wanted = grad_wanted
        self._work_t: torch.Tensor | None = None  # [C, V] exp((z − m)/τ) when τ ≠ 1 and the gradient is wanted
        self._e1 = self._et = self._sum_1 = self._sum_t = None

    @torch.no_grad()
    def row_stats(self, logits, topk_ids, safe_labels, temperature, need_lse_1=True, need_tail=False,
                  chunk_rows=None, *, log_tail_floor, stats_type):
        """Same record as :func:`.torch_pass.row_stats`; leaves the exponentials in ``logits`` (module docs)."""
        z = logits  # [C, V], compute dtype, contiguous scratch
        z_support = z.gather(1, topk_ids)  # [C, K]
        z_label = z.gather(1, safe_labels.unsqueeze(1)).squeeze(1)  # [C]
        scaled = temperature != 1.0
        lse_1 = None
        if scaled and need_lse_1 and not self.grad_wanted:
            lse_1 = torch.logsumexp(z, 1)  # before z is overwritten by exp((z − m)/τ)
        row_max = z.amax(1, keepdim=True)  # [C, 1]
        u = z.sub_(row_max)
        self._e1 = self._sum_1 = None
        if scaled:
            if self.grad_wanted:
                if self._work_t is None or self._work_t.shape[0] < z.shape[0]:
                    self._work_t = torch.empty_like(z)
                e_t = torch.mul(u, 1.0 / temperature, out=self._work_t[: z.shape[0]]).exp_()
                if need_lse_1:
                    self._e1 = u.exp_()
                    self._sum_1 = self._e1.sum(1)
                    lse_1 = row_max.squeeze(1) + self._sum_1.log()
            else:
                e_t = u.mul_(1.0 / temperature).exp_()
        else:
            e_t = self._e1 = u.exp_()
        sum_t = e_t.sum(1)  # [C]
        lse_t = row_max.squeeze(1) / temperature + sum_t.log()
        if not scaled:
            self._sum_1, lse_1 = sum_t, lse_t
        log_tail = None
        if need_tail:
            # zero S and sum again: the complement's mass without the cancellation of 1 − Σ_S p (the S
            # entries of the gradient are overwritten by write_grad, so the zeros cost nothing)
            e_t.scatter_(1, topk_ids, 0.0)
            log_tail = (e_t.sum(1).log() - sum_t.log()).clamp_min(log_tail_floor)
        self._et, self._sum_t = e_t, sum_t
        if lse_1 is None:
            lse_1 = torch.zeros_like(lse_t)  # not requested (no CE at τ ≠ 1): never read
        return stats_type(lse_1=lse_1, lse_t=lse_t, logits_on_support=z_support, logit_at_label=z_label,
                          log_tail=log_tail)

    @torch.no_grad()
    def write_grad(self, logits, topk_ids, safe_labels, lse_1, lse_t, coef_1, coef_t, grad_on_support,
                   temperature, chunk_rows=None, out_dtype=None):
        """The chunk's [C, V] gradient, written over the exponentials ``row_stats`` left in ``logits``."""
        if temperature == 1.0:
            g = self._e1.mul_(((coef_1 + coef_t) / self._sum_1).unsqueeze(1))
        elif self._e1 is not None:
            g = self._e1.mul_((coef_1 / self._sum_1).unsqueeze(1))
            g.addcmul_(self._et, (coef_t / self._sum_t).unsqueeze(1))
        else:  # no CE softmax (ce_weight = 0 at τ ≠ 1): coef_1 is zero
            g = self._et.mul_((coef_t / self._sum_t).unsqueeze(1))
        g.scatter_add_(1, safe_labels.unsqueeze(1), -coef_1.unsqueeze(1))
        g.scatter_(1, topk_ids, grad_on_support)
        self._e1 = self._et = None
        return g


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor | None) -> torch.Tensor:
    """[C, V] = h [C, H] @ weightᵀ (+ bias), into ``out`` when given (the scratch buffer)."""
    if bias is None:
        return torch.matmul(h, weight.t(), out=out) if out is not None else h @ weight.t()
    return torch.addmm(bias, h, weight.t(), out=out) if out is not None else torch.addmm(bias, h, weight.t())


class FusedLinearSparseKDFunction(torch.autograd.Function):
    """Scalar loss from hidden [N, H] and W [V, H]; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, flat: FlatInputs | WeightedTargets, options: KDLossOptions, backend: str, grad_wanted: bool):
        backend_mod = get_backend(backend)
        n = hidden.shape[0]
        chunk_size = int(options.chunk_size)
        acc_dtype = compute_dtype(hidden.dtype)
        # a device tensor, not a Python number: int(valid.sum()) would be a host-device sync per call
        row_scale = torch.ones((), dtype=acc_dtype, device=hidden.device)
        if options.reduction == "mean":
            row_scale = 1.0 / flat.valid.sum().clamp_min(1).to(acc_dtype)
        # needs_input_grad only reflects requires_grad; under torch.no_grad() it stays True, so the caller
        # passes grad_wanted (grad mode was on) and nothing gradient-related is computed in eval loops
        need_hidden, need_weight, need_bias = (grad_wanted and ctx.needs_input_grad[i] for i in range(3))
        need_bias = need_bias and bias is not None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulators whatever the parameter dtype: summing bf16 partial products over chunks would
        # lose the small ones; cast once after the loop
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_bias else None
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        # the PyTorch pass on logits in the compute dtype runs in place on one reused [C, V] buffer
        scratch = ScratchPass(grad_wanted) if backend == "torch" and hidden.dtype == acc_dtype else None
        buffer = None if scratch is None else torch.empty((min(chunk_size, n), weight.shape[0]), dtype=acc_dtype,
                                                          device=hidden.device)  # [C, V]
        pass_mod = backend_mod if scratch is None else scratch
        for r0 in range(0, n, chunk_size):
            r1 = min(n, r0 + chunk_size)
            h = hidden[r0:r1]  # [C, H]
            logits = _chunk_logits(h, weight, bias, None if buffer is None else buffer[: r1 - r0])  # [C, V]
            sub = flat.rows(r0, r1)
            out = row_loss_and_grad_coefs(logits, sub, options, pass_mod)
            total += out.rows.sum().to(acc_dtype)
            if not (need_hidden or need_weight or need_bias):
                continue  # forward only: no [C, V] gradient, no matmuls
            # the chunk's gradient straight in the accumulator dtype: no rounding to bf16 before the
            # reduction over rows in grad_W (the pass computes in fp32 anyway)
            grad_logits = pass_mod.write_grad(
                logits, sub.support_ids, sub.safe_labels, out.lse_1, out.lse_t, out.coef_1 * row_scale,
                out.coef_t * row_scale, out.grad_on_support * row_scale, options.temperature,
                chunk_rows=options.chunk_rows, out_dtype=acc_dtype)  # [C, V] fp32 (fp64 for fp64 inputs)
            del logits  # (the scratch pass wrote grad_logits over it)
            if need_hidden:
                g_low = grad_logits if hidden.dtype == acc_dtype else grad_logits.to(hidden.dtype)  # [C, V]
                torch.matmul(g_low, weight, out=grad_hidden[r0:r1])
                del g_low
            if need_weight:
                # [V, C] @ [C, H] accumulated in place: only chunk-sized copies ([C, H] here), never a
                # [V, H] temporary per chunk
                grad_weight.addmm_(grad_logits.t(), h if h.dtype == acc_dtype else h.to(acc_dtype))
            if need_bias:
                grad_bias += grad_logits.sum(0)
            del grad_logits
        if grad_weight is not None and weight.dtype != acc_dtype:
            grad_weight = grad_weight.to(weight.dtype)  # the one cast; the fp32 accumulator is freed
        if grad_bias is not None and bias.dtype != acc_dtype:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total * row_scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # a 0-dim fp32 factor does not promote: each product is computed in fp32 and rounded once to the
        # parameter's dtype, allocating only the returned gradient
        gh = None if grad_hidden is None else grad_hidden * grad_output
        gw = None if grad_weight is None else grad_weight * grad_output
        gb = None if grad_bias is None else grad_bias * grad_output
        return gh, gw, gb, None, None, None, None


def kd_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    *,
    lm_head_bias: torch.Tensor | None = None,
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
    """:func:`kdlib.kd_loss` of ``hidden @ lm_head_weightᵀ + lm_head_bias`` without materializing it.

    Same options and definitions as :func:`kdlib.kd_loss` (reduction ``mean`` or ``sum`` only, backend not
    ``reference``), plus ``chunk_size``. Gradients for ``hidden``, ``lm_head_weight`` and ``lm_head_bias``
    are computed during the forward, ``chunk_size`` rows at a time, so peak memory is O(chunk_size × V)
    instead of O(N × V). Under ``torch.no_grad()`` (or when no input requires grad) only the loss is
    computed, at the cost of a forward.

    Args:
        hidden: [..., H] final hidden states (after the final norm).
        lm_head_weight: [V, H] output embedding.
        topk_ids, topk_logprobs, labels, teacher_lse, teacher_lse_at_temperature, sample_ids, sample_counts,
            sample_logprobs, sample_temperature, teacher_lse_sample_temperature: as in kd_loss (any of the three
            target kinds), with leading dims equal to hidden's.
        lm_head_bias: optional [V].
        options: a :class:`~kdlib.losses.options.KDLossOptions` (default: every default).
        **option_kwargs: its fields as keywords (replacing those of ``options``): ``ce_weight``,
            ``kd_weight``, ``temperature``, ``divergence``, ``tail``, ``tau_squared``, ``ignore_index``,
            ``beta``, ``reduction``, ``backend``, ``validate``, ``chunk_rows``, ``chunk_size`` (rows per chunk,
            default 1024; memory ∝ chunk_size × V).

    Returns:
        Scalar loss (fp32; fp64 for fp64 inputs).

    CE only (cross-entropy from hidden states, like Cut Cross-Entropy): ``kd_weight=0.0, ce_weight=1.0`` with
    ``labels`` and no teacher targets.
    """
    options = resolve_options(options, option_kwargs, entry_point="kd_loss_from_hidden")
    if lm_head_weight.dim() != 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(f"lm_head_weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(lm_head_weight.shape)}")
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (vocab,):
        raise ValueError(f"lm_head_bias must be [V={vocab}], got {tuple(lm_head_bias.shape)}")
    lead = tuple(hidden.shape[:-1])
    ce_only = topk_ids is None and topk_logprobs is None and sample_ids is None and options.kd_weight == 0
    if ce_only and labels is not None and tuple(labels.shape) == lead and hidden.device.type == "cpu":
        # CE only: ignored rows add nothing to the loss and get a zero gradient, so only the labelled rows
        # enter the three matmuls (as Cut Cross-Entropy does); CPU only, where the row count's host read is free
        keep = (labels != options.ignore_index).reshape(-1)
        if not bool(keep.all()):
            rows = keep.nonzero().squeeze(1)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
            labels = labels.reshape(-1).index_select(0, rows)
            lead = (rows.numel(),)
    if ce_only:
        # CE only (kd_weight=0, no teacher targets): one dummy support id per row, whose gradient entry the
        # pass writes as its complete CE value; the cost of K = 1 gathers and writes
        topk_ids = torch.zeros(lead + (1,), dtype=torch.int64, device=hidden.device)
        topk_logprobs = torch.zeros(lead + (1,), dtype=torch.float32, device=hidden.device)
    samples = SampleTargets.of(sample_ids, sample_counts, sample_logprobs, sample_temperature,
                               teacher_lse_sample_temperature)
    flat = flatten_any(lead, vocab, hidden.device, compute_dtype(hidden.dtype), topk_ids, topk_logprobs, labels,
                       teacher_lse, teacher_lse_at_temperature, samples, options)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    resolved = resolve_backend(options.backend, hidden.device)
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias))
    return FusedLinearSparseKDFunction.apply(hidden_2d, lm_head_weight, lm_head_bias, flat, options, resolved,
                                             grad_wanted)
