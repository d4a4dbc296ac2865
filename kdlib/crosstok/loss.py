"""Cross-tokenizer distillation loss: exact-id KD where tokens coincide, ULD where only boundaries do, CE elsewhere.

Shape notation::

    B    batch     T_s  student positions   V_s  student vocabulary
    T    cached teacher positions per row   K    cached teacher top-k   V_t  teacher vocabulary
    N    B·T_s rows (flattened)

Per valid student position j (label != ignore_index), with p = softmax(z_j / τ) over the student vocabulary,
the teacher row t = ``teacher_pos[j]`` and q_i its top-k probabilities at τ (``tail="bucket"``: exact,
Q = Σ q_i < 1; ``tail="renormalize"``: q / Q):

* ``align == EXACT``: the teacher top-k ids mapped to student ids (``vocab_map``); M the mapped ones.
  bucket:      D = Σ_M q_i log(q_i / p_{m(i)}) + (1 − Q_M) log((1 − Q_M) / (1 − P_M))
               (Q_M, P_M the teacher / student mass on M: unmapped teacher ids fall in the tail)
  renormalize: D = Σ_M q̃_i log(q̃_i / p_{m(i)}), q̃ = q / Q_M on M.
  A row whose top-k maps to nothing is treated as ULD.
* ``align == ULD`` (Boizard et al. 2024; TRL GOLD's convention: L1 between the probability vectors sorted in
  descending order, the shorter one padded with zeros): with p_(1) ≥ … ≥ p_(K) the student's K largest
  probabilities, P = Σ p_(i), and q_(i) the teacher's sorted top-k,
  bucket:      D = Σ_i |p_(i) − q_(i)| + |(1 − P) − (1 − Q)|    (each side's remaining mass as one entry)
  renormalize: D = Σ_i |p_(i) − q_(i) / Q| + (1 − P)
* ``align == NONE``: no teacher distribution; the KD share goes to CE.

loss_j = ce_weight · CE_j + (kd_weight · (τ² if tau_squared) · D_j if aligned else kd_weight · CE_j), CE at τ = 1;
``reduction="mean"`` averages over valid positions (0.0 when none), as :func:`kdlib.kd_loss` does. The settings
are :class:`kdlib.KDLossOptions` fields, validated there; forward KL is the divergence of the exact part.

The fused pass (``fused.py``: closed-form gradients) runs one log-softmax over the rows (CE's own, reused by the
KD terms at τ = 1; at τ ≠ 1 one more over the aligned rows), one top-k over the ULD rows and K-wide gathers, and
its backward one softmax pass plus scattered corrections; :func:`crosstok_loss_reference` (``reference.py``) is
the naive per-position twin (autograd).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from kdlib.losses import KDLossOptions

from .align import EXACT, NONE
from .fused import AlignedRows, crosstok_rows_loss

__all__ = ["CROSSTOK_OPTIONS", "crosstok_options", "teacher_logq", "crosstok_loss", "crosstok_loss_from_batch"]

CROSSTOK_OPTIONS = frozenset({"ce_weight", "kd_weight", "temperature", "tail", "tau_squared", "ignore_index",
                              "reduction"})
_TAILS = ("bucket", "renormalize")


def crosstok_options(options: KDLossOptions | None, overrides: Mapping[str, Any], entry_point: str) -> KDLossOptions:
    """The loss settings (``KDLossOptions`` validates them) with the ones cross-tokenizer KD supports checked.

    Raises:
        TypeError: an option this loss does not take. ValueError: a bad value, a tail other than bucket /
            renormalize, or a divergence other than forward KL.
    """
    unknown = sorted(set(overrides) - CROSSTOK_OPTIONS)
    if unknown:
        raise TypeError(f"{entry_point}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; its "
                        f"options are {', '.join(sorted(CROSSTOK_OPTIONS))}")
    if options is not None and not isinstance(options, KDLossOptions):
        raise TypeError(f"options must be a kdlib.KDLossOptions, got {type(options).__name__}")
    resolved = dataclasses.replace(options or KDLossOptions(), **overrides)
    if resolved.tail not in _TAILS:
        raise ValueError(f"{entry_point} supports tail='bucket' or 'renormalize', got {resolved.tail!r}")
    if resolved.effective_divergence != "forward_kl":
        raise ValueError(f"{entry_point} uses forward KL on exact positions (and ULD elsewhere); got divergence "
                         f"{resolved.divergence!r}: leave divergence at its default")
    return resolved


def teacher_logq(topk_logprobs: torch.Tensor, opts: KDLossOptions, teacher_lse: torch.Tensor | None,
                 teacher_lse_t: torch.Tensor | None) -> torch.Tensor:
    """log q of the cached top-k at the loss temperature, [..., K] (renormalized over K for ``renormalize``).

    Raises:
        ValueError: τ ≠ 1 with the bucket tail but no ``teacher_lse`` / ``teacher_lse_at_temperature``.
    """
    tau = float(opts.temperature)
    if opts.tail == "renormalize":
        return torch.log_softmax(topk_logprobs / tau, dim=-1)
    if tau == 1.0:
        return topk_logprobs
    if teacher_lse is None or teacher_lse_t is None:
        raise ValueError(f"temperature {tau:g} with tail='bucket' needs teacher_lse and teacher_lse_at_temperature "
                         f"(a cache built with --temperatures {tau:g}: batch keys 'lse' and 'lse_t{tau:g}'), or use "
                         "tail='renormalize'")
    return (topk_logprobs + teacher_lse.unsqueeze(-1)) / tau - teacher_lse_t.unsqueeze(-1)


# long: the docstring is the contract (shapes, conventions, errors) of the one public loss call
def crosstok_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_pos: torch.Tensor,
    align: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    vocab_map: torch.Tensor,
    *,
    teacher_lse: torch.Tensor | None = None,
    teacher_lse_at_temperature: torch.Tensor | None = None,
    options: KDLossOptions | None = None,
    **option_kwargs: Any,
) -> torch.Tensor:
    """Cross-tokenizer KD from a cache (module docstring), vectorized; differentiable in ``student_logits``.

    Args:
        student_logits: [B, T_s, V_s] (any float dtype; computed in float32 or wider).
        labels: [B, T_s] student next-token ids, ``ignore_index`` where none.
        teacher_pos: [B, T_s] the aligned teacher position in the same row of the teacher arrays, -1 if none.
        align: [B, T_s] ``NONE`` / ``ULD`` / ``EXACT`` (``kdlib.crosstok.align``).
        topk_ids: [B, T, K] cached teacher ids; topk_logprobs: [B, T, K] their log-probs at τ = 1.
        vocab_map: [V_t] teacher id → student id, -1 unmapped.
        teacher_lse: [B, T] and teacher_lse_at_temperature: [B, T]: needed for τ ≠ 1 with ``tail="bucket"``.
        options: a :class:`kdlib.KDLossOptions`; keyword options (``ce_weight``, ``kd_weight``, ``temperature``,
            ``tail``, ``tau_squared``, ``ignore_index``, ``reduction``) replace its fields.

    Returns:
        The loss: a scalar, or [B, T_s] for ``reduction="none"`` (0 at ignored positions).

    Raises:
        ValueError: shapes that do not fit, an aligned position pointing outside the teacher rows, settings this
            loss does not support. TypeError: an unknown option.
    """
    opts = crosstok_options(options, option_kwargs, "crosstok_loss")
    B, Ts, Vs = _check_shapes(student_logits, labels, teacher_pos, align, topk_ids, topk_logprobs)
    T = topk_ids.shape[1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.reshape(B * Ts, Vs).to(dtype)
    flat_labels = labels.reshape(-1).long()
    kind = align.reshape(-1).long()
    valid = flat_labels != opts.ignore_index
    aligned = valid & (kind != NONE)
    rows = aligned.nonzero().squeeze(-1)
    t = teacher_pos.reshape(-1)[rows].long()
    if bool(((t < 0) | (t >= T)).any()):
        raise ValueError(f"teacher_pos of an aligned position is outside [0, {T}); pass the alignment made for "
                         "these teacher rows (kdlib.crosstok.align_sequence)")
    teacher_rows = rows // Ts * T + t
    lse = None if teacher_lse is None else teacher_lse.reshape(-1)[teacher_rows].to(dtype)
    lse_t = None if teacher_lse_at_temperature is None else teacher_lse_at_temperature.reshape(-1)[teacher_rows].to(dtype)
    logq = teacher_logq(topk_logprobs.reshape(B * T, -1)[teacher_rows].to(dtype), opts, lse, lse_t)
    mapped = vocab_map.to(topk_ids.device)[topk_ids.reshape(B * T, -1)[teacher_rows].long()]
    # CE weight per row: ce_weight where aligned, ce_weight + kd_weight where not (the KD share goes to CE)
    ce_coef = torch.zeros(B * Ts, dtype=dtype, device=z.device)
    ce_coef[valid] = float(opts.ce_weight)
    ce_coef[valid & ~aligned] += float(opts.kd_weight)
    per_row = crosstok_rows_loss(z, torch.where(valid, flat_labels, 0), ce_coef,
                                 AlignedRows(rows, kind[rows] == EXACT, logq, mapped), float(opts.temperature),
                                 opts.tail, opts.kd_scale)
    return _reduce(per_row, valid, opts.reduction, (B, Ts))


def _reduce(per_row: torch.Tensor, valid: torch.Tensor, reduction: str, shape: tuple[int, int]) -> torch.Tensor:
    if reduction == "none":
        return per_row.view(shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / valid.sum().clamp(min=1)


def _check_shapes(logits, labels, teacher_pos, align, topk_ids, topk_logprobs) -> tuple[int, int, int]:
    if logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T_s, V_s], got shape {tuple(logits.shape)}")
    B, Ts, Vs = logits.shape
    for name, x in (("labels", labels), ("teacher_pos", teacher_pos), ("align", align)):
        if tuple(x.shape) != (B, Ts):
            raise ValueError(f"{name} must be [B, T_s] = {[B, Ts]} like student_logits, got {list(x.shape)}")
    if topk_ids.dim() != 3 or topk_ids.shape[0] != B or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(f"topk_ids and topk_logprobs must both be [B, T, K] with B = {B}, got "
                         f"{list(topk_ids.shape)} and {list(topk_logprobs.shape)}")
    return B, Ts, Vs


def crosstok_loss_from_batch(student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor], vocab_map: torch.Tensor,
                             *, options: KDLossOptions | None = None, **option_kwargs: Any) -> torch.Tensor:
    """:func:`crosstok_loss` on a batch of :class:`kdlib.crosstok.CrossTokLoader` (its keys; ``lse_t{τ}`` if cached)."""
    opts = crosstok_options(options, option_kwargs, "crosstok_loss_from_batch")
    lse_t = batch.get(f"lse_t{float(opts.temperature):g}") if opts.temperature != 1.0 else batch.get("lse")
    return crosstok_loss(student_logits, batch["labels"], batch["teacher_pos"], batch["align"], batch["topk_ids"],
                         batch["topk_logprobs"], vocab_map, teacher_lse=batch.get("lse"),
                         teacher_lse_at_temperature=lse_t, options=opts)
