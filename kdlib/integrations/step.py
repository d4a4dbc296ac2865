"""One training step's loss for plain loops: run the student on the batch, or check logits you made yourself.

Shape notation::

    B  sequences per batch   T  positions per sequence   V  student vocabulary   K  teacher top-k
    W  sample slots (sampled and hybrid caches)

* :func:`kd_step_loss` — runs the student on the batch's OWN ``input_ids`` and returns (KD + CE loss, logits):
  the student cannot see other tokens than the teacher did, so no shift can happen.
* :func:`distill_loss` — ``check_alignment`` + ``kd_loss_from_batch`` for logits you computed yourself. By
  default it checks the VOCABULARY only (sizes, and thereby the top-k ids); your tokens are compared with the
  cache's only when you pass ``student_input_ids=``.

Both take every target kind of a cache (top-k, sampled, hybrid): ``kd_loss_from_batch`` picks it from the
batch's keys (``topk_*`` only, ``sample_*`` only, or both) and reads ``sample_temperature`` and the lse keys.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from kdlib.alignment import check_alignment
from kdlib.batch import DEFAULT_IGNORE_INDEX, KEEP_ON_CPU, batch_labels, student_input_ids

__all__ = ["kd_step_loss", "distill_loss", "logits_of", "TEACHER_KEYS", "split_teacher_batch", "model_device"]

# Batch entries that belong to the teacher side (never passed to the student model): the targets, and every
# bookkeeping entry the batch makers keep on the CPU (kdlib.batch.KEEP_ON_CPU).
TEACHER_KEYS = tuple(dict.fromkeys(("topk_ids", "topk_logprobs", "sample_ids", "sample_counts", "sample_logprobs",
                                    "lse", "labels") + KEEP_ON_CPU))


def split_teacher_batch(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a cache batch into (student model inputs, teacher tensors); ``input_ids`` goes to both."""
    teacher, student = {}, {}
    for key, value in batch.items():
        if key in TEACHER_KEYS or str(key).startswith("lse_t"):
            teacher[key] = value
        else:
            student[key] = value
    if "input_ids" in student:
        teacher["input_ids"] = student["input_ids"]
    return student, teacher


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits [B, T, V] of a model's output: a transformers output's ``.logits``, a tuple's first entry, or
    the tensor itself."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(outputs).__name__}, which has no logits: return a [B, T, V] "
                        "tensor, a tuple starting with one, or an output with .logits (transformers models)")
    return logits


def model_device(model: Any, device: torch.device | str | None = None) -> torch.device | None:
    """``device`` when given, else where the model's first parameter lives; None for a model without
    parameters (inputs stay put)."""
    if device is not None:
        return torch.device(device)
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else None


