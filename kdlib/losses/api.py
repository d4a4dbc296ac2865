"""Public sparse-KD loss API: :func:`kd_loss`, :class:`KDLoss`, :func:`kd_loss_from_batch`.

Shape notation:
    B: batch, T: sequence length, V: vocabulary, K: teacher top-k; [...] any leading dims (N = their product).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ._inputs import flatten_targets, reduce_rows
from .backends import resolve_backend
from .fused import SparseKDFunction
from .options import KDLossOptions, resolve_options
from .reference import kd_loss_reference

__all__ = ["kd_loss", "KDLoss", "kd_loss_from_batch", "lse_key_for_temperature", "reduce_rows"]


def kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    teacher_lse_at_temperature: torch.Tensor | None = None,
    options: KDLossOptions | None = None,
    **option_kwargs: Any,
) -> torch.Tensor:
    """Sparse knowledge-distillation loss from cached teacher top-k log-probs, fused with cross-entropy.

    ``loss = ce_weight · CE(z, labels) + kd_weight · (τ² if tau_squared) · D``, both terms averaged over
    valid positions (label != ignore_index; all positions when labels is None). CE is always at τ = 1.

    Let p = softmax(z / τ) be the student over the full vocabulary, S the k teacher ids, q_i the teacher
    on S at τ, Q = Σ_S q_i, P = Σ_S p_i, T = 1 − P (computed exactly as the complement's mass), and a
    per-id term f(t, s) per divergence: ``forward_kl`` t log(t/s) (KL(q‖p)); ``reverse_kl`` s log(s/t)
    (KL(p‖q)); ``jsd`` β t log(t/m) + (1−β) s log(s/m), m = β t + (1−β) s (TRL/Liger GKD convention:
    β = 0 is exactly forward KL, β = 1 exactly reverse KL); ``tvd`` |t − s| / 2. D per tail mode:

    * ``bucket`` (default, exact): D = Σ_S f(q_i, p_i) + f(1 − Q, 1 − P).
    * ``renormalize``: teacher q̃ = q / Q on S and 0 elsewhere, student p over the full vocabulary;
      D = Σ_V f(q̃_j, p_j) = Σ_S f(q̃_i, p_i) + f(0, 1 − P). For reverse KL the last term would be +∞, so
      reverse KL sums over S only (axolotl's convention). **This can be negative** (P log P < 0 when
      p_i = P q̃_i); use ``bucket`` for a reverse KL that is >= 0.
    * ``none``: D = Σ_S f(q_i, p_i), teacher not renormalized, no tail term.

    Teacher at τ: q_i = exp((ℓ_i + teacher_lse)/τ − teacher_lse_at_temperature) for ``bucket``/``none``
    (τ ≠ 1 requires both lse tensors: build the cache with ``--temperatures τ``), softmax(ℓ/τ) over K
    for ``renormalize``. Tail masses are floored at ``sparse_math.TAIL_FLOOR`` (1e-30) before logs.

    Args:
        student_logits: [..., V] fp32/bf16/fp16/fp64 logits; accumulated in fp32, grad in this dtype.
        topk_ids: [..., K] any integer dtype (int32/int64/uint16), sorted by teacher log-prob, unique.
        topk_logprobs: [..., K] fp16/bf16/fp32 teacher log-probs at τ = 1 over the full vocabulary.
        labels: [...] integer targets for CE and for marking ignored positions (``ignore_index``).
        teacher_lse: [...] fp32 teacher logsumexp of raw logits (cache key ``lse``).
        teacher_lse_at_temperature: [...] fp32 teacher logsumexp(logits / τ) (cache key ``lse_t{τ:g}``).
        options: a :class:`~kdlib.losses.options.KDLossOptions` (default: every default).
        **option_kwargs: its fields as keywords (replacing those of ``options``; see KDLossOptions for
            each): ``ce_weight``, ``kd_weight``, ``temperature``, ``divergence``, ``tail``, ``tau_squared``,
            ``ignore_index``, ``beta``, ``reduction``, ``backend``, ``validate``, ``chunk_rows``.

    Returns:
        Scalar loss (fp32, fp64 for fp64 logits), or [...] per position with ``reduction="none"``.

    Raises:
        ValueError: unknown option, shape mismatch, ids outside [0, V), ce_weight > 0 without labels, or
            τ ≠ 1 with ``bucket``/``none`` without the teacher's lse pair.
        TypeError: a keyword that is no option of kd_loss.
    """
    options = resolve_options(options, option_kwargs, entry_point="kd_loss")
    if options.backend == "reference":
        return kd_loss_reference(student_logits, topk_ids, topk_logprobs, labels=labels, teacher_lse=teacher_lse,
                                 teacher_lse_at_temperature=teacher_lse_at_temperature, options=options)
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a float tensor [..., V], got {student_logits.dtype}")
    vocab = student_logits.shape[-1]
    lead = tuple(student_logits.shape[:-1])
    flat = flatten_targets(lead, vocab, student_logits.device, topk_ids, topk_logprobs, labels, teacher_lse,
                           teacher_lse_at_temperature, options, validate=options.validate)
    logits = student_logits.reshape(-1, vocab)
    if not logits.is_contiguous():
        logits = logits.contiguous()
    rows = SparseKDFunction.apply(logits, flat, options, resolve_backend(options.backend, logits.device))
    return reduce_rows(rows, flat.valid, options.reduction, flat.lead_shape)


def lse_key_for_temperature(temperature: float) -> str:
    """Cache batch key holding the teacher's logsumexp(logits / τ), e.g. ``lse_t2``, ``lse_t0.5``."""
    return f"lse_t{temperature:g}"


def kd_loss_from_batch(
    student_logits: torch.Tensor,
    batch: Mapping[str, Any],
    *,
    labels: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    teacher_lse_at_temperature: torch.Tensor | None = None,
    options: KDLossOptions | None = None,
    **option_kwargs: Any,
) -> torch.Tensor:
    """:func:`kd_loss` with the teacher tensors taken from a cache-reader batch.

    Uses ``batch["topk_ids"]``, ``batch["topk_logprobs"]``, ``batch["lse"]`` (teacher_lse),
    ``batch[f"lse_t{τ:g}"]`` (teacher_lse_at_temperature, only for τ ≠ 1) and ``batch["labels"]`` unless
    ``labels`` is given. Tensors are moved to the student's device. The options are kd_loss's plus
    ``allow_padded_vocab`` (a student vocabulary larger than the batch's ``teacher_vocab_size`` passes).

    Raises:
        AlignmentError: the student's vocabulary differs from the cache's teacher's.
        ValueError: a missing batch key, or what :func:`kd_loss` raises.
    """
    options = resolve_options(options, option_kwargs, entry_point="kd_loss_from_batch")
    for key in ("topk_ids", "topk_logprobs"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r} (keys: {sorted(batch)}); pass a batch from the cache reader")
    # kdlib.batch owns the vocabulary rule (and imports nothing of kdlib.losses); imported on first use so that
    # importing the losses does not load the batch module. A CPU tensor there is read without a device sync.
    from kdlib.batch import check_student_vocab

    check_student_vocab(student_logits.shape[-1], batch.get("teacher_vocab_size"),
                        allow_padded_vocab=options.allow_padded_vocab)
    device = student_logits.device

    def get(key):
        value = batch.get(key)
        if value is None:
            return None
        return torch.as_tensor(value).to(device, non_blocking=True)

    temperature = float(options.temperature)
    if labels is None:
        labels = get("labels")
    if teacher_lse is None:
        teacher_lse = get("lse")
    if temperature != 1.0 and teacher_lse_at_temperature is None:
        key = lse_key_for_temperature(temperature)
        teacher_lse_at_temperature = get(key)
        if teacher_lse_at_temperature is None and options.needs_teacher_lse:
            have = sorted(k for k in batch if str(k).startswith("lse_t"))
            raise ValueError(
                f"tail={options.tail!r} at temperature={temperature:g} needs batch[{key!r}] but the cache only "
                f"has {have or 'no tempered lse'}; rebuild the cache with --temperatures {temperature:g} or use "
                "tail='renormalize'")
    return kd_loss(student_logits, get("topk_ids"), get("topk_logprobs"), labels=labels, teacher_lse=teacher_lse,
                   teacher_lse_at_temperature=teacher_lse_at_temperature, options=options)


class KDLoss(nn.Module):
    """:func:`kd_loss` as a module holding its options (a :class:`~kdlib.losses.options.KDLossOptions`).

    Example:
        >>> loss_fn = KDLoss(ce_weight=0.5, temperature=2.0)   # or KDLoss(KDLossOptions(...))
        >>> loss = loss_fn(logits, topk_ids, topk_logprobs, labels=labels,
        ...                teacher_lse=lse, teacher_lse_at_temperature=lse_t2)
        >>> loss = loss_fn.from_batch(logits, batch)
        >>> loss = loss_fn(logits, topk_ids, topk_logprobs, temperature=1.0)  # a call may replace an option
    """

    def __init__(self, options: KDLossOptions | None = None, **option_kwargs: Any) -> None:
        super().__init__()
        self.options = resolve_options(options, option_kwargs, entry_point="KDLoss")  # validated here

    def forward(self, student_logits, topk_ids, topk_logprobs, **kwargs) -> torch.Tensor:
        options = kwargs.pop("options", self.options)
        return kd_loss(student_logits, topk_ids, topk_logprobs, options=options, **kwargs)

    def from_batch(self, student_logits: torch.Tensor, batch: Mapping[str, Any], **kwargs) -> torch.Tensor:
        options = kwargs.pop("options", self.options)
        return kd_loss_from_batch(student_logits, batch, options=options, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.non_defaults().items())
