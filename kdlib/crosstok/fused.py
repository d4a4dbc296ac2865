"""The fused pass of :func:`kdlib.crosstok.crosstok_loss`: closed-form gradients, one V-wide pass each way.

Shape notation::

    N  student rows (B·T_s)   V  student vocabulary   n  aligned rows   K  teacher top-k

Every term's gradient in the student logits is a per-row multiple of a softmax plus a K-sparse correction
(u = z / τ, p = softmax(u), ∂/∂z = ∂/∂u / τ for the KD terms; CE at τ = 1):

* CE: p₁ − e_label.
* EXACT, bucket (Q, P the teacher / student mass on the mapped ids M, r = (1 − Q)/(1 − P)):
  ∂D/∂u = (Q − rP)·p + Σ_M (r p_m − q_m) e_m.   renormalize (q̃ = q/Q on M): ∂D/∂u = p − Σ_M q̃_m e_m.
* ULD (c_i = ∂D/∂p_(i): sign(p_(i) − q_(i)) − sign(Q − P) for bucket, sign(p_(i) − q̃_(i)) − 1 for renormalize):
  ∂D/∂u = Σ_i c_i p_(i) e_(i) − (Σ_i c_i p_(i))·p.

So the forward needs a logsumexp per row (and one at τ over the aligned rows when τ ≠ 1), K-wide gathers and
one top-k over the ULD rows; the backward writes softmax × row scalar plus scattered corrections: the memory
traffic of cross-entropy's own backward. Nothing [N, V] is kept between the passes but the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AlignedRows", "crosstok_rows_loss"]


@dataclass
class AlignedRows:
    """The aligned rows of a call: their index in [0, N), kind, teacher log q at τ and mapped ids."""

    rows: torch.Tensor  # [n] int64
    exact: torch.Tensor  # [n] bool (False: ULD)
    logq: torch.Tensor  # [n, K]
    mapped: torch.Tensor  # [n, K] int64, -1 unmapped


def _exact(lp: torch.Tensor, logq: torch.Tensor, mapped: torch.Tensor, tail: str):
    """(D, s, w, any mapped) of EXACT rows; lp = log p_τ at the mapped ids [n, K]."""
    mask = mapped >= 0
    zero = torch.zeros_like(lp)
    q = torch.where(mask, logq.exp(), zero)
    Q = q.sum(-1)
    ok = mask.any(-1) & (Q > 0)
    safe_logq = torch.where(mask, logq, zero)
    if tail == "renormalize":
        Qs = torch.where(ok, Q, torch.ones_like(Q))
        qt = q / Qs.unsqueeze(-1)
        d = torch.where(mask, qt * (safe_logq - Qs.log().unsqueeze(-1) - lp), zero).sum(-1)
        return d, torch.ones_like(Q), -qt, ok
    pm = torch.where(mask, lp.exp(), zero)
    P = pm.sum(-1)
    rest_q = (1 - Q).clamp(min=0)
    rest_p = (1 - P).clamp(min=torch.finfo(P.dtype).tiny)
    d = torch.where(mask, q * (safe_logq - lp), zero).sum(-1) + torch.xlogy(rest_q, rest_q) - torch.xlogy(rest_q, rest_p)
    r = rest_q / rest_p
    return d, Q - r * P, torch.where(mask, r.unsqueeze(-1) * pm - q, zero), ok


def _uld(p_top: torch.Tensor, logq: torch.Tensor, tail: str):
    """(D, s, w) of ULD rows; p_top [n, k] the student's k largest probabilities at τ, descending."""
    k = p_top.shape[-1]
    q = logq.exp().sort(dim=-1, descending=True).values  # [n, K]
    Q, P = q.sum(-1), p_top.sum(-1)
    if tail == "renormalize":
        q = q / Q.unsqueeze(-1)
        d = (p_top - q[:, :k]).abs().sum(-1) + q[:, k:].sum(-1) + (1 - P)
        c = torch.sign(p_top - q[:, :k]) - 1
    else:
        d = (p_top - q[:, :k]).abs().sum(-1) + q[:, k:].sum(-1) + (Q - P).abs()
        c = torch.sign(p_top - q[:, :k]) - torch.sign(Q - P).unsqueeze(-1)
    w = c * p_top
    return d, -w.sum(-1), w


