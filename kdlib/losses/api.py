"""Public sparse-KD loss API: :func:`kd_loss`, :class:`KDLoss`, :func:`kd_loss_from_batch`.

Shape notation:
    B: batch, T: sequence length, V: vocabulary, K: teacher top-k, W: sample slots; [...] any leading dims
    (N = their product).

One call for the three target kinds of a cache (issue 10): top-k (``topk_ids``/``topk_logprobs``), sampled
(``sample_ids``/``sample_counts``/``sample_logprobs``) and hybrid (both: an exact head plus samples from the
rest); the kind is picked from what is given (:func:`kdlib.losses.targets.target_kind`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ._inputs import reduce_rows
from .backends import resolve_backend
from .fused import SparseKDFunction
from .options import KDLossOptions, check_for_teacher_tail, resolve_options
from .reference import kd_loss_reference
from .targets import SampleTargets, flatten_any, sample_temperature_value, target_kind
from .torch_pass import compute_dtype

__all__ = ["kd_loss", "KDLoss", "kd_loss_from_batch", "lse_key_for_temperature", "reduce_rows"]


# long: the docstring is the contract of every divergence, tail and target kind
def kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    teacher_lse_at_temperature: torch.Tensor | None = None,
    sample_ids: torch.Tensor | None = None,
    sample_counts: torch.Tensor | None = None,
    sample_logprobs: torch.Tensor | None = None,
    sample_temperature: float | torch.Tensor = 1.0,
    teacher_lse_sample_temperature: torch.Tensor | None = None,
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

    Sampled and hybrid targets (``sample_ids`` given; with ``topk_ids`` too it is hybrid): D is an unbiased
    estimate of forward KL(p_T^τ ‖ q^τ) in value and gradient, from D draws at ``sample_temperature`` τs
    (importance-weighted when τs ≠ τ); docs/LOSSES.md and :mod:`kdlib.losses.targets` give the estimator.
    Only ``forward_kl`` (or ``jsd`` with beta 0) has one: other divergences raise. ``tail`` is ignored there.

    Args:
        student_logits: [..., V] fp32/bf16/fp16/fp64 logits; accumulated in fp32, grad in this dtype.
        topk_ids: [..., K] any integer dtype (int32/int64/uint16), sorted by teacher log-prob, unique.
        topk_logprobs: [..., K] fp16/bf16/fp32 teacher log-probs at τ = 1 over the full vocabulary.
        labels: [...] integer targets for CE and for marking ignored positions (``ignore_index``).
        teacher_lse: [...] fp32 teacher logsumexp of raw logits (cache key ``lse``).
        teacher_lse_at_temperature: [...] fp32 teacher logsumexp(logits / τ) (cache key ``lse_t{τ:g}``).
        sample_ids: [..., W] sampled teacher ids (any integer dtype; slots with count 0 are padding).
        sample_counts: [..., W] draw counts c_j >= 0 (integer); a valid sampled row needs at least one draw.
        sample_logprobs: [..., W] exact teacher log-probs of the sampled ids at τ = 1 (needed when τs ≠ τ;
            with them the value estimates KL, without them soft-target CE: same gradient).
        sample_temperature: τs the ids were drawn at (a number or the batch's 0-dim tensor), default 1.
        teacher_lse_sample_temperature: [...] teacher logsumexp(logits / τs) (cache key ``lse_t{τs:g}``),
            needed when τs ∉ {1, τ}.
        options: a :class:`~kdlib.losses.options.KDLossOptions` (default: every default).
        **option_kwargs: its fields as keywords (replacing those of ``options``; see KDLossOptions for
            each): ``ce_weight``, ``kd_weight``, ``temperature``, ``divergence``, ``tail``, ``tau_squared``,
            ``ignore_index``, ``beta``, ``reduction``, ``backend``, ``validate``, ``chunk_rows``.

    Returns:
        Scalar loss (fp32, fp64 for fp64 logits), or [...] per position with ``reduction="none"``.

    Raises:
        ValueError: unknown option, shape mismatch, ids outside [0, V), ce_weight > 0 without labels,
            τ ≠ 1 with ``bucket``/``none`` without the teacher's lse pair; for sampled / hybrid targets a
            divergence without unbiased estimator, negative counts, a valid sampled row without draws, or a
            missing lse / sample_logprobs at a temperature that needs them.
        TypeError: a keyword that is no option of kd_loss.
    """
    options = resolve_options(options, option_kwargs, entry_point="kd_loss")
    if options.backend == "reference":
        return kd_loss_reference(
            student_logits, topk_ids, topk_logprobs, labels=labels, teacher_lse=teacher_lse,
            teacher_lse_at_temperature=teacher_lse_at_temperature, sample_ids=sample_ids,
            sample_counts=sample_counts, sample_logprobs=sample_logprobs, sample_temperature=sample_temperature,
            teacher_lse_sample_temperature=teacher_lse_sample_temperature, options=options)
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a float tensor [..., V], got {student_logits.dtype}")
    vocab = student_logits.shape[-1]
    lead = tuple(student_logits.shape[:-1])
    samples = SampleTargets.of(sample_ids, sample_counts, sample_logprobs, sample_temperature,
                               teacher_lse_sample_temperature)
    flat = flatten_any(lead, vocab, student_logits.device, compute_dtype(student_logits.dtype), topk_ids,
                       topk_logprobs, labels, teacher_lse, teacher_lse_at_temperature, samples, options)
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
    """:func:`kd_loss` with the teacher tensors taken from a cache-reader batch, for every target kind.

    The kind follows the batch's keys: ``topk_ids``/``topk_logprobs`` only → top-k; ``sample_ids``/
    ``sample_counts`` (+ ``sample_logprobs``) only → sampled; both → hybrid. Also used: ``batch["lse"]``
    (teacher_lse), ``batch[f"lse_t{τ:g}"]`` (teacher_lse_at_temperature, for τ ≠ 1),
    ``batch["sample_temperature"]`` (τs, a 0-dim tensor) and ``batch[f"lse_t{τs:g}"]`` (when τs ∉ {1, τ}),
    ``batch["labels"]`` unless ``labels`` is given. Tensors are moved to the student's device. The options are
    kd_loss's plus ``allow_padded_vocab`` (a student vocabulary larger than the batch's ``teacher_vocab_size``
    passes, and a smaller one when every id of the batch is below it: docs/LOSSES.md, "Student vocabulary
    smaller than the teacher's").

    Raises:
        AlignmentError: the student's vocabulary differs from the cache's teacher's.
        ValueError: a missing batch key (e.g. the lse at a temperature the cache was not built with: rebuild
            it with ``--temperatures``), or what :func:`kd_loss` raises.
    """
    options = resolve_options(options, option_kwargs, entry_point="kd_loss_from_batch")
    kind = _batch_kind(batch)
    # kdlib.batch owns the vocabulary rule (and imports nothing of kdlib.losses); imported on first use so that
    # importing the losses does not load the batch module. A CPU tensor there is read without a device sync.
    from kdlib.batch import check_batch_vocab

    check_batch_vocab(student_logits.shape[-1], batch, allow_padded_vocab=options.allow_padded_vocab)
    check_for_teacher_tail(options, kind, "teacher_tail_missing" in batch)
    device = student_logits.device

    def get(key):
        value = batch.get(key)
        if value is None:
            return None
        return torch.as_tensor(value).to(device, non_blocking=True)

    temperature = float(options.temperature)
    # read where the batch made it (the CPU): no device sync
    sample_temperature = 1.0 if kind == "topk" else sample_temperature_value(batch["sample_temperature"])
    if labels is None:
        labels = get("labels")
    if teacher_lse is None:
        teacher_lse = get("lse")
    if temperature != 1.0 and teacher_lse_at_temperature is None:
        teacher_lse_at_temperature = get(lse_key_for_temperature(temperature))
        needed = options.needs_teacher_lse if kind == "topk" else (
            kind == "hybrid" or "sample_logprobs" in batch or sample_temperature != temperature)
        if teacher_lse_at_temperature is None and needed:
            raise ValueError(_missing_lse_message(batch, kind, temperature, options))
    lse_sample = None
    if kind != "topk" and sample_temperature not in (1.0, temperature):
        lse_sample = get(lse_key_for_temperature(sample_temperature))
        if lse_sample is None:
            raise ValueError(_missing_lse_message(batch, kind, sample_temperature, options, sampled=True))
    return kd_loss(student_logits, get("topk_ids"), get("topk_logprobs"), labels=labels, teacher_lse=teacher_lse,
                   teacher_lse_at_temperature=teacher_lse_at_temperature, sample_ids=get("sample_ids"),
                   sample_counts=get("sample_counts"), sample_logprobs=get("sample_logprobs"),
                   sample_temperature=sample_temperature, teacher_lse_sample_temperature=lse_sample,
                   options=options)


