"""The cache's alignment convention on the training side: labels from tokens, and the student/teacher check.

Shape notation::

    B  sequences in a batch      T  positions per sequence
    K  top-k entries per position  V  vocabulary size

Convention (``cache_server.format.ALIGNMENT_CONVENTION``): position t of a cached sequence holds the teacher's
distribution over token t+1 given tokens[0..t]. A causal-LM student's logits at position t predict the same
token, so ``student_logits[:, t]`` pairs with ``topk_ids[:, t]`` directly, and the label of position t is
``input_ids[:, t+1]``; the last position has no label inside the sequence (``ignore_index``).

Offline KD fails silently when the student's batch is not the batch the teacher saw (another shuffle, an
off-by-one shift, another tokenizer): the loss still decreases, towards the wrong targets. The checks are
split so that a training step never waits for the device:

* the top-k id range (every cached id below the teacher's vocabulary) is checked on the CPU where a batch is
  made (``kdlib.make_loader``, ``CacheDataset``, ``KDTrainer``'s look-up), before the copy to the device
  (:func:`check_topk_ids_in_vocab`);
* :func:`check_alignment` compares the vocabulary sizes as Python ints, and compares tokens only when the student
  was fed tokens of its own (one comparison and one device sync); fed the batch's own ``input_ids`` (the usual
  case), it does not read device memory at all.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["AlignmentError", "check_alignment", "check_topk_ids_in_vocab", "shift_labels", "DEFAULT_IGNORE_INDEX"]

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


def check_topk_ids_in_vocab(topk_ids: torch.Tensor | np.ndarray, vocab_size: int) -> None:
    """Raise :class:`AlignmentError` if a cached top-k id is outside the teacher's vocabulary.

    Meant for CPU batches where they are made (one pass over [B, T, K] compact ids, no device involved); on a
    device tensor it would cost a host-device sync.

    Args:
        topk_ids: [B, T, K] (any leading shape) cached ids, uint16/int32/int64.
        vocab_size: the teacher's vocabulary size (the cache manifest's ``vocab_size``).
    """
    if isinstance(topk_ids, torch.Tensor):
        if topk_ids.device.type != "cpu":
            topk_ids = topk_ids.cpu()
        topk_ids = topk_ids.numpy()
    if topk_ids.size == 0:
        return
    largest = int(topk_ids.max())
    if largest >= int(vocab_size):
        raise AlignmentError(
            f"the cache holds teacher top-k id {largest}, outside the teacher's vocabulary of {int(vocab_size)} that "
            "its manifest states: the cache is inconsistent (built with another vocab_size than its teacher's "
            "output size); rebuild it with the teacher's real vocabulary size")


def _teacher_vocab_size(teacher_batch: Mapping[str, Any], explicit: int | None) -> int | None:
    if explicit is not None:
        return int(explicit)
    value = teacher_batch.get("teacher_vocab_size") if isinstance(teacher_batch, Mapping) else None
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        # 0-dim from CacheLoader, [B] after a default collate. The loaders keep it on the CPU, where reading it
        # does not wait for the device; a copy moved to an accelerator costs one sync here.
        return int(value.reshape(-1)[0])
    return int(value)


def check_alignment(
    student_input_ids: torch.Tensor | None,
    teacher_batch: Mapping[str, torch.Tensor],
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    allow_padded_vocab: bool = False,
) -> None:
    """Raise :class:`AlignmentError` unless the student trains on exactly the tokens the teacher saw.

    Checks:

    * shapes: the student's [B, T] equals the cache batch's ``input_ids`` [B, T];
    * tokens: every position equal (the error says how many differ, the first (row, position), and whether
      the student looks shifted by one position, the most common mistake). Skipped when ``student_input_ids``
      is None or is the batch's own ``input_ids`` tensor: then they are equal by construction, and skipping
      saves a host-device sync per step;
    * vocabulary: ``student_vocab_size`` equals the teacher's (``teacher_vocab_size=``, or the batch's
      ``teacher_vocab_size`` entry that :func:`kdlib.make_loader` and :class:`kdlib.CacheDataset` add). With
      ``allow_padded_vocab=True`` a student vocabulary LARGER than the teacher's also passes: models often pad
      the embedding to a multiple of 64/128 (GPT-2: 50304 rows for 50257 tokens); the padded rows are never a
      label or a cached id, so they only take some of the student's probability mass (the KD tail). A smaller
      student vocabulary never passes;
    * top-k ids: every cached id below ``student_vocab_size``. When the teacher's vocabulary is known this
      follows from the size comparison, because the batch makers checked every id against the teacher's
      vocabulary on the CPU (:func:`check_topk_ids_in_vocab`); only when it is unknown are the ids scanned here
      (one device sync).

    Args:
        student_input_ids: [B, T] tokens the student is fed (any integer dtype, any device), or None when the
            student is fed ``teacher_batch["input_ids"]`` itself.
        teacher_batch: a cache batch with ``input_ids`` [B, T] (and ``topk_ids`` [B, T, K] for the id check).
        student_vocab_size: the student's output vocabulary (e.g. ``model.config.vocab_size``); None skips the
            vocabulary checks.
        teacher_vocab_size: the cache's vocabulary when the batch does not carry ``teacher_vocab_size``.
        allow_padded_vocab: accept a student vocabulary larger than the teacher's (see above). Default False.

    Raises:
        AlignmentError: on any mismatch, with what differs and how to fix it.
    """
    if "input_ids" not in teacher_batch:
        raise AlignmentError(
            f"the teacher batch has no 'input_ids' (keys: {sorted(teacher_batch)}); pass a batch from "
            "kdlib.make_loader / CacheDataset / cache.read(), which carry the tokens the teacher saw")
    teacher_ids = teacher_batch["input_ids"]
    if student_input_ids is not None and student_input_ids is not teacher_ids:
        _check_tokens(student_input_ids, teacher_ids)

    if student_vocab_size is None:
        return
    student_vocab_size = int(student_vocab_size)
    teacher_vocab = _teacher_vocab_size(teacher_batch, teacher_vocab_size)
    if teacher_vocab is not None:
        padded_ok = allow_padded_vocab and student_vocab_size > teacher_vocab
        if teacher_vocab != student_vocab_size and not padded_ok:
            if student_vocab_size > teacher_vocab:
                hint = (" If the student's embedding is only padded beyond the teacher's tokens (e.g. 50304 rows "
                        "for GPT-2's 50257), pass allow_padded_vocab=True.")
            else:
                hint = ""
            raise AlignmentError(
                f"the student's vocabulary has {student_vocab_size} entries but the cache's teacher had "
                f"{teacher_vocab}: top-k ids index different tokens (or none). Use a student with the teacher's "
                "tokenizer and vocab_size, or rebuild the cache with a teacher that shares the student's "
                f"tokenizer.{hint}")
        return  # every cached id < teacher_vocab <= student_vocab_size (checked on the CPU by the batch maker)
    topk_ids = teacher_batch.get("topk_ids")
    if topk_ids is not None and topk_ids.numel():
        # uint16 has no max() on every backend: compare in int32, exact for ids < 2**31.
        largest = int(topk_ids.to(torch.int32).max()) if topk_ids.dtype == torch.uint16 else int(topk_ids.max())
        if largest >= student_vocab_size:
            raise AlignmentError(
                f"the cache holds teacher top-k id {largest}, outside the student's vocabulary of "
                f"{student_vocab_size}: the teacher's vocabulary is larger; use a student with the teacher's "
                "tokenizer and vocab_size")


def _check_tokens(student_input_ids: torch.Tensor, teacher_ids: torch.Tensor) -> None:
    student = torch.as_tensor(student_input_ids)
    if tuple(student.shape) != tuple(teacher_ids.shape):
        raise AlignmentError(
            f"student input_ids have shape {tuple(student.shape)} but the cache batch has "
            f"{tuple(teacher_ids.shape)}: the student must train on the cached sequences unchanged (same "
            "batch, same sequence length; no truncation, packing or padding on top of the cache)")
    if student.is_floating_point() or student.dtype == torch.bool:
        raise AlignmentError(f"student input_ids must be integer token ids, got {student.dtype}")
    teacher = teacher_ids.to(device=student.device, non_blocking=True)
    # Compare in int64: the cache gives int32, the student usually holds int64.
    differs = student.to(torch.int64) != teacher.to(torch.int64)  # [B, T]
    if bool(differs.any()):  # the one host-device sync of a token check
        count = int(differs.sum())
        where = differs.nonzero()[0].tolist()
        first = f"(sequence {where[0]}, position {where[1]})" if len(where) == 2 else f"index {tuple(where)}"
        hint = _diagnose(student.to(torch.int64), teacher.to(torch.int64))
        raise AlignmentError(
            f"student tokens differ from the cache's tokens at {count} of {differs.numel()} positions; first "
            f"at {first}: student {int(student[tuple(where)])} vs cache {int(teacher[tuple(where)])}. {hint}"
            "Feed the student the batch's own input_ids (kdlib.make_loader yields them), or look the cache up "
            "by the same sequence indices your data loader uses (cache.lookup(indices)).")


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
