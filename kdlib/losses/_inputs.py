"""Validation of kd_loss arguments and preparation of the teacher side (shared by every backend).

Shape notation:
    B: batch, T: sequence length, V: vocabulary, K: teacher top-k, N: rows = prod(leading dims).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sparse_math import DIVERGENCES, TAIL_FLOOR, TAILS, effective_divergence

__all__ = ["LossConfig", "FlatInputs", "flatten_targets", "teacher_side", "REDUCTIONS", "BACKENDS"]

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton", "reference")


@dataclass(frozen=True)
class LossConfig:
    """The keyword options of :func:`kdlib.kd_loss`, validated."""

    ce_weight: float = 0.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    tail: str = "bucket"
    tau_squared: bool = True
    ignore_index: int = -100
    beta: float = 0.5
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {DIVERGENCES}")
        if self.tail not in TAILS:
            raise ValueError(f"unknown tail {self.tail!r}; choose one of {TAILS}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; choose one of {REDUCTIONS}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta!r}")
        if self.ce_weight < 0 or self.kd_weight < 0:
            raise ValueError(f"ce_weight and kd_weight must be >= 0, got {self.ce_weight}, {self.kd_weight}")

    @property
    def effective_divergence(self) -> str:
        return effective_divergence(self.divergence, float(self.beta))

    @property
    def kd_scale(self) -> float:
        """kd_weight times tau^2 when ``tau_squared``."""
        return float(self.kd_weight) * (self.temperature**2 if self.tau_squared else 1.0)


@dataclass
class FlatInputs:
    """Inputs flattened to rows, ids widened, validated."""

    topk_ids: torch.Tensor  # [N, K] int64
    topk_logprobs: torch.Tensor  # [N, K] original dtype
    labels: torch.Tensor | None  # [N] int64
    valid: torch.Tensor  # [N] bool
    teacher_lse: torch.Tensor | None  # [N]
    teacher_lse_at_temperature: torch.Tensor | None  # [N]
    lead_shape: torch.Size


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple, hint: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {tuple(expected)} was expected ({hint})")


def flatten_targets(
    lead: tuple,
    vocab: int,
    device: torch.device,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_lse: torch.Tensor | None,
    teacher_lse_at_temperature: torch.Tensor | None,
    config: LossConfig,
    validate: bool = True,
) -> FlatInputs:
    """Check shapes/dtypes/ranges against the student's leading dims ``lead`` and vocabulary ``vocab`` and
    flatten every [..., X] target to [N, X]. Raises ValueError saying what is wrong and how to fix it.

    Shape and dtype checks read only metadata. The range checks of ``topk_ids`` and ``labels`` read the
    data: on CUDA they cost ONE host-device synchronization per call (both reduced on the device, one
    ``.item()``); ``validate=False`` skips them (out-of-range ids then give undefined results or a device
    assert instead of a clear error)."""
    return _flatten(device, topk_ids, topk_logprobs, labels, teacher_lse, teacher_lse_at_temperature, config,
                    tuple(lead), int(vocab), bool(validate))


def _range_errors(ids: torch.Tensor, labels: torch.Tensor | None, valid: torch.Tensor, vocab: int,
                  ignore_index: int) -> None:
    """Raise for ids or labels outside [0, V). Reductions stay on the device; the single ``.item()`` is
    the only synchronization, the messages are built (with more reads) only when something is wrong."""
    lo, hi = torch.aminmax(ids)
    bad = (lo < 0) | (hi >= vocab)
    if labels is not None:
        bad = bad | (valid & ((labels < 0) | (labels >= vocab))).any()
    if not bad.item():
        return
    if int(lo) < 0 or int(hi) >= vocab:
        raise ValueError(
            f"topk_ids contains ids outside [0, V={vocab}) (min {int(lo)}, max {int(hi)}); the cache was built "
            "with a different vocabulary than the student's, or the ids were not decoded")
    raise ValueError(f"labels contain values outside [0, V={vocab}) that are not ignore_index={ignore_index}")


def _flatten(device, topk_ids, topk_logprobs, labels, teacher_lse, teacher_lse_t, config, lead, vocab, validate):
    if topk_ids.dim() != len(lead) + 1 or tuple(topk_ids.shape[:-1]) != lead:
        raise ValueError(
            f"topk_ids has shape {tuple(topk_ids.shape)}; expected {lead + ('K',)} matching the student's "
            f"leading dims {lead}")
    k = topk_ids.shape[-1]
    _check_shape("topk_logprobs", topk_logprobs, lead + (k,), "same shape as topk_ids")
    if k < 1 or k > vocab:
        raise ValueError(f"top-k size K={k} must be in [1, V={vocab}]")
    if topk_ids.is_floating_point() or topk_ids.dtype == torch.bool or topk_ids.is_complex():
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if not topk_logprobs.is_floating_point():
        raise ValueError(f"topk_logprobs must be a float tensor, got {topk_logprobs.dtype}")
    if topk_ids.device != device or topk_logprobs.device != device:
        raise ValueError(f"topk_ids/topk_logprobs are on {topk_ids.device}/{topk_logprobs.device} but the "
                         f"student logits on {device}; move the batch to the student's device")
    n = math.prod(lead)
    ids = topk_ids.reshape(n, k).to(torch.int64)  # widen on the device (uint16/int32 from the cache)
    if labels is not None:
        _check_shape("labels", labels, lead, "one label per position")
        if labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        flat_labels = labels.reshape(n).to(device=device, dtype=torch.int64)
        valid = flat_labels != config.ignore_index
    else:
        if config.ce_weight > 0:
            raise ValueError("ce_weight > 0 needs labels: pass labels=... (ignore_index marks positions "
                             "without a target) or set ce_weight=0")
        flat_labels = None
        valid = torch.ones(n, dtype=torch.bool, device=device)
    if validate and n > 0:
        _range_errors(ids, flat_labels, valid, vocab, config.ignore_index)
    needs_lse = config.temperature != 1.0 and config.tail in ("bucket", "none") and config.kd_weight > 0
    if needs_lse and (teacher_lse is None or teacher_lse_t is None):
        missing = [nm for nm, v in (("teacher_lse", teacher_lse), ("teacher_lse_at_temperature", teacher_lse_t))
                   if v is None]
        raise ValueError(
            f"tail={config.tail!r} at temperature={config.temperature:g} needs the teacher's full-vocabulary "
            f"logsumexp at that temperature, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"missing. Build the cache with --temperatures {config.temperature:g} (kd_loss_from_batch then "
            f"finds 'lse' and 'lse_t{config.temperature:g}'), or use tail='renormalize', which needs only "
            "the top-k.")
    flat_lse = flat_lse_t = None
    if needs_lse:
        _check_shape("teacher_lse", teacher_lse, lead, "one value per position")
        _check_shape("teacher_lse_at_temperature", teacher_lse_t, lead, "one value per position")
        flat_lse = teacher_lse.reshape(n).to(device=device)
        flat_lse_t = teacher_lse_t.reshape(n).to(device=device)
    return FlatInputs(
        topk_ids=ids,
        topk_logprobs=topk_logprobs.reshape(n, k),
        labels=flat_labels,
        valid=valid,
        teacher_lse=flat_lse,
        teacher_lse_at_temperature=flat_lse_t,
        lead_shape=torch.Size(lead),
    )


def teacher_side(flat: FlatInputs, config: LossConfig, dtype: torch.dtype):
    """Teacher log-probs on S at the loss temperature [N, K] and log tail mass [N] (or None).

    * τ = 1: log q_i = ℓ_i (the cached log-probs are already relative to the full vocabulary).
    * τ ≠ 1 (bucket/none): log q_i = (ℓ_i + teacher_lse) / τ − teacher_lse_at_temperature.
    * renormalize: log q̃_i = log_softmax(ℓ / τ) over K; tail mass 0 (returned as None).
    * bucket: tail log(1 − Q) = log(−expm1(logsumexp log q)), floored at TAIL_FLOOR (a rounded cache can
      give Q ≥ 1).
    """
    tau = config.temperature
    lp = flat.topk_logprobs.to(dtype)  # [N, K]
    if config.tail == "renormalize":
        return torch.log_softmax(lp / tau, dim=-1), None
    if tau == 1.0:
        logq = lp
    else:
        logq = (lp + flat.teacher_lse.to(dtype).unsqueeze(-1)) / tau - flat.teacher_lse_at_temperature.to(
            dtype).unsqueeze(-1)
    if config.tail != "bucket":
        return logq, None
    tail_mass = -torch.expm1(torch.logsumexp(logq, dim=-1))  # [N]
    return logq, tail_mass.clamp_min(TAIL_FLOOR).log()
