"""The tensor inputs of every loss entry point: checked, flattened to rows, the teacher side prepared,
and the per-row losses reduced.

Shape notation:
    B: batch, T: sequence length, V: vocabulary, K: teacher top-k, N: rows = prod(leading dims).

The settings (:class:`~kdlib.losses.options.KDLossOptions`) are validated where they are built; this module
checks only the tensors against them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .options import KDLossOptions
from .sparse_math import TAIL_FLOOR

__all__ = ["FlatInputs", "flatten_targets", "teacher_side", "tempered_logprobs", "reduce_rows", "flat_labels",
           "range_errors"]


@dataclasses.dataclass
class FlatInputs:
    """Inputs flattened to rows, ids widened, validated."""

    topk_ids: torch.Tensor  # [N, K] int64
    topk_logprobs: torch.Tensor  # [N, K] original dtype
    valid: torch.Tensor  # [N] bool: label != ignore_index (all True without labels)
    # [N] int64: the label where valid, else 0 — an index every gather and scatter may use; the only
    # place ignored labels are replaced (their rows are masked by ``valid`` everywhere)
    safe_labels: torch.Tensor
    teacher_lse: torch.Tensor | None  # [N]
    teacher_lse_at_temperature: torch.Tensor | None  # [N]
    lead_shape: torch.Size

    @property
    def support_ids(self) -> torch.Tensor:
        """[N, K] the ids whose gradient entries the backward writes as complete values."""
        return self.topk_ids

    def rows(self, start: int, stop: int) -> FlatInputs:
        """Rows [start, stop) as views (a chunk of :func:`kdlib.kd_loss_from_hidden`)."""

        def cut(x):
            return None if x is None else x[start:stop]

        return dataclasses.replace(
            self, topk_ids=self.topk_ids[start:stop], topk_logprobs=self.topk_logprobs[start:stop],
            valid=self.valid[start:stop], safe_labels=self.safe_labels[start:stop],
            teacher_lse=cut(self.teacher_lse), teacher_lse_at_temperature=cut(self.teacher_lse_at_temperature),
            lead_shape=torch.Size([stop - start]))


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple, hint: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {tuple(expected)} was expected ({hint})")


def _check_topk(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, lead: tuple, vocab: int,
                device: torch.device) -> None:
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


def flat_labels(labels: torch.Tensor | None, lead: tuple, n: int, device: torch.device,
                 options: KDLossOptions) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Labels [N] int64 (None without labels) and the valid mask [N]."""
    if labels is None:
        if options.ce_weight > 0:
            raise ValueError("ce_weight > 0 needs labels: pass labels=... (ignore_index marks positions "
                             "without a target) or set ce_weight=0")
        return None, torch.ones(n, dtype=torch.bool, device=device)
    _check_shape("labels", labels, lead, "one label per position")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    flat_labels = labels.reshape(n).to(device=device, dtype=torch.int64)
    return flat_labels, flat_labels != options.ignore_index


def range_errors(ids: torch.Tensor, labels: torch.Tensor | None, valid: torch.Tensor, vocab: int,
                 ignore_index: int, name: str = "topk_ids") -> None:
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
            f"{name} contains ids outside [0, V={vocab}) (min {int(lo)}, max {int(hi)}); the cache was built "
            "with a different vocabulary than the student's, or the ids were not decoded")
    raise ValueError(f"labels contain values outside [0, V={vocab}) that are not ignore_index={ignore_index}")


