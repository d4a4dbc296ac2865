"""Sampled knowledge distillation: an unbiased forward-KL / soft-target CE loss from teacher samples.

Shape notation:
    N: rows (flattened positions), V: vocabulary, S: stored sample slots per row, D: draws per row.

Inputs (the cache's sampled target, tracker issue 10; the build side comes later):

    student_logits   [..., V]  z, fp32/bf16/fp16/fp64 (math in fp32, fp64 for fp64)
    sample_ids       [..., S]  ids drawn from the teacher, any integer dtype; slots with count 0 are padding
                               (their id is ignored, it may even be out of range)
    sample_counts    [..., S]  c_j ≥ 0, integer: how often id_j came up in D = Σ_j c_j i.i.d. draws from
                               p_T^τs = softmax(teacher_logits / τs); D may differ per row
    sample_logprobs  [..., S]  optional ℓ_j = log p_T(id_j) at τ = 1, exact (fp16/bf16/fp32)
    teacher_lse      [...]     L = logsumexp(teacher_logits)             (cache key ``lse``)
    teacher_lse_sample_temperature [...]  L_τs = logsumexp(teacher_logits / τs)
    teacher_lse_at_temperature     [...]  L_τ  = logsumexp(teacher_logits / τ)
    labels           [...]     for CE and ignore_index

Exact teacher log-probs at any temperature t from the stored ones: log p_T^t(id) = (ℓ + L)/t − L_t
(L_1 = L, so at t = 1 this is ℓ).

Estimator (per row; u = z/τ, log q^τ = log_softmax(u)). The soft-target cross-entropy at the loss
temperature τ, C = E_{y~p_T^τ}[−log q^τ(y)], is estimated by

    Ĉ = Σ_j a_j · (−log q^τ(id_j)),     a_j = (c_j / D) · w_j

    τs == τ:  w_j = 1 (no teacher values needed).  E[c_j/D] = p_T^τ(id_j): unbiased.
    τs != τ:  plain importance sampling, w_j = p_T^τ(id_j) / p_T^τs(id_j)
              = exp((ℓ_j + L)/τ − L_τ − (ℓ_j + L)/τs + L_τs)   (needs ℓ, L, L_τ, L_τs)
              E[Σ_j (c_j/D) w_j f(id_j)] = Σ_y p^τs(y) (p^τ(y)/p^τs(y)) f(y) = E_{p^τ}[f]: unbiased
              (Σ_j a_j is 1 only in expectation). Self-normalized IS (a_j / Σ a_j) would need no lse but is
              biased at finite D; it is not what this module implements.

Forward KL = C − H(p_T^τ). Without ``sample_logprobs`` D_r = Ĉ (the teacher entropy is a constant w.r.t. the
student: same gradient, value offset by H). With them D_r = Ĉ + Σ_j a_j log p_T^τ(id_j), whose second term
is an unbiased estimate of −H, so D_r is an unbiased estimate of KL(p_T^τ ‖ q^τ) (it can be < 0 for one
draw). reverse_kl, jsd and tvd need the student's value at the teacher's density at points the student
picks (or a non-linear function of p_T), which samples from the teacher cannot estimate without bias: they
raise ``ValueError``.

Loss (same conventions as :func:`kdlib.kd_loss`):

    L = ce_weight · mean_valid CE(z, labels)  +  kd_weight · (τ² if tau_squared) · mean_valid D_r

Valid = label ≠ ignore_index (all rows when labels is None); reduction ``mean`` (over valid rows, 0.0 when
none), ``sum`` or ``none`` ([...], 0 on ignored rows). A valid row whose counts sum to 0 raises.

Gradient (closed form, what the fused backward writes), with A = Σ_j a_j and kd_scale = kd_weight · τ²:

    dD_r/dz = (A · softmax(z/τ) − Σ_j a_j e_{id_j}) / τ          (scatter-add over the sample slots)
    dL_r/dz_k = c1 · softmax(z)_k + ct · softmax(z/τ)_k − c1 [k = label] − Σ_{j: id_j = k} kd_scale · a_j / τ
    c1 = ce_weight, ct = kd_scale · A / τ

Since a_j does not depend on z, E[dD_r/dz] = (softmax(z/τ) − p_T^τ)/τ, the exact full-distribution gradient
of soft-target CE (and of forward KL): the estimator's gradient is unbiased too (tests/test_losses_sampled.py
checks it statistically). Duplicate ids in a row are allowed: the estimator is a sum over slots.

:func:`sampled_kd_loss_reference` is naive torch (full log_softmax, autograd). :func:`sampled_kd_loss` is
the fused version: the forward reads [N, V] once (:func:`kdlib.losses.torch_pass.row_stats`: logsumexps and
S + 1 gathers), the backward writes the gradient once (:func:`kdlib.losses.torch_pass.write_grad`, the
sample slots written as complete values so the dense part and the sample term never cancel in low precision).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import torch_pass
from ._inputs import reduce_rows
from .backends import RowStats
from .options import REDUCTIONS
from .sparse_math import LOG_TAIL_FLOOR

__all__ = ["sampled_kd_loss", "sampled_kd_loss_reference", "SampledKDFunction", "UNBIASED_DIVERGENCES"]

UNBIASED_DIVERGENCES = ("forward_kl",)
_NO_ESTIMATOR = ("reverse_kl", "jsd", "tvd")


class SampledInputs(NamedTuple):
    logits: torch.Tensor  # [N, V]
    ids: torch.Tensor  # [N, S] int64, padding slots set to 0
    weights: torch.Tensor  # [N, S] a_j, compute dtype, 0 on ignored rows and padding
    teacher_term: torch.Tensor  # [N] Σ_j a_j log p_T^τ(id_j) (0 without sample_logprobs / on ignored rows)
    valid: torch.Tensor  # [N] bool
    safe_labels: torch.Tensor  # [N] int64, 0 where ignored
    lead_shape: tuple


def _check_settings(divergence, temperature, sample_temperature, ce_weight, kd_weight, reduction):
    if divergence in _NO_ESTIMATOR:
        raise ValueError(
            f"divergence {divergence!r} has no unbiased estimator from teacher samples (it needs the teacher's "
            f"density at points the student picks, or a non-linear function of it); use divergence='forward_kl' "
            f"with sampled targets, or a top-k cache with kdlib.kd_loss for {divergence!r}")
    if divergence not in UNBIASED_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; sampled targets support {UNBIASED_DIVERGENCES}")
    for name, value in (("temperature", temperature), ("sample_temperature", sample_temperature)):
        if not float(value) > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not float(value) >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")


def _check_row_tensor(name, tensor, lead_shape):
    if tensor is not None and tuple(tensor.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (student_logits without V), "
                         f"got {tuple(tensor.shape)}")


def _check_shapes(student_logits, sample_ids, sample_counts, labels, sample_logprobs):
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"student_logits must be [..., V] with V >= 1, got {tuple(student_logits.shape)}")
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    lead = tuple(student_logits.shape[:-1])
    if sample_ids.dim() != student_logits.dim() or tuple(sample_ids.shape[:-1]) != lead:
        raise ValueError(f"sample_ids must be [..., S] with the leading dims {lead} of student_logits, "
                         f"got {tuple(sample_ids.shape)}")
    for name, tensor in (("sample_ids", sample_ids), ("sample_counts", sample_counts)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")
    if tuple(sample_counts.shape) != tuple(sample_ids.shape):
        raise ValueError(f"sample_counts must have the shape of sample_ids {tuple(sample_ids.shape)}, "
                         f"got {tuple(sample_counts.shape)}")
    if sample_logprobs is not None and tuple(sample_logprobs.shape) != tuple(sample_ids.shape):
        raise ValueError(f"sample_logprobs must have the shape of sample_ids {tuple(sample_ids.shape)}, "
                         f"got {tuple(sample_logprobs.shape)}")
    _check_row_tensor("labels", labels, lead)
    return lead


def _row_lse(name, given, lse, temperature, lead):
    """L_t for temperature t: the given tensor, or L itself at t = 1; None if neither."""
    _check_row_tensor(name, given, lead)
    if given is not None:
        return given
    return lse if temperature == 1.0 else None


def _importance_weights(logprobs, lse, lse_tau, lse_ts, tau, ts):
    """(log w [N, S], log p_T^τ [N, S]) from the exact stored log-probs; w = 1 when τs == τ."""
    log_p_tau = logprobs if tau == 1.0 else (logprobs + lse.unsqueeze(1)) / tau - lse_tau.unsqueeze(1)
    if ts == tau:
        return torch.zeros_like(logprobs), log_p_tau
    log_p_ts = logprobs if ts == 1.0 else (logprobs + lse.unsqueeze(1)) / ts - lse_ts.unsqueeze(1)
    return log_p_tau - log_p_ts, log_p_tau


def _teacher_weights(counts, valid, cdt, teacher, tau, ts):
    """a_j [N, S] and Σ_j a_j log p_T^τ(id_j) [N] (see the module docstring)."""
    logprobs, lse, lse_tau, lse_ts = teacher
    n_draws = counts.sum(1, keepdim=True)  # [N, 1]
    if bool((valid & (n_draws.squeeze(1) == 0)).any()):
        raise ValueError("a position that is not ignored has sample_counts summing to 0 (no teacher draws); "
                         "set its label to ignore_index or give it at least one draw")
    weights = counts.to(cdt) / n_draws.clamp_min(1).to(cdt)  # [N, S]
    teacher_term = torch.zeros(counts.shape[0], dtype=cdt, device=counts.device)
    if logprobs is None:
        if ts != tau:
            raise ValueError(f"sample_temperature {ts:g} != temperature {tau:g} needs importance weights: pass "
                             "sample_logprobs (exact log p_T at tau=1), teacher_lse and the teacher lse at both "
                             "temperatures (or sample with --sample-temperature equal to the loss temperature)")
        return weights * valid.unsqueeze(1).to(cdt), teacher_term
    needs = [("teacher_lse", lse, tau != 1.0 or ts != 1.0),
             ("teacher_lse_at_temperature", lse_tau, tau != 1.0),
             ("teacher_lse_sample_temperature", lse_ts, ts != tau and ts != 1.0)]
    for name, tensor, needed in needs:
        if needed and tensor is None:
            raise ValueError(f"{name} is required with sample_logprobs at temperature={tau:g}, "
                             f"sample_temperature={ts:g} (exact teacher log-probs at those temperatures)")
    cast = [None if t is None else t.to(cdt) for t in (lse, lse_tau, lse_ts)]
    log_w, log_p_tau = _importance_weights(logprobs.to(cdt), *cast, tau, ts)
    used = counts > 0
    weights = torch.where(used & valid.unsqueeze(1), weights * log_w.exp(), torch.zeros_like(weights))
    teacher_term = (weights * torch.where(used, log_p_tau, torch.zeros_like(log_p_tau))).sum(1)
    return weights, teacher_term


def prepare_sampled_inputs(student_logits, sample_ids, sample_counts, *, labels, sample_logprobs, teacher_lse,
                           teacher_lse_at_temperature, teacher_lse_sample_temperature, sample_temperature,
                           temperature, ce_weight, kd_weight, ignore_index, reduction, divergence):
    """Validate everything once and flatten to the [N, ...] tensors both implementations use."""
    _check_settings(divergence, temperature, sample_temperature, ce_weight, kd_weight, reduction)
    lead = _check_shapes(student_logits, sample_ids, sample_counts, labels, sample_logprobs)
    tau, ts = float(temperature), float(sample_temperature)
    if float(ce_weight) > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    _check_row_tensor("teacher_lse", teacher_lse, lead)
    lse_tau = _row_lse("teacher_lse_at_temperature", teacher_lse_at_temperature, teacher_lse, tau, lead)
    lse_ts = _row_lse("teacher_lse_sample_temperature", teacher_lse_sample_temperature, teacher_lse, ts, lead)
    vocab = student_logits.shape[-1]
    n_slots = sample_ids.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    n = logits.shape[0]
    counts = sample_counts.reshape(n, n_slots).to(torch.int64)
    ids = sample_ids.reshape(n, n_slots).to(torch.int64)
    if bool((counts < 0).any()):
        raise ValueError("sample_counts must be >= 0 (draw counts); found a negative count")
    used = counts > 0
    if bool((used & ((ids < 0) | (ids >= vocab))).any()):
        raise ValueError(f"sample_ids with a count > 0 must lie in [0, V={vocab}); found one outside "
                         "(student and teacher vocabularies differ?)")
    ids = torch.where(used, ids, torch.zeros_like(ids))
    if labels is None:
        valid = torch.ones(n, dtype=torch.bool, device=logits.device)
        safe_labels = torch.zeros(n, dtype=torch.int64, device=logits.device)
    else:
        flat_labels = labels.reshape(n).to(torch.int64)
        valid = flat_labels != ignore_index
        if bool((valid & ((flat_labels < 0) | (flat_labels >= vocab))).any()):
            raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}")
        safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    cdt = torch_pass.compute_dtype(logits.dtype)
    flat = [None if t is None else t.reshape(n, *t.shape[len(lead):])
            for t in (sample_logprobs, teacher_lse, lse_tau, lse_ts)]
    weights, teacher_term = _teacher_weights(counts, valid, cdt, flat, tau, ts)
    return SampledInputs(logits, ids, weights, teacher_term, valid, safe_labels, lead)


def _sampled_loss(row_losses, *, tau_squared, **arguments):
    """Validate and flatten the arguments, run ``row_losses(logits, inputs, τ, c1, kd_scale)`` -> [N], reduce."""
    inp = prepare_sampled_inputs(**arguments)
    tau = float(arguments["temperature"])
    kd_scale = float(arguments["kd_weight"]) * (tau * tau if tau_squared else 1.0)
    rows = row_losses(inp.logits, inp, tau, float(arguments["ce_weight"]), kd_scale)  # [N]
    return reduce_rows(rows, inp.valid, arguments["reduction"], inp.lead_shape)


def _reference_rows(logits, inp: SampledInputs, tau: float, c1: float, kd_scale: float) -> torch.Tensor:
    """Naive per-row loss [N]: full log_softmax, autograd for the gradient."""
    z = logits.to(torch_pass.compute_dtype(logits.dtype))  # [N, V]
    log_q = torch.log_softmax(z / tau, dim=-1)  # [N, V]
    soft_ce = -(inp.weights * log_q.gather(1, inp.ids)).sum(1)  # [N]
    rows = kd_scale * (soft_ce + inp.teacher_term)
    if c1 > 0:
        ce = torch.nn.functional.cross_entropy(z, inp.safe_labels, reduction="none")  # [N]
        rows = rows + c1 * ce
    return torch.where(inp.valid, rows, torch.zeros_like(rows))


def sampled_kd_loss_reference(student_logits, sample_ids, sample_counts, *, labels=None, sample_logprobs=None,
                              teacher_lse_sample_temperature=None, sample_temperature=1.0, temperature=1.0,
                              ce_weight=0.0, kd_weight=1.0, ignore_index=-100, tau_squared=True, reduction="mean",
                              teacher_lse=None, teacher_lse_at_temperature=None, divergence="forward_kl"):
    """Naive sampled-KD loss (full log_softmax, autograd); the definition :func:`sampled_kd_loss` is tested on.

    Args: see the module docstring (shapes, the estimator, which teacher tensors each temperature needs).

    Returns:
        Scalar loss (fp32, fp64 for fp64 logits), or [...] per position with ``reduction="none"``.
    """
    return _sampled_loss(_reference_rows, **locals())


def _slot_totals(ids, values, vocab):
    """Σ over the slots of a row sharing the slot's id, per slot [N, S] (duplicates: padding, repeats)."""
    n, n_slots = ids.shape
    keys = (torch.arange(n, device=ids.device).unsqueeze(1) * vocab + ids).reshape(-1)  # [N·S]
    unique, inverse = torch.unique(keys, return_inverse=True)
    totals = torch.zeros(unique.shape, dtype=values.dtype, device=values.device)
    totals.index_add_(0, inverse, values.reshape(-1))
    return totals[inverse].reshape(n, n_slots)


