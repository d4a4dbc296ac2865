"""Naive twin of :func:`kdlib.crosstok.crosstok_loss`: one position at a time, each formula written out.

Used by the tests to check the vectorized loss (values and gradients); far too slow for training. Shapes as
in ``loss.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from kdlib.losses import KDLossOptions

from .align import EXACT, NONE
from .loss import crosstok_options, teacher_logq

__all__ = ["crosstok_loss_reference"]


def _exact(p: torch.Tensor, q: torch.Tensor, mapped: list[int], tail: str) -> torch.Tensor | None:
    """Forward KL on the mapped ids (teacher tail = everything unmapped); None when nothing maps."""
    pairs = [(q[i], p[m]) for i, m in enumerate(mapped) if m >= 0]
    total_q = sum((qi for qi, _ in pairs), torch.zeros((), dtype=p.dtype))
    if not pairs or float(total_q) <= 0:
        return None
    if tail == "renormalize":
        return sum(qi / total_q * torch.log(qi / total_q / pi) for qi, pi in pairs)
    total_p = sum(pi for _, pi in pairs)
    d = sum(qi * torch.log(qi / pi) for qi, pi in pairs)
    rest_q, rest_p = 1 - total_q, 1 - total_p
    return d + (rest_q * torch.log(rest_q / rest_p) if float(rest_q) > 0 else 0.0)


def _uld(p: torch.Tensor, q: torch.Tensor, tail: str) -> torch.Tensor:
    """L1 between the descending-sorted vectors (student's K largest + rest, teacher's top-k + rest)."""
    k = min(len(q), len(p))
    p_top = sorted(p, key=lambda x: float(x.detach()), reverse=True)[:k]
    q_sorted = sorted(q, key=lambda x: float(x.detach()), reverse=True)
    total_q = sum(q_sorted)
    if tail == "renormalize":
        q_sorted = [x / total_q for x in q_sorted]
    d = sum(abs(a - b) for a, b in zip(p_top, q_sorted)) + sum(q_sorted[k:], torch.zeros((), dtype=p.dtype))
    rest_p = 1 - sum(p_top)
    return d + (rest_p if tail == "renormalize" else abs(rest_p - (1 - total_q)))


# long: the per-position loop spells out every case of the loss on purpose
def crosstok_loss_reference(student_logits: torch.Tensor, labels: torch.Tensor, teacher_pos: torch.Tensor,
                            align: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                            vocab_map: torch.Tensor, *, teacher_lse: torch.Tensor | None = None,
                            teacher_lse_at_temperature: torch.Tensor | None = None,
                            options: KDLossOptions | None = None, **option_kwargs: Any) -> torch.Tensor:
    """:func:`kdlib.crosstok.crosstok_loss`, position by position (same arguments and result)."""
    opts = crosstok_options(options, option_kwargs, "crosstok_loss_reference")
    B, Ts, _ = student_logits.shape
    tau = float(opts.temperature)
    out = torch.zeros(B, Ts, dtype=torch.promote_types(student_logits.dtype, torch.float32))
    count = 0
    for b in range(B):
        for j in range(Ts):
            label = int(labels[b, j])
            if label == opts.ignore_index:
                continue
            count += 1
            z = student_logits[b, j].to(out.dtype)
            ce = -torch.log_softmax(z, -1)[label]
            if int(align[b, j]) == NONE:
                out[b, j] = (opts.ce_weight + opts.kd_weight) * ce
                continue
            t = int(teacher_pos[b, j])
            lse = None if teacher_lse is None else teacher_lse[b, t].to(out.dtype)
            lse_t = None if teacher_lse_at_temperature is None else teacher_lse_at_temperature[b, t].to(out.dtype)
            q = teacher_logq(topk_logprobs[b, t].to(out.dtype), opts, lse, lse_t).exp()
            p = torch.softmax(z / tau, -1)
            d = None
            if int(align[b, j]) == EXACT:
                d = _exact(p, q, [int(vocab_map[int(i)]) for i in topk_ids[b, t]], opts.tail)
            if d is None:
                d = _uld(p, q, opts.tail)
            out[b, j] = opts.ce_weight * ce + opts.kd_scale * d
    if opts.reduction == "none":
        return out
    return out.sum() if opts.reduction == "sum" else out.sum() / max(count, 1)
