"""The V-wide passes behind the fused losses: which backend runs, and what kdlib hands every backend.

Shape notation:
    N: rows (flattened positions), V: vocabulary, K: teacher top-k.

A backend is a module with two functions, the PyTorch pass (:mod:`.torch_pass`) or the Triton kernels
(:mod:`triton_kernels.sparse_kd`, imported only when selected; it imports nothing of kdlib):

* ``row_stats(logits [N, V], topk_ids [N, K], safe_labels [N], temperature, need_lse_1, need_tail, chunk_rows,
  *, log_tail_floor, stats_type)`` returns ``stats_type(lse_1=, lse_t=, logits_on_support=, logit_at_label=,
  log_tail=)``;
* ``write_grad(logits, topk_ids, safe_labels, lse_1, lse_t, coef_1, coef_t, grad_on_support, temperature,
  chunk_rows=None, out_dtype=None)`` returns the [N, V] gradient.

The constants the passes share with the K-wide math are defined once on the kdlib side and passed in by
:func:`row_stats` here: the record of per-row statistics (:class:`RowStats`, its fields and their order) and
the floor of the student's log tail mass (:data:`~kdlib.losses.sparse_math.LOG_TAIL_FLOOR`).
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch

from . import torch_pass
from .sparse_math import LOG_TAIL_FLOOR

__all__ = ["RowStats", "RowLossAndGrad", "resolve_backend", "get_backend", "row_stats"]


class RowStats(NamedTuple):
    """Per-row statistics of the forward V-pass, consumed by the K-wide math (compute dtype)."""

    lse_1: torch.Tensor  # [N] logsumexp(z)     (== lse_t when τ = 1)
    lse_t: torch.Tensor  # [N] logsumexp(z / τ)
    logits_on_support: torch.Tensor  # [N, K] z at the top-k ids
    logit_at_label: torch.Tensor  # [N] z at the safe label
    log_tail: torch.Tensor | None  # [N] log Σ_{j∉S} softmax(z/τ)_j, floored; None if not requested


class RowLossAndGrad(NamedTuple):
    """What a fused forward hands its backward (the backend's ``write_grad`` arguments besides the ids)."""

    rows: torch.Tensor  # [N]    loss per row (0 on ignored rows), compute dtype
    lse_1: torch.Tensor  # [N]
    lse_t: torch.Tensor  # [N]
    coef_1: torch.Tensor  # [N]
    coef_t: torch.Tensor  # [N]
    grad_on_support: torch.Tensor  # [N, K] complete gradient values at the support ids


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` means Triton on CUDA when triton is importable, else the PyTorch pass."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def get_backend(name: str) -> ModuleType:
    """Module with ``row_stats`` and ``write_grad`` for a resolved backend name."""
    if name == "torch":
        return torch_pass
    if name == "triton":
        try:
            from triton_kernels import sparse_kd
        except ImportError as exc:  # pragma: no cover - triton is installed in the dev env
            raise ValueError("backend='triton' needs the triton package: pip install 'kdcache[triton]'") from exc
        return sparse_kd
    raise ValueError(f"unknown backend {name!r}; choose 'auto', 'torch', 'triton' or 'reference'")


def row_stats(
    backend_mod: ModuleType,
    logits: torch.Tensor,  # [N, V]
    topk_ids: torch.Tensor,  # [N, K] int64
    safe_labels: torch.Tensor,  # [N] int64
    temperature: float,
    *,
    need_lse_1: bool,
    need_tail: bool,
    chunk_rows: int | None,
) -> RowStats:
    """The backend's forward V-pass, given kdlib's record type and tail floor."""
    return backend_mod.row_stats(logits, topk_ids, safe_labels, temperature, need_lse_1=need_lse_1,
                                 need_tail=need_tail, chunk_rows=chunk_rows, log_tail_floor=LOG_TAIL_FLOOR,
                                 stats_type=RowStats)