class SampledKDFunction(torch.autograd.Function):
    """Per-row sampled-KD + CE loss [N] from logits [N, V]; closed-form backward (module docstring)."""

    @staticmethod
    def forward(ctx, logits, inp: SampledInputs, tau: float, c1: float, kd_scale: float):  # noqa: D401
        cdt = torch_pass.compute_dtype(logits.dtype)
        stats = torch_pass.row_stats(logits, inp.ids, inp.safe_labels, tau, need_lse_1=c1 > 0 or tau == 1.0,
                                     need_tail=False, log_tail_floor=LOG_TAIL_FLOOR, stats_type=RowStats)
        valid = inp.valid.to(cdt)
        weight_sum = inp.weights.sum(1)  # [N] A
        soft_ce = weight_sum * stats.lse_t - (inp.weights * stats.logits_on_support).sum(1) / tau
        rows = kd_scale * (soft_ce + inp.teacher_term)
        coef_1 = c1 * valid  # [N]
        if c1 > 0:
            rows = rows + c1 * (stats.lse_1 - stats.logit_at_label)
        rows = torch.where(inp.valid, rows, torch.zeros_like(rows))
        coef_t = (kd_scale / tau) * weight_sum * valid  # [N]
        # complete gradient values at the sample slots (dense part + every slot sharing the id)
        dense = (stats.logits_on_support / tau - stats.lse_t.unsqueeze(1)).exp() * coef_t.unsqueeze(1)
        if c1 > 0:
            p1 = (stats.logits_on_support - stats.lse_1.unsqueeze(1)).exp()
            at_label = (inp.ids == inp.safe_labels.unsqueeze(1)).to(cdt)
            dense = dense + coef_1.unsqueeze(1) * (p1 - at_label)
        sample_part = _slot_totals(inp.ids, -(kd_scale / tau) * inp.weights, logits.shape[1])
        ctx.save_for_backward(logits, inp.ids, inp.safe_labels, stats.lse_1, stats.lse_t, coef_1, coef_t,
                              dense, sample_part)
        ctx.temperature = tau
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        logits, ids, safe_labels, lse_1, lse_t, coef_1, coef_t, dense, sample_part = ctx.saved_tensors
        go = grad_rows.to(coef_1.dtype)  # [N]
        on_slots = (dense + sample_part) * go.unsqueeze(1)  # [N, S]
        grad = torch_pass.write_grad(logits, ids, safe_labels, lse_1, lse_t, coef_1 * go, coef_t * go, on_slots,
                                     ctx.temperature)
        return grad, None, None, None, None


def sampled_kd_loss(student_logits, sample_ids, sample_counts, *, labels=None, sample_logprobs=None,
                    teacher_lse_sample_temperature=None, sample_temperature=1.0, temperature=1.0, ce_weight=0.0,
                    kd_weight=1.0, ignore_index=-100, tau_squared=True, reduction="mean", teacher_lse=None,
                    teacher_lse_at_temperature=None, divergence="forward_kl"):
    """Fused sampled-KD loss: same arguments and value as :func:`sampled_kd_loss_reference`.

    Reads [N, V] once forward and writes the gradient (in the logits' dtype) once backward; saves only [N] and
    [N, S] tensors besides the logits.
    """
    return _sampled_loss(SampledKDFunction.apply, **locals())