class _CrossTokFunction(torch.autograd.Function):
    """Per-row losses [N] of logits z [N, V]; the backward is the closed form of the module docstring."""

    @staticmethod
    def forward(ctx, z, labels, ce_coef, aligned: AlignedRows, tau: float, tail: str, kd_scale: float):
        N, V = z.shape
        logp = torch.log_softmax(z, dim=-1)  # [N, V]: one fused pass; kept for the backward, as CE keeps it
        per_row = -ce_coef * logp.gather(1, labels.unsqueeze(1)).squeeze(1)
        rows, n, K = aligned.rows, len(aligned.rows), aligned.logq.shape[-1]
        # log p_τ of aligned row i: row src[i] of logp_t (logp itself at τ = 1)
        logp_t = logp if tau == 1.0 else torch.log_softmax(z[rows] / tau, dim=-1)
        src = rows if tau == 1.0 else torch.arange(n, device=z.device)
        s = torch.zeros(n, dtype=z.dtype, device=z.device)
        w = torch.zeros(n, K, dtype=z.dtype, device=z.device)
        idx = torch.zeros(n, K, dtype=torch.int64, device=z.device)
        d = torch.zeros(n, dtype=z.dtype, device=z.device)
        uld = ~aligned.exact
        e = aligned.exact.nonzero().squeeze(-1)
        if len(e):
            ids = aligned.mapped[e].clamp(min=0)
            lp = torch.take(logp_t, src[e].unsqueeze(1) * V + ids)  # [n_e, K] gathers
            de, se, we, ok = _exact(lp, aligned.logq[e], aligned.mapped[e], tail)
            uld[e[~ok]] = True
            e, ids = e[ok], ids[ok]
            d[e], s[e], w[e], idx[e] = de[ok], se[ok], we[ok], ids
        u = uld.nonzero().squeeze(-1)
        if len(u):
            k = min(K, V)
            top, top_ids = logp_t.index_select(0, src[u]).topk(k, dim=-1)
            du, su, wu = _uld(top.exp(), aligned.logq[u], tail)
            d[u], s[u] = du, su
            w[u, :k], idx[u, :k] = wu, top_ids
        per_row = per_row.index_add(0, rows, kd_scale * d)
        ctx.save_for_backward(logp, labels, ce_coef, rows, s, w, idx, logp_t if tau != 1.0 else logp[:0])
        ctx.tau, ctx.kd_scale = tau, kd_scale
        return per_row

    @staticmethod
    def backward(ctx, grad_rows):
        logp, labels, ce_coef, rows, s, w, idx, logp_t = ctx.saved_tensors
        tau, kd_scale = ctx.tau, ctx.kd_scale
        N, V = logp.shape
        g_ce = grad_rows * ce_coef  # [N]
        a = grad_rows[rows] * (kd_scale / tau)  # [n]
        scale = g_ce if tau != 1.0 else g_ce.index_add(0, rows, a * s)
        # softmax(log p) = p: torch's fused softmax kernel (several times faster than exp on CPU)
        grad = torch.softmax(logp, dim=-1).mul_(scale.unsqueeze(1))  # the one V-wide pass (two at τ ≠ 1)
        flat = grad.view(-1)
        flat.index_add_(0, torch.arange(N, device=grad.device) * V + labels, -g_ce)
        if tau != 1.0 and len(rows):
            grad.index_add_(0, rows, torch.softmax(logp_t, dim=-1).mul_((a * s).unsqueeze(1)))
        if len(rows):
            flat.index_add_(0, (rows.unsqueeze(1) * V + idx).reshape(-1), (a.unsqueeze(1) * w).reshape(-1))
        return grad, None, None, None, None, None, None


def crosstok_rows_loss(z: torch.Tensor, labels: torch.Tensor, ce_coef: torch.Tensor, aligned: AlignedRows,
                       tau: float, tail: str, kd_scale: float) -> torch.Tensor:
    """Per-row losses [N]: ``ce_coef · CE + kd_scale · D`` (D on the aligned rows), differentiable in ``z``.

    Args:
        z: [N, V] logits (float32 or wider). labels: [N] int64 (any id where ``ce_coef`` is 0).
        ce_coef: [N] CE weight per row (0 at ignored rows). aligned: the aligned rows and their teacher data.
        tau: temperature of D. tail: ``bucket`` | ``renormalize``. kd_scale: kd_weight (·τ²).
    """
    return _CrossTokFunction.apply(z, labels, ce_coef, aligned, float(tau), tail, float(kd_scale))