def _flat_teacher_lse(teacher_lse: torch.Tensor | None, teacher_lse_t: torch.Tensor | None, lead: tuple, n: int,
                      device: torch.device, options: KDLossOptions):
    """The teacher's lse pair as [N] each when D needs it (``bucket``/``none`` at τ ≠ 1), else (None, None)."""
    if not options.needs_teacher_lse:
        return None, None
    if teacher_lse is None or teacher_lse_t is None:
        missing = [nm for nm, v in (("teacher_lse", teacher_lse), ("teacher_lse_at_temperature", teacher_lse_t))
                   if v is None]
        tau = options.temperature
        raise ValueError(
            f"tail={options.tail!r} at temperature={tau:g} needs the teacher's full-vocabulary "
            f"logsumexp at that temperature, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"missing. Build the cache with --temperatures {tau:g} (kd_loss_from_batch then finds 'lse' and "
            f"'lse_t{tau:g}'), or use tail='renormalize', which needs only the top-k.")
    _check_shape("teacher_lse", teacher_lse, lead, "one value per position")
    _check_shape("teacher_lse_at_temperature", teacher_lse_t, lead, "one value per position")
    return teacher_lse.reshape(n).to(device=device), teacher_lse_t.reshape(n).to(device=device)


def flatten_targets(
    lead: tuple,
    vocab: int,
    device: torch.device,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_lse: torch.Tensor | None,
    teacher_lse_at_temperature: torch.Tensor | None,
    options: KDLossOptions,
    validate: bool = True,
    need_lse: bool | None = None,
) -> FlatInputs:
    """Check shapes/dtypes/ranges against the student's leading dims ``lead`` and vocabulary ``vocab`` and
    flatten every [..., X] target to [N, X]. Raises ValueError saying what is wrong and how to fix it.

    Shape and dtype checks read only metadata. The range checks of ``topk_ids`` and ``labels`` read the
    data: on CUDA they cost ONE host-device synchronization per call (both reduced on the device, one
    ``.item()``); ``validate=False`` skips them (out-of-range ids then give undefined results or a device
    assert instead of a clear error). ``need_lse`` False leaves the teacher's lse pair to the caller (hybrid
    targets check and flatten it themselves); None: ``options.needs_teacher_lse`` decides."""
    lead, vocab = tuple(lead), int(vocab)
    _check_topk(topk_ids, topk_logprobs, lead, vocab, device)
    n, k = math.prod(lead), topk_ids.shape[-1]
    ids = topk_ids.reshape(n, k).to(torch.int64)  # widen on the device (uint16/int32 from the cache)
    flat_labels_, valid = flat_labels(labels, lead, n, device, options)
    if validate and n > 0:
        range_errors(ids, flat_labels_, valid, vocab, options.ignore_index)
    flat_lse, flat_lse_t = None, None
    if need_lse is not False:
        flat_lse, flat_lse_t = _flat_teacher_lse(teacher_lse, teacher_lse_at_temperature, lead, n, device, options)
    safe_labels = torch.where(valid, flat_labels_, 0) if flat_labels_ is not None else torch.zeros_like(
        valid, dtype=torch.int64)
    return FlatInputs(
        topk_ids=ids,
        topk_logprobs=topk_logprobs.reshape(n, k),
        valid=valid,
        safe_labels=safe_labels,
        teacher_lse=flat_lse,
        teacher_lse_at_temperature=flat_lse_t,
        lead_shape=torch.Size(lead),
    )


def teacher_side(flat: FlatInputs, options: KDLossOptions, dtype: torch.dtype):
    """Teacher log-probs on S at the loss temperature [N, K] and log tail mass [N] (or None).

    * τ = 1: log q_i = ℓ_i (the cached log-probs are already relative to the full vocabulary).
    * τ ≠ 1 (bucket/none): log q_i = (ℓ_i + teacher_lse) / τ − teacher_lse_at_temperature.
    * renormalize: log q̃_i = log_softmax(ℓ / τ) over K; tail mass 0 (returned as None).
    * bucket: tail log(1 − Q) = log(−expm1(logsumexp log q)), floored at TAIL_FLOOR (a rounded cache can
      give Q ≥ 1).
    """
    tau = options.temperature
    lp = flat.topk_logprobs.to(dtype)  # [N, K]
    if options.tail == "renormalize":
        return torch.log_softmax(lp / tau, dim=-1), None
    logq = tempered_logprobs(lp, flat.teacher_lse, flat.teacher_lse_at_temperature, tau)
    if options.tail != "bucket":
        return logq, None
    tail_mass = -torch.expm1(torch.logsumexp(logq, dim=-1))  # [N]
    return logq, tail_mass.clamp_min(TAIL_FLOOR).log()


def tempered_logprobs(logprobs: torch.Tensor, lse: torch.Tensor | None, lse_t: torch.Tensor | None,
                      temperature: float) -> torch.Tensor:
    """Exact teacher log-probs at temperature t from stored ones at 1: log p^t = (ℓ + L)/t − L_t, [N, X].

    ``logprobs`` [N, X] (ℓ, full-vocabulary log-probs at t = 1), ``lse`` [N] (L = logsumexp(logits)),
    ``lse_t`` [N] (L_t = logsumexp(logits / t)); at t = 1 this is ℓ itself and the lse are not read.
    """
    if temperature == 1.0:
        return logprobs
    return (logprobs + lse.to(logprobs.dtype).unsqueeze(-1)) / temperature - lse_t.to(logprobs.dtype).unsqueeze(-1)


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str, lead_shape) -> torch.Tensor:
    """Mean over valid rows (0.0 when none is valid), sum, or per-position losses [...]."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)
