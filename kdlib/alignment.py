"""The cache's alignment convention on the training side: labels from tokens, and the student/teacher check.

Shape notation::

    B  sequences in a batch      T  positions per sequence
    K  top-k entries per position  V  vocabulary size

Convention (``cache_server.format.ALIGNMENT_CONVENTION``): position t of a cached sequence holds the teacher's
distribution over token t+1 given tokens[0..t]. A causal-LM student's logits at position t predict the same
token, so ``student_logits[:, t]`` pairs with ``topk_ids[:, t]`` directly, and the label of position t is
``input_ids[:, t+1]``; the last position has no label inside the sequence (``ignore_index``).

Offline KD fails silently when the student's batch is not the batch the teacher saw (another shuffle, an
off-by-one shift, another tokenizer): the loss still decreases, towards the wrong targets. ``check_alignment``
is one elementwise comparison per step, so the loader-facing helpers run it by default.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["AlignmentError", "check_alignment", "shift_labels", "DEFAULT_IGNORE_INDEX"]

DEFAULT_IGNORE_INDEX = -100


class AlignmentError(ValueError):
    """The student's tokens or vocabulary do not match the cache the teacher targets came from."""


def shift_labels(input_ids: torch.Tensor, ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels per the cache convention: ``labels[..., t] = input_ids[..., t+1]``, last = ignore_index.

    Args:
        input_ids: [..., T] integer tokens (any integer dtype).
        ignore_index: label of the last position (it has no next token inside the sequence).

    Returns:
        [..., T] int64 labels (the dtype ``cross_entropy`` takes, so nothing widens them again).
    """
    labels = torch.empty(input_ids.shape, dtype=torch.int64, device=input_ids.device)  # [..., T]
    labels[..., :-1] = input_ids[..., 1:]
    labels[..., -1] = ignore_index
    return labels


def _teacher_vocab_size(teacher_batch: Mapping[str, Any], explicit: int | None) -> int | None:
    if explicit is not None:
        return int(explicit)
    value = teacher_batch.get("teacher_vocab_size") if isinstance(teacher_batch, Mapping) else None
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return int(value.reshape(-1)[0])  # 0-dim from CacheLoader, [B] after a default collate
    return int(value)


def check_alignment(
    student_input_ids: torch.Tensor,
    teacher_batch: Mapping[str, torch.Tensor],
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
) -> None:
    """Raise :class:`AlignmentError` unless the student trains on exactly the tokens the teacher saw.

    Checks (each one comparison, no copies of the top-k arrays):

    * shapes: the student's [B, T] equals the cache batch's ``input_ids`` [B, T];
    * tokens: every position equal (the error says how many differ, the first (row, position), and whether
      the student looks shifted by one position, the most common mistake);
    * vocabulary: ``student_vocab_size`` equals the teacher's (``teacher_vocab_size=``, or the batch's
      ``teacher_vocab_size`` entry that :func:`kdlib.make_loader` and :class:`kdlib.CacheDataset` add), and
      every cached top-k id is below ``student_vocab_size``.

    Args:
        student_input_ids: [B, T] tokens the student is fed (any integer dtype, any device).
        teacher_batch: a cache batch with ``input_ids`` [B, T] (and ``topk_ids`` [B, T, K] for the id check).
        student_vocab_size: the student's output vocabulary (e.g. ``model.config.vocab_size``); None skips the
            vocabulary checks.
        teacher_vocab_size: the cache's vocabulary when the batch does not carry ``teacher_vocab_size``.

    Raises:
        AlignmentError: on any mismatch, with what differs and how to fix it.
    """
    if "input_ids" not in teacher_batch:
        raise AlignmentError(
            f"the teacher batch has no 'input_ids' (keys: {sorted(teacher_batch)}); pass a batch from "
            "kdlib.make_loader / CacheDataset / cache.read(), which carry the tokens the teacher saw")
    teacher_ids = teacher_batch["input_ids"]
    student = torch.as_tensor(student_input_ids)
    if tuple(student.shape) != tuple(teacher_ids.shape):
        raise AlignmentError(
            f"student input_ids have shape {tuple(student.shape)} but the cache batch has "
            f"{tuple(teacher_ids.shape)}: the student must train on the cached sequences unchanged (same "
            "batch, same sequence length; no truncation, packing or padding on top of the cache)")
    if student.is_floating_point() or student.dtype == torch.bool:
        raise AlignmentError(f"student input_ids must be integer token ids, got {student.dtype}")
    teacher = teacher_ids.to(device=student.device, non_blocking=True)
    # Compare in int64: the cache stores uint16/int32, the student usually holds int64.
    differs = student.to(torch.int64) != teacher.to(torch.int64)  # [B, T]
    if bool(differs.any()):
        count = int(differs.sum())
        where = differs.nonzero()[0].tolist()
        first = f"(sequence {where[0]}, position {where[1]})" if len(where) == 2 else f"index {tuple(where)}"
        hint = _diagnose(student.to(torch.int64), teacher.to(torch.int64))
        raise AlignmentError(
            f"student tokens differ from the cache's tokens at {count} of {differs.numel()} positions; first "
            f"at {first}: student {int(student[tuple(where)])} vs cache {int(teacher[tuple(where)])}. {hint}"
            "Feed the student the batch's own input_ids (kdlib.make_loader yields them), or look the cache up "
            "by the same sequence indices your data loader uses (cache.lookup(indices)).")

    if student_vocab_size is None:
        return
    student_vocab_size = int(student_vocab_size)
    teacher_vocab = _teacher_vocab_size(teacher_batch, teacher_vocab_size)
    if teacher_vocab is not None and teacher_vocab != student_vocab_size:
        raise AlignmentError(
            f"the student's vocabulary has {student_vocab_size} entries but the cache's teacher had "
            f"{teacher_vocab}: top-k ids index different tokens (or none). Use a student with the teacher's "
            "tokenizer and vocab_size, or rebuild the cache with a teacher that shares the student's tokenizer")
    topk_ids = teacher_batch.get("topk_ids")
    if topk_ids is not None and topk_ids.numel():
        # uint16 has no max() on every backend: compare in int32, exact for ids < 2**31.
        largest = int(topk_ids.to(torch.int32).max()) if topk_ids.dtype == torch.uint16 else int(topk_ids.max())
        if largest >= student_vocab_size:
            raise AlignmentError(
                f"the cache holds teacher top-k id {largest}, outside the student's vocabulary of "
                f"{student_vocab_size}: the teacher's vocabulary is larger; use a student with the teacher's "
                "tokenizer and vocab_size")


def _diagnose(student: torch.Tensor, teacher: torch.Tensor) -> str:
    """A hint for the common causes: an off-by-one shift, or a different order of sequences."""
    if student.shape[-1] > 1:
        if bool((student[..., 1:] == teacher[..., :-1]).all()):
            return ("The student's tokens are the cache's shifted right by one position (the student has an "
                    "extra leading token, e.g. a BOS the cache lacks). ")
        if bool((student[..., :-1] == teacher[..., 1:]).all()):
            return ("The student's tokens are the cache's shifted left by one position (labels fed as inputs, "
                    "or the cache built with a BOS the student lacks). ")
    if student.dim() == 2 and student.shape[0] > 1:
        rows_equal = (student[:, None, :] == teacher[None, :, :]).all(-1)  # [B, B]
        if bool(rows_equal.any(-1).all()):
            return "Every student sequence is in the cache batch, in another order (a different shuffle). "
    return ""
