"""What a cache's targets become for the loss: the kind, and for sample / hybrid targets weights a_j on ids.

Shape notation:
    N: rows (flattened positions), V: vocabulary, H: exact head of a hybrid target (its top-H), W: sample
    slots per row, S: the ids the loss sees (W for sample, H + W for hybrid), D: draws of a row (Σ_j c_j).

Target kinds (:data:`~kdlib.losses.options.TARGET_KINDS`, picked by :func:`target_kind` from the tensors given):

    topk    topk_ids / topk_logprobs only: the exact K-wide math of kd_loss (docs/LOSSES.md), not this module.
    sample  sample_ids / sample_counts (/ sample_logprobs) only: D i.i.d. draws from p_T^τs over the vocabulary.
    hybrid  both: topk_* is an exact head 𝓗 of H ids, sample_* holds D draws from the teacher at τs restricted
            to the rest of the vocabulary, π(y) = p_T^τs(y) / R^τs for y ∉ 𝓗 (R^t = 1 − Σ_𝓗 p_T^t, exact).

Teacher log-probs at any temperature t come from the stored exact ones (ℓ, τ = 1) and the build's lse:
log p_T^t = (ℓ + L)/t − L_t (:func:`~kdlib.losses._inputs.tempered_logprobs`). Both non-top-k kinds reduce to
one form, weights a_j ≥ 0 on ids id_j that do not depend on the student, and a teacher term t_r:

    D_r = Σ_j a_j (−log q^τ(id_j)) + t_r,        dD_r/dz = (A · softmax(z/τ) − Σ_j a_j e_{id_j}) / τ,  A = Σ_j a_j

so one student pass serves both (:mod:`kdlib.losses.weighted`, on the torch or Triton backend):

    sample  a_j = (c_j/D) w_j,   w_j = 1 (τs = τ)  or  p_T^τ(id_j) / p_T^τs(id_j)  (importance weight)
            t_r = Σ_j a_j log p_T^τ(id_j) with sample_logprobs, else 0 (D_r then estimates soft-target CE)
    hybrid  head i ∈ 𝓗: a_i = p_T^τ(i) (exact);   samples: a_j = (c_j/D) w_j with
            w_j = R^τ (τs = τ)   or   w_j = p_T^τ(id_j) / π(id_j) = p_T^τ(id_j) R^τs / p_T^τs(id_j)
            t_r = Σ_𝓗 p_T^τ log p_T^τ (exact)  +  Σ_samples a_j log p_T^τ(id_j) (with sample_logprobs)

Unbiasedness of the hybrid estimator: soft-target CE splits exactly into the head and the rest,
C = Σ_𝓗 p^τ(i)(−log q^τ(i)) + Σ_{y∉𝓗} p^τ(y)(−log q^τ(y)), and since E[c_j/D] = π(id_j),

    E[Σ_j (c_j/D) w_j f(id_j)] = Σ_{y∉𝓗} π(y) (p^τ(y)/π(y)) f(y) = Σ_{y∉𝓗} p^τ(y) f(y)      for every f

(at τs = τ, π(y) R^τ = p^τ(y)). With f = −log q^τ this is the value, with f = ∂(−log q^τ)/∂z the gradient (a_j
does not depend on z), with f = log p^τ the rest's part of −H(p_T^τ): D_r is an unbiased estimate of
KL(p_T^τ ‖ q^τ) (without sample_logprobs: of KL plus the rest's entropy term, a constant; same gradient). A
hybrid row without draws (D = 0: the build found no mass outside the head) keeps its exact head only.
Reverse KL, JSD and TVD have no unbiased estimator from samples: :func:`~kdlib.losses.options.check_for_targets`
raises. ``tail`` has no meaning here (the estimate is of the full-vocabulary teacher) and is ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from ._inputs import FlatInputs, flat_labels, flatten_targets, range_errors, tempered_logprobs
from .options import KDLossOptions, check_for_targets

__all__ = ["SampleTargets", "WeightedTargets", "target_kind", "sample_temperature_value", "flatten_any"]


class SampleTargets(NamedTuple):
    """The sampled part of a target as given to the loss (leading dims of the student's logits)."""

    ids: torch.Tensor | None  # [..., W] any integer dtype; slots with count 0 are padding (id ignored)
    counts: torch.Tensor | None  # [..., W] c_j >= 0, integer
    logprobs: torch.Tensor | None  # [..., W] exact log p_T(id_j) at τ = 1, or None
    temperature: float  # τs, the temperature the build drew at
    lse_sample_temperature: torch.Tensor | None  # [...] L_τs = logsumexp(teacher_logits / τs)

    @classmethod
    def of(cls, ids, counts, logprobs, temperature, lse_sample_temperature) -> SampleTargets:
        """The entry points' keyword arguments, τs read once (:func:`sample_temperature_value`)."""
        return cls(ids, counts, logprobs, sample_temperature_value(temperature), lse_sample_temperature)


@dataclasses.dataclass
class WeightedTargets:
    """Sample or hybrid targets as weights on ids, flattened to rows and validated (module docstring)."""

    kind: str  # "sample" | "hybrid"
    ids: torch.Tensor  # [N, S] int64 (hybrid: the H head ids, then the W slots), padding slots set to 0
    weights: torch.Tensor  # [N, S] a_j in the compute dtype, 0 on ignored rows and padding slots
    teacher_term: torch.Tensor  # [N] t_r (0 on ignored rows)
    valid: torch.Tensor  # [N] bool
    safe_labels: torch.Tensor  # [N] int64, 0 where ignored
    lead_shape: torch.Size

    @property
    def support_ids(self) -> torch.Tensor:
        """[N, S] the ids whose gradient entries the backward writes as complete values."""
        return self.ids

    def rows(self, start: int, stop: int) -> WeightedTargets:
        """Rows [start, stop) as views (a chunk of :func:`kdlib.kd_loss_from_hidden`)."""
        return dataclasses.replace(
            self, ids=self.ids[start:stop], weights=self.weights[start:stop],
            teacher_term=self.teacher_term[start:stop], valid=self.valid[start:stop],
            safe_labels=self.safe_labels[start:stop], lead_shape=torch.Size([stop - start]))


def target_kind(topk_ids: torch.Tensor | None, sample_ids: torch.Tensor | None) -> str:
    """``topk`` (top-k tensors only), ``sample`` (sample tensors only) or ``hybrid`` (both)."""
    if topk_ids is None and sample_ids is None:
        raise ValueError("no teacher targets: pass topk_ids and topk_logprobs (a top-k cache), sample_ids and "
                         "sample_counts (a sampled cache), or both (a hybrid cache)")
    if sample_ids is None:
        return "topk"
    return "sample" if topk_ids is None else "hybrid"


def sample_temperature_value(value) -> float:
    """τs as a Python float from a number or a batch's tensor (float32: read at 7 significant digits, so a stored
    0.7 is 0.7 again, equal to a loss temperature of 0.7 and named ``lse_t0.7``). A [B] tensor (a default
    collate of per-row 0-dim entries) passes when all its values agree."""
    if isinstance(value, torch.Tensor):
        values = value.reshape(-1)
        if values.numel() == 0 or bool((values != values[0]).any()):
            raise ValueError(f"sample_temperature must be one number (or equal values, one per row), got "
                             f"{values.tolist()}: rows of caches drawn at different temperatures need separate calls")
        value = float(f"{float(values[0]):.7g}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"sample_temperature must be a finite number > 0, got {value!r}")
    return value


def _check_sample_shapes(samples: SampleTargets, lead: tuple, device: torch.device) -> None:
    ids, counts, logprobs = samples.ids, samples.counts, samples.logprobs
    if counts is None:
        raise ValueError("sample_ids were given without sample_counts: pass both (the draw count of every slot)")
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead:
        raise ValueError(f"sample_ids must be [..., W] with the leading dims {lead} of student_logits, "
                         f"got {tuple(ids.shape)}")
    for name, tensor in (("sample_ids", ids), ("sample_counts", counts)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")
    if tuple(counts.shape) != tuple(ids.shape):
        raise ValueError(f"sample_counts must have the shape of sample_ids {tuple(ids.shape)}, "
                         f"got {tuple(counts.shape)}")
    if logprobs is not None and (tuple(logprobs.shape) != tuple(ids.shape) or not logprobs.is_floating_point()):
        raise ValueError(f"sample_logprobs must be a float tensor of the shape of sample_ids {tuple(ids.shape)}, "
                         f"got {tuple(logprobs.shape)} {logprobs.dtype}")
    for name, tensor in (("sample_ids", ids), ("sample_counts", counts), ("sample_logprobs", logprobs)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the student logits on {device}; move the batch "
                             "to the student's device")


def _check_draws(ids, counts, labels, valid, vocab: int, options: KDLossOptions, require_draws: bool,
                 signed: bool) -> None:
    """Counts >= 0, a draw in every valid row (sample targets), drawn ids and labels in [0, V): one sync when
    all is well (more reads only to word an error)."""
    bad = torch.zeros((), dtype=torch.bool, device=counts.device)
    if signed:  # unsigned counts (uint8 / uint16 from a cache) cannot be negative
        bad = bad | (counts < 0).any()
    if require_draws:
        bad = bad | (valid & (counts.sum(1) == 0)).any()
    if bad.item():
        if bool((counts < 0).any()):
            raise ValueError("sample_counts must be >= 0 (draw counts); found a negative count")
        raise ValueError("a position that is not ignored has sample_counts summing to 0 (no teacher draws); "
                         "set its label to ignore_index or give it at least one draw")
    range_errors(ids, labels, valid, vocab, options.ignore_index, name="sample_ids with a count > 0")


class _TeacherAt:
    """Exact teacher log-probs at the loss temperature τ and at τs, raising for a missing lse when needed."""

    def __init__(self, kind, lead, n, cdt, device, teacher_lse, lse_tau, samples, tau):
        self.kind, self.tau, self.ts, self.cdt = kind, tau, samples.temperature, cdt
        self.tensors = {name: self._flat(name, tensor, lead, n, device) for name, tensor in (
            ("teacher_lse", teacher_lse), ("teacher_lse_at_temperature", lse_tau),
            ("teacher_lse_sample_temperature", samples.lse_sample_temperature))}

    def _flat(self, name, tensor, lead, n, device):
        if tensor is None:
            return None
        if tuple(tensor.shape) != tuple(lead):
            raise ValueError(f"{name} must have shape {tuple(lead)} (student_logits without V), "
                             f"got {tuple(tensor.shape)}")
        return tensor.reshape(n).to(device=device, dtype=self.cdt)

    def _require(self, name, temperature):
        tensor = self.tensors[name]
        if tensor is None and name != "teacher_lse":  # at τs = τ either lse at that temperature serves
            other = {"teacher_lse_at_temperature": "teacher_lse_sample_temperature"}.get(
                name, "teacher_lse_at_temperature")
            tensor = self.tensors[other] if self.ts == self.tau else None
        if tensor is None:
            raise ValueError(
                f"{name} is required for {self.kind} targets at temperature={self.tau:g}, sample_temperature="
                f"{self.ts:g}: exact teacher log-probs at {temperature:g} are (log p + teacher_lse)/{temperature:g} "
                f"- logsumexp(teacher_logits/{temperature:g}); build the cache with --temperatures {temperature:g} "
                f"(kd_loss_from_batch then finds 'lse' and 'lse_t{temperature:g}')")
        return tensor

    def at(self, logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
        """log p_T^t [N, X] from stored log-probs [N, X] at τ = 1."""
        if temperature == 1.0:
            return logprobs
        name = "teacher_lse_at_temperature" if temperature == self.tau else "teacher_lse_sample_temperature"
        lse_t = self._require(name, temperature)
        return tempered_logprobs(logprobs, self._require("teacher_lse", temperature), lse_t, temperature)


def _log_rest(log_p_head: torch.Tensor) -> torch.Tensor:
    """log R = log(1 − Σ_𝓗 p) [N, 1] from the head's log-probs [N, H]; −inf when the head holds it all."""
    return torch.log((-torch.expm1(torch.logsumexp(log_p_head, dim=1, keepdim=True))).clamp_min(0.0))


def _weights(kind, counts, logprobs, head_logprobs, valid, teacher: _TeacherAt):
    """(a_j [N, S], t_r [N]) of the module docstring; ``head_logprobs`` [N, H] only for hybrid.

    Masks are applied as products, not ``torch.where`` (a slow, unvectorized op on CPU): padding slots have
    c_j = 0 and zeroed log-probs, so every product there is an exact 0."""
    tau, ts, cdt = teacher.tau, teacher.ts, teacher.cdt
    row_scale = (valid.to(cdt) / counts.sum(1).clamp_min(1).to(cdt)).unsqueeze(1)  # [N, 1] 1/D, 0 if ignored
    if ts != tau and logprobs is None:
        raise ValueError(f"sample_temperature {ts:g} != temperature {tau:g} needs importance weights: pass "
                         "sample_logprobs (exact log p_T at tau=1), teacher_lse and the teacher lse at both "
                         "temperatures (or sample with --sample-temperature equal to the loss temperature)")
    log_p_tau = None if logprobs is None else teacher.at(logprobs, tau)  # [N, W]
    log_w = None if ts == tau else log_p_tau - teacher.at(logprobs, ts)  # [N, W] importance weights
    if kind == "hybrid":
        log_p_head = teacher.at(head_logprobs, tau)  # [N, H]
        log_rest = _log_rest(log_p_head if ts == tau else teacher.at(head_logprobs, ts))  # [N, 1]
        log_w = log_rest if log_w is None else log_w + log_rest
        if ts == tau:  # w_j = R^τ, one per row
            row_scale, log_w = row_scale * log_w.exp(), None
    weights = counts.to(cdt) * row_scale  # [N, W] (c_j / D), 0 on padding and ignored rows
    if log_w is not None:
        weights = weights * log_w.exp()
    term = torch.zeros(counts.shape[0], dtype=cdt, device=counts.device)
    if log_p_tau is not None:
        term = (weights * log_p_tau).sum(1)
    if kind == "hybrid":
        p_head = log_p_head.exp() * valid.to(cdt).unsqueeze(1)  # [N, H] exact
        term = term - torch.special.entr(p_head).sum(1)  # Σ p log p (0 log 0 = 0)
        weights = torch.cat([p_head, weights], dim=1)
    return weights, term


# long: one validation and flattening path for both non-top-k kinds, step by step
def _weighted_targets(kind, lead, vocab, device, cdt, topk_ids, topk_logprobs, labels, teacher_lse,
                      teacher_lse_at_temperature, samples: SampleTargets, options: KDLossOptions) -> WeightedTargets:
    _check_sample_shapes(samples, lead, device)
    n, width = math.prod(lead), samples.ids.shape[-1]
    if kind == "hybrid":  # the head is checked like any top-k (shapes, dtypes, ids and labels in range)
        head = flatten_targets(lead, vocab, device, topk_ids, topk_logprobs, labels, None, None, options,
                               validate=options.validate, need_lse=False)
        valid, safe_labels = head.valid, head.safe_labels
        head_ids, head_logprobs, checked_labels = head.topk_ids, head.topk_logprobs.to(cdt), None
    else:
        checked_labels, valid = flat_labels(labels, lead, n, device, options)
        safe_labels = (torch.where(valid, checked_labels, 0) if checked_labels is not None
                       else torch.zeros(n, dtype=torch.int64, device=device))
        head_ids = head_logprobs = None
    counts = samples.counts.reshape(n, width).to(cdt)  # exact: counts are < 2^24
    used = counts > 0
    ids = samples.ids.reshape(n, width).to(torch.int64) * used  # padding ids set to 0
    if options.validate and n > 0:
        _check_draws(ids, counts, checked_labels, valid, vocab, options, require_draws=kind == "sample",
                     signed=samples.counts.dtype.is_signed)
    logprobs = None
    if samples.logprobs is not None:  # padding slots may hold anything: zero them before any arithmetic
        logprobs = torch.where(used, samples.logprobs.reshape(n, width).to(cdt), 0.0)
    teacher = _TeacherAt(kind, lead, n, cdt, device, teacher_lse, teacher_lse_at_temperature, samples,
                         float(options.temperature))
    weights, term = _weights(kind, counts, logprobs, head_logprobs, valid, teacher)
    if head_ids is not None:
        ids = torch.cat([head_ids, ids], dim=1)  # [N, H + W]
    return WeightedTargets(kind=kind, ids=ids, weights=weights, teacher_term=term,  # both 0 on ignored rows
                           valid=valid, safe_labels=safe_labels, lead_shape=torch.Size(lead))


def flatten_any(lead: tuple, vocab: int, device: torch.device, compute_dtype: torch.dtype,
                topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None, labels: torch.Tensor | None,
                teacher_lse: torch.Tensor | None, teacher_lse_at_temperature: torch.Tensor | None,
                samples: SampleTargets, options: KDLossOptions) -> FlatInputs | WeightedTargets:
    """Pick the kind, check it against the options, and validate and flatten the targets to rows.

    Returns :class:`~kdlib.losses._inputs.FlatInputs` for top-k targets, :class:`WeightedTargets` otherwise.
    Raises ValueError saying what is wrong (a divergence without unbiased estimator, shapes, dtypes, ids out of
    range, negative counts, a valid row without draws, a missing lse at a temperature that needs it).
    """
    lead = tuple(lead)
    kind = target_kind(topk_ids, samples.ids)
    check_for_targets(options, kind)
    if kind == "topk":
        if topk_logprobs is None:
            raise ValueError("topk_ids were given without topk_logprobs: pass both")
        return flatten_targets(lead, int(vocab), device, topk_ids, topk_logprobs, labels, teacher_lse,
                               teacher_lse_at_temperature, options, validate=options.validate)
    if kind == "hybrid" and topk_logprobs is None:
        raise ValueError("topk_ids were given without topk_logprobs: pass both (the exact head of a hybrid cache)")
    return _weighted_targets(kind, lead, int(vocab), device, compute_dtype, topk_ids, topk_logprobs, labels,
                             teacher_lse, teacher_lse_at_temperature, samples, options)
