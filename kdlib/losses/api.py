"""Public sparse-KD loss API: :func:`kd_loss`, :class:`KDLoss`, :func:`kd_loss_from_batch`.

Shape notation:
    B: batch, T: sequence length, V: vocabulary, K: teacher top-k; [...] any leading dims (N = their product).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ._inputs import BACKENDS, LossConfig, flatten_targets
from .fused import SparseKDFunction, resolve_backend
from .reference import kd_loss_reference

__all__ = ["kd_loss", "KDLoss", "kd_loss_from_batch", "lse_key_for_temperature", "reduce_rows"]


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str, lead_shape) -> torch.Tensor:
    """Mean over valid rows (0.0 when none is valid), sum, or per-position losses."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    tau_squared: bool = True,
    ignore_index: int = -100,
    beta: float = 0.5,
    teacher_lse: torch.Tensor | None = None,
    teacher_lse_at_temperature: torch.Tensor | None = None,
    backend: str = "auto",
    reduction: str = "mean",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Sparse knowledge-distillation loss from cached teacher top-k log-probs, fused with cross-entropy.

    ``loss = ce_weight · CE(z, labels) + kd_weight · (τ² if tau_squared) · D``, both terms averaged over
    valid positions (label != ignore_index; all positions when labels is None). CE is always at τ = 1.

    Let p = softmax(z / τ) be the student over the full vocabulary, S the k teacher ids, q_i the teacher
    on S at τ, Q = Σ_S q_i, P = Σ_S p_i, T = 1 − P (computed exactly as the complement's mass), and a
    per-id term f(t, s) per divergence:

    * ``forward_kl``: f = t log(t/s)   (KL(q‖p))
    * ``reverse_kl``: f = s log(s/t)   (KL(p‖q))
    * ``jsd``: m = β t + (1−β) s; f = β t log(t/m) + (1−β) s log(s/m)  (TRL/Liger GKD convention:
      β = 0 is exactly forward KL, β = 1 exactly reverse KL)
    * ``tvd``: f = |t − s| / 2

    D per tail mode:

    * ``bucket`` (default, exact): D = Σ_S f(q_i, p_i) + f(1 − Q, 1 − P).
    * ``renormalize``: teacher q̃ = q / Q on S and 0 elsewhere, student p over the full vocabulary;
      D = Σ_V f(q̃_j, p_j) = Σ_S f(q̃_i, p_i) + f(0, 1 − P). The last term is 0 for forward KL,
      (1−β)(1 − P) log(1/(1−β)) for JSD and (1 − P)/2 for TVD; for reverse KL it would be +∞, so
      reverse KL sums over S only: D = Σ_S p_i log(p_i / q̃_i) (axolotl's convention). **This can be
      negative** (P log P < 0 when p_i = P q̃_i); use ``bucket`` for a reverse KL that is >= 0.
    * ``none``: D = Σ_S f(q_i, p_i), teacher not renormalized, no tail term.

    Teacher at τ: q_i = exp((ℓ_i + teacher_lse)/τ − teacher_lse_at_temperature) for ``bucket``/``none``
    (τ ≠ 1 requires both lse tensors: build the cache with ``--temperatures τ``), softmax(ℓ/τ) over K
    for ``renormalize``. Tail masses are floored at 1e-30 before logs.

    Args:
        student_logits: [..., V] fp32/bf16/fp16/fp64 logits; accumulated in fp32, grad in this dtype.
        topk_ids: [..., K] any integer dtype (int32/int64/uint16), sorted by teacher log-prob, unique.
        topk_logprobs: [..., K] fp16/bf16/fp32 teacher log-probs at τ = 1 over the full vocabulary.
        labels: [...] integer targets for CE and for marking ignored positions (``ignore_index``).
        ce_weight: weight of CE (needs labels).
        kd_weight: weight of the distillation term.
        temperature: τ applied to student and teacher in D (not in CE).
        divergence: ``forward_kl`` | ``reverse_kl`` | ``jsd`` | ``tvd``.
        tail: ``bucket`` | ``renormalize`` | ``none`` (see above).
        tau_squared: multiply D by τ² (Hinton); set False to match Megatron/TRL.
        ignore_index: label value of positions that count in neither term.
        beta: JSD weight in [0, 1].
        teacher_lse: [...] fp32 teacher logsumexp of raw logits (cache key ``lse``).
        teacher_lse_at_temperature: [...] fp32 teacher logsumexp(logits / τ) (cache key ``lse_t{τ:g}``).
        backend: ``auto`` (Triton on CUDA, PyTorch otherwise) | ``torch`` | ``triton`` | ``reference``.
        reduction: ``mean`` | ``sum`` | ``none`` (per-position [...] losses, 0 at ignored positions).
        chunk_rows: rows per chunk of the PyTorch pass (default: 2^23 elements per chunk, i.e. 32 MB of
            fp32 temporaries, ``torch_pass.CHUNK_ELEMENTS``: each op on a chunk is one OpenMP barrier, and
            thousands of small chunks made the loss several times slower than CE on a busy CPU).
        validate: check that ``topk_ids`` and ``labels`` lie in [0, V) (clear error otherwise). The check
            reads the data, which on CUDA is one host-device synchronization per call; pass False in a
            hot loop whose inputs are already known good.

    Returns:
        Scalar loss (fp32, fp64 for fp64 logits), or [...] per position with ``reduction="none"``.

    Raises:
        ValueError: unknown option, shape mismatch, ids outside [0, V), ce_weight > 0 without labels, or
            τ ≠ 1 with ``bucket``/``none`` without the teacher's lse pair.
    """
    config = LossConfig(ce_weight, kd_weight, temperature, divergence, tail, tau_squared, ignore_index, beta,
                        reduction)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return kd_loss_reference(
            student_logits, topk_ids, topk_logprobs, labels=labels, ce_weight=ce_weight, kd_weight=kd_weight,
            temperature=temperature, divergence=divergence, tail=tail, tau_squared=tau_squared,
            ignore_index=ignore_index, beta=beta, teacher_lse=teacher_lse,
            teacher_lse_at_temperature=teacher_lse_at_temperature, reduction=reduction)
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a float tensor [..., V], got {student_logits.dtype}")
    vocab = student_logits.shape[-1]
    lead = tuple(student_logits.shape[:-1])
    flat = flatten_targets(lead, vocab, student_logits.device, topk_ids, topk_logprobs, labels, teacher_lse,
                           teacher_lse_at_temperature, config, validate=validate)
    logits = student_logits.reshape(-1, vocab)
    if not logits.is_contiguous():
        logits = logits.contiguous()
    resolved = resolve_backend(backend, logits.device)
    rows = SparseKDFunction.apply(logits, flat, config, resolved, chunk_rows)
    return reduce_rows(rows, flat.valid, reduction, flat.lead_shape)


def lse_key_for_temperature(temperature: float) -> str:
    """Cache batch key holding the teacher's logsumexp(logits / τ), e.g. ``lse_t2``, ``lse_t0.5``."""
    return f"lse_t{temperature:g}"


def kd_loss_from_batch(student_logits: torch.Tensor, batch: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
    """:func:`kd_loss` with the teacher tensors taken from a cache-reader batch.

    Uses ``batch["topk_ids"]``, ``batch["topk_logprobs"]``, ``batch["lse"]`` (teacher_lse),
    ``batch[f"lse_t{τ:g}"]`` (teacher_lse_at_temperature, only for τ ≠ 1) and ``batch["labels"]`` unless
    ``labels`` is given. Tensors are moved to the student's device. Other keyword arguments go to kd_loss.
    """
    for key in ("topk_ids", "topk_logprobs"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r} (keys: {sorted(batch)}); pass a batch from the cache reader")
    _check_vocab(student_logits.shape[-1], batch.get("teacher_vocab_size"), kwargs.pop("allow_padded_vocab", False))
    device = student_logits.device

    def get(key):
        value = batch.get(key)
        if value is None:
            return None
        return torch.as_tensor(value).to(device, non_blocking=True)

    temperature = float(kwargs.get("temperature", 1.0))
    if "labels" not in kwargs or kwargs["labels"] is None:
        kwargs["labels"] = get("labels")
    if kwargs.get("teacher_lse") is None:
        kwargs["teacher_lse"] = get("lse")
    if temperature != 1.0 and kwargs.get("teacher_lse_at_temperature") is None:
        key = lse_key_for_temperature(temperature)
        kwargs["teacher_lse_at_temperature"] = get(key)
        tail = kwargs.get("tail", "bucket")
        if kwargs["teacher_lse_at_temperature"] is None and tail != "renormalize" and \
                float(kwargs.get("kd_weight", 1.0)) > 0:
            have = sorted(k for k in batch if str(k).startswith("lse_t"))
            raise ValueError(
                f"tail={tail!r} at temperature={temperature:g} needs batch[{key!r}] but the cache only has "
                f"{have or 'no tempered lse'}; rebuild the cache with --temperatures {temperature:g} or use "
                "tail='renormalize'")
    return kd_loss(student_logits, get("topk_ids"), get("topk_logprobs"), **kwargs)


def _check_vocab(student_vocab: int, teacher_vocab: Any, allow_padded_vocab: bool) -> None:
    """Loader batches carry the teacher's vocabulary size (a CPU tensor or int): compare it without a sync."""
    if teacher_vocab is None:
        return
    teacher_vocab = int(teacher_vocab.reshape(-1)[0]) if torch.is_tensor(teacher_vocab) else int(teacher_vocab)
    if student_vocab == teacher_vocab or (allow_padded_vocab and student_vocab > teacher_vocab):
        return
    from kdlib.alignment import AlignmentError

    hint = (" If the student's embedding is padded beyond the teacher's vocabulary, pass allow_padded_vocab=True."
            if student_vocab > teacher_vocab else "")
    raise AlignmentError(
        f"student logits have vocabulary {student_vocab} but the cache's teacher has {teacher_vocab}: top-k ids "
        f"index a different vocabulary, so the KD targets would be meaningless.{hint}")


class KDLoss(nn.Module):
    """:func:`kd_loss` as a module holding its keyword configuration.

    Example:
        >>> loss_fn = KDLoss(ce_weight=0.5, temperature=2.0)
        >>> loss = loss_fn(logits, topk_ids, topk_logprobs, labels=labels,
        ...                teacher_lse=lse, teacher_lse_at_temperature=lse_t2)
        >>> loss = loss_fn.from_batch(logits, batch)
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        probe = {k: v for k, v in config.items() if k not in ("backend", "chunk_rows", "validate")}
        LossConfig(**probe)  # validate early, with the same messages
        self.config = dict(config)

    def forward(self, student_logits, topk_ids, topk_logprobs, **kwargs) -> torch.Tensor:
        return kd_loss(student_logits, topk_ids, topk_logprobs, **{**self.config, **kwargs})

    def from_batch(self, student_logits: torch.Tensor, batch: Mapping[str, Any], **kwargs) -> torch.Tensor:
        return kd_loss_from_batch(student_logits, batch, **{**self.config, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