def kd_step_loss(model: Any, batch: Mapping[str, torch.Tensor], *, model_kwargs: Mapping[str, Any] | None = None,
                 **loss_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the student on the batch's own tokens and return ``(loss, logits)``: KD (+ CE) against the cache.

    The student is called as ``model(batch["input_ids"])`` (int64, on the model's device), so it sees exactly
    the tokens the teacher saw: a shifted or reordered student input cannot happen. The labels are the batch's
    (``kdlib.make_loader`` / ``CacheDataset`` make them, padding rows ignored), or, for a batch without
    labels (``cache.read``), the tokens shifted per the cache convention (``kdlib.batch.shift_labels``). The
    loss is :func:`kdlib.kd_loss_from_batch`, which checks the vocabulary (``allow_padded_vocab=`` goes to it).

    Args:
        model: the student, a causal LM: ``model(input_ids [B, T])`` returns logits [B, T, V] (a tensor, a
            tuple starting with them, or a transformers output with ``.logits``). It is called without labels.
        batch: a cache batch with ``input_ids`` [B, T] and the targets: ``topk_ids``/``topk_logprobs``
            [B, T, K], ``sample_ids``/``sample_counts``/``sample_logprobs`` [B, T, W] + ``sample_temperature``,
            or both (hybrid).
        model_kwargs: extra keyword arguments for the model call (e.g. ``{"use_cache": False}``).
        **loss_kwargs: ``kdlib.kd_loss`` options (``ce_weight``, ``temperature``, ``divergence``,
            ``ignore_index``...) and ``allow_padded_vocab``.

    Returns:
        ``(loss, logits)``: the scalar loss, and the student's logits [B, T, V] (for metrics).

    Raises:
        kdlib.AlignmentError: the student's vocabulary differs from the cache's.
        ValueError: the model's logits do not have the batch's [B, T] leading shape.

    Example::

        for batch in kdlib.make_loader(cache, 8, device="cuda"):
            loss, logits = kdlib.kd_step_loss(student, batch, ce_weight=0.1, temperature=2.0)
            loss.backward()
    """
    from kdlib.losses import kd_loss_from_batch

    if "labels" in loss_kwargs:
        raise ValueError("kd_step_loss takes the labels from the batch (the tokens it feeds the student); to "
                         "pass labels of your own, call the student yourself and use kdlib.kd_loss_from_batch")
    ids = student_input_ids(batch, model_device(model))  # [B, T] int64
    logits = logits_of(model(ids, **dict(model_kwargs or {})))  # [B, T, V]
    if tuple(logits.shape[:-1]) != tuple(ids.shape):
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)} for input_ids of shape "
                         f"{tuple(ids.shape)}; kd_step_loss needs a causal LM's [B, T, V] logits, one per input "
                         "position")
    labels = batch_labels(batch, int(loss_kwargs.get("ignore_index", DEFAULT_IGNORE_INDEX)))  # [B, T]
    loss = kd_loss_from_batch(logits, batch, labels=labels.to(logits.device, non_blocking=True), **loss_kwargs)
    return loss, logits


def distill_loss(
    student_logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    *,
    student_input_ids: torch.Tensor | None = None,
    check: bool = True,
    allow_padded_vocab: bool = False,
    **kd_kwargs: Any,
) -> torch.Tensor:
    """KD (+ CE with ``ce_weight``) loss of ``student_logits`` [B, T, V] against a cache batch, checked first.

    What is checked: the VOCABULARY (the logits' size against the cache's, and thereby the top-k ids), and the
    tokens ONLY when ``student_input_ids=`` is given. Logits from a student fed other tokens than
    ``batch["input_ids"]`` (shifted, another order) pass unnoticed without it; :func:`kd_step_loss` rules that
    out by feeding the student itself.

    Args:
        student_logits: [B, T, V]; position t predicts token t+1 (a causal LM's ordinary output).
        batch: a cache batch (``kdlib.make_loader`` / ``CacheDataset`` / ``cache.lookup`` plus labels).
        student_input_ids: [B, T] the tokens the student actually saw, when they are not ``batch["input_ids"]``
            itself (e.g. from your own data pipeline); default None: the student was fed the batch's tokens, so
            only the vocabulary is checked, without reading device memory (no host-device sync).
        check: run :func:`kdlib.check_alignment` before the loss (tokens only when ``student_input_ids`` is
            given: one comparison and one sync; vocabulary sizes as Python ints).
        allow_padded_vocab: accept a student vocabulary larger than the teacher's (an embedding padded to a
            multiple of 64, e.g. 50304 for GPT-2's 50257); see :func:`kdlib.check_alignment`.
        **kd_kwargs: ``kdlib.kd_loss`` options (``ce_weight``, ``temperature``, ``divergence``, ``tail``...).

    Raises:
        kdlib.AlignmentError: the student's tokens or vocabulary differ from the cache's.
    """
    from kdlib.losses import kd_loss_from_batch

    if check:
        check_alignment(student_input_ids, batch, student_vocab_size=student_logits.shape[-1],
                        allow_padded_vocab=allow_padded_vocab)
    # The vocabulary was checked above (or deliberately not): the loss must not refuse what was allowed.
    return kd_loss_from_batch(student_logits, batch, allow_padded_vocab=allow_padded_vocab or not check, **kd_kwargs)