def _batch_kind(batch: Mapping[str, Any]) -> str:
    """The target kind of a cache batch from its keys; ValueError naming what is missing."""
    pairs = (("topk_ids", "topk_logprobs"), ("sample_ids", "sample_counts"))
    if not any(first in batch for first, _ in pairs):
        raise ValueError(f"batch has no 'topk_ids' and no 'sample_ids' (keys: {sorted(batch)}); pass a batch "
                         "from the cache reader")
    for first, second in pairs:
        if first in batch and second not in batch:
            raise ValueError(f"batch has {first!r} but no {second!r} (keys: {sorted(batch)}); pass a batch from "
                             "the cache reader")
    if "sample_ids" in batch and "sample_temperature" not in batch:
        raise ValueError(f"batch has 'sample_ids' but no 'sample_temperature' (keys: {sorted(batch)}): the "
                         "temperature the ids were drawn at decides their weights; pass a batch from the cache "
                         "reader (or add it as a 0-dim tensor)")
    return target_kind(batch.get("topk_ids"), batch.get("sample_ids"))


def _missing_lse_message(batch, kind: str, temperature: float, options: KDLossOptions, sampled=False) -> str:
    key = lse_key_for_temperature(temperature)
    have = sorted(k for k in batch if str(k).startswith("lse_t")) or "no tempered lse"
    if kind == "topk":
        return (f"tail={options.tail!r} at temperature={temperature:g} needs batch[{key!r}] but the cache only "
                f"has {have}; rebuild the cache with --temperatures {temperature:g} or use tail='renormalize'")
    why = (f"ids drawn at sample_temperature={temperature:g} for a loss at temperature={options.temperature:g} "
           "need importance weights from" if sampled else
           f"the exact teacher log-probs at temperature={temperature:g} need")
    return (f"{kind} targets: {why} batch[{key!r}], but the cache only has {have}; rebuild the cache with "
            f"--temperatures {temperature:g}")


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

    def forward(self, student_logits, topk_ids=None, topk_logprobs=None, **kwargs) -> torch.Tensor:
        options = kwargs.pop("options", self.options)
        return kd_loss(student_logits, topk_ids, topk_logprobs, options=options, **kwargs)

    def from_batch(self, student_logits: torch.Tensor, batch: Mapping[str, Any], **kwargs) -> torch.Tensor:
        options = kwargs.pop("options", self.options)
        return kd_loss_from_batch(student_logits, batch, options=options, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.non_defaults().items())
