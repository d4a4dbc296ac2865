"""Per-row divergence math on the teacher's top-k support (the K-wide part of every backend).

Shape notation:
    N: rows (flattened positions), K: teacher top-k size.

Every backend (fused PyTorch, Triton) does the V-wide work itself (logsumexp over the vocabulary, the
k gathers, the student tail mass, the final gradient write) and hands the small [N, K] tensors to
:func:`divergence_terms`, which returns the divergence value and the closed-form gradient pieces.

Categories. A row is compared on "categories": the k ids of S and, when a tail term is used, one extra
tail category holding the teacher mass ``t_T`` and the student mass ``T = 1 - P`` outside S. With a
per-category function ``f(t, s)`` the divergence is ``D = sum_c f(t_c, s_c)``:

    forward_kl  f = t (log t - log s)                  s df/ds = -t
    reverse_kl  f = s (log s - log t)                  s df/ds = s (log s - log t + 1)
    jsd(beta)   m = beta t + (1-beta) s
                f = beta t (log t - log m) + (1-beta) s (log s - log m)
                                                       s df/ds = (1-beta) s (log s - log m)
    tvd         f = |t - s| / 2                        s df/ds = -s sign(t - s) / 2

Gradient. With u = z / tau, p = softmax(u), s_i = p_i on S and s_T = T = 1 - sum_S p_i:
    dD/du_j = p_j (G_j [j in S] - sum_S G_k p_k),   G_k = f'(s_k) - f'(T)   (f' = df/ds)
Writing h_k = p_k f'(p_k), h_T = T f'(T), rho = f'(T), H = sum_S h_k and using 1 - P = T:
    j not in S:  dD/du_j = a p_j,               a = rho - h_T - H
    j in S:      dD/du_j = h_j - p_j (H + h_T)
i.e. a per-row scalar times the softmax plus k overwritten entries. The S entries are returned as
complete values (not as a correction to add to ``a p_j``): ``a`` can be huge when the student tail T
is tiny (forward KL: rho = -t_T / T) and adding would cancel catastrophically.
Without a tail category h_T = rho = 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "DIVERGENCES",
    "TAILS",
    "TAIL_FLOOR",
    "RowTerms",
    "divergence_terms",
    "effective_divergence",
    "uses_tail_category",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TAILS = ("bucket", "renormalize", "none")
# Tail masses are floored here before taking logs: a top-k that covers the whole vocabulary (K = V) or
# a rounded teacher (sum q >= 1) would otherwise give log 0. Far below any tail that matters.
TAIL_FLOOR = 1e-30
LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)


class RowTerms(NamedTuple):
    """Per-row divergence and closed-form gradient pieces (all w.r.t. u = z / tau)."""

    divergence: torch.Tensor  # [N]     D per row
    dense_coef: torch.Tensor  # [N]     a: dD/du_j = a p_j for j outside S
    grad_on_support: torch.Tensor  # [N, K]  dD/du_i for i in S (complete value)


def effective_divergence(divergence: str, beta: float) -> str:
    """Map ``jsd`` at the ends of its range to the KL it equals there (TRL / Liger convention)."""
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def uses_tail_category(divergence: str, tail: str) -> bool:
    """Whether the extra tail category enters D.

    ``bucket``: always. ``renormalize``: the teacher's tail mass is 0 and the student's mass outside S
    contributes f(0, p_j) per id; for forward KL, JSD and TVD f(0, s) is linear in s, so the sum over
    the complement equals f(0, T) of one tail category. For reverse KL f(0, s) = +inf, so the sum is
    restricted to S (axolotl / DistillKit convention). ``none``: never.
    """
    if tail == "bucket":
        return True
    if tail == "renormalize":
        return divergence != "reverse_kl"
    return False


def _category_terms(divergence: str, log_t: torch.Tensor, log_s: torch.Tensor, beta: float):
    """f(t, s), s f'(s) and f'(s) elementwise; log_t may be -inf (zero teacher mass)."""
    t = log_t.exp()
    s = log_s.exp()
    zero = torch.zeros((), dtype=log_s.dtype, device=log_s.device)
    if divergence == "forward_kl":
        f = torch.where(t > 0, t * (log_t - log_s), zero)
        dfds = -(log_t - log_s).exp()
        h = -t
    elif divergence == "reverse_kl":
        f = s * (log_s - log_t)
        dfds = log_s - log_t + 1.0
        h = s * dfds
    elif divergence == "jsd":
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        f = torch.where(t > 0, beta * t * (log_t - log_m), zero) + (1.0 - beta) * s * (log_s - log_m)
        dfds = (1.0 - beta) * (log_s - log_m)
        h = s * dfds
    elif divergence == "tvd":
        f = 0.5 * (t - s).abs()
        dfds = -0.5 * torch.sign(t - s)
        h = s * dfds
    else:  # validated by the caller
        raise ValueError(f"unknown divergence {divergence!r}")
    return f, h, dfds


def divergence_terms(
    student_logprobs: torch.Tensor,
    student_log_tail: torch.Tensor | None,
    teacher_logprobs: torch.Tensor,
    teacher_log_tail: torch.Tensor | None,
    *,
    divergence: str,
    tail: str,
    beta: float,
) -> RowTerms:
    """Divergence per row and its gradient pieces from the top-k quantities.

    Args:
        student_logprobs: [N, K] log p_i at the loss temperature (full-vocab normalized), fp32/fp64.
        student_log_tail: [N] log T = log(sum_{j not in S} p_j) (already floored), or None if unused.
        teacher_logprobs: [N, K] log q_i at the loss temperature (renormalized for ``renormalize``).
        teacher_log_tail: [N] log(1 - Q) (floored) for ``bucket``; None means zero teacher tail mass.
        divergence: one of :data:`DIVERGENCES` (already mapped by :func:`effective_divergence`).
        tail: one of :data:`TAILS`.
        beta: JSD mixing weight, 0 < beta < 1 when divergence is ``jsd``.

    Returns:
        :class:`RowTerms` with D [N], the dense coefficient a [N] and dD/du on S [N, K].
    """
    f, h, _ = _category_terms(divergence, teacher_logprobs, student_logprobs, beta)
    value = f.sum(-1)  # [N]
    h_sum = h.sum(-1)  # [N]
    p_support = student_logprobs.exp()  # [N, K]
    if uses_tail_category(divergence, tail):
        if student_log_tail is None:
            raise ValueError("internal: the tail category needs the student's tail mass")
        if teacher_log_tail is None:
            teacher_log_tail = torch.full_like(student_log_tail, -math.inf)
        f_tail, h_tail, rho = _category_terms(divergence, teacher_log_tail, student_log_tail, beta)
        value = value + f_tail
        dense_coef = rho - h_tail - h_sum
        grad_on_support = h - p_support * (h_sum + h_tail).unsqueeze(-1)
    else:
        dense_coef = -h_sum
        grad_on_support = h - p_support * h_sum.unsqueeze(-1)
    return RowTerms(value, dense_coef, grad_on_support)
