"""The cache's alignment convention on the training side: labels from tokens, and the student/teacher check.

Shape notation::

    B  sequences in a batch      T  positions per sequence
    K  top-k entries per position  V  vocabulary size

Convention (``cache_server.format.ALIGNMENT_CONVENTION``): position t of a cached sequence holds the teacher's
distribution over token t+1 given tokens[0..t]. A causal-LM student's logits at position t predict the same
token, so ``student_logits[:, t]`` pairs with ``topk_ids[:, t]`` directly, and the label of position t is
``input_ids[:, t+1]``; the last position has no label inside the sequence (``ignore_index``).

Offline KD fails silently when the student's batch is not the batch the teacher saw (another shuffle, an
off-by-one shift, another tokenizer): the loss still decreases, towards the wrong targets.

What is checked, exactly:

* by default (:func:`check_alignment` without ``student_input_ids``, and likewise ``distill_loss``,
  ``kd_loss_from_batch`` and ``KDTrainer`` on rows that carry the teacher data) ONLY THE VOCABULARY: the
  student's output size against the cache's (:func:`kdlib.batch.check_student_vocab`, Python ints), and the
  cached top-k ids below the student's vocabulary (implied by the sizes, because every id was checked against
  the teacher's vocabulary on the CPU where the batch was made, :func:`check_topk_ids_in_vocab`). The tokens
  are NOT compared: nothing here can tell that the student was fed the batch's own ``input_ids``;
* the tokens are compared only when ``student_input_ids=`` is given (the tokens the student was really fed;
  one comparison and one host-device sync per step). ``KDTrainer`` does this itself when it looks the teacher
  rows up by index for a dataset of your own.

The way to rule a shift out by construction is to let kdlib feed the student: :func:`kdlib.kd_step_loss`
calls ``model(batch["input_ids"])`` itself and takes the labels from the same batch.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .batch import (DEFAULT_IGNORE_INDEX, AlignmentError, check_batch_vocab, check_sample_ids_in_vocab,
                    check_topk_ids_in_vocab, shift_labels, teacher_vocab_size_of)

__all__ = ["AlignmentError", "check_alignment", "check_topk_ids_in_vocab", "shift_labels", "DEFAULT_IGNORE_INDEX"]


def check_alignment(
    student_input_ids: torch.Tensor | None,
    teacher_batch: Mapping[str, torch.Tensor],
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    allow_padded_vocab: bool = False,
) -> None:
    """Raise :class:`AlignmentError` if the student's vocabulary, or its tokens when given, differ from the cache's.

    Checks, in this order:

    * shapes and tokens, ONLY when ``student_input_ids`` is given and is not the batch's own ``input_ids``
      tensor: the student's [B, T] equals the cache batch's ``input_ids`` [B, T], and every position is equal
      (the error says how many differ, the first (row, position), and whether the student looks shifted by
      one position, the most common mistake). One comparison and one host-device sync. Without
      ``student_input_ids`` the tokens are not checked at all;
    * vocabulary, when ``student_vocab_size`` is given: it equals the teacher's (``teacher_vocab_size=``, or
      the batch's ``teacher_vocab_size`` entry that :func:`kdlib.make_loader` and :class:`kdlib.CacheDataset`
      add), per :func:`kdlib.batch.check_batch_vocab`. With ``allow_padded_vocab=True`` a student vocabulary
      LARGER than the teacher's also passes (an embedding padded to a multiple of 64/128: GPT-2 has 50304 rows
      for 50257 tokens), and a SMALLER one passes when every id of the batch is below it (a teacher embedding
      padded beyond the student's, Qwen2.5 style: 152064 vs 151936; the batch's ``largest_id``, made on the
      CPU, settles it; otherwise the error names the first offending id, its place and value);
    * top-k ids: every cached id below ``student_vocab_size``. When the teacher's vocabulary is known this
      follows from the size comparison, because the batch makers checked every id against the teacher's
      vocabulary on the CPU (:func:`check_topk_ids_in_vocab`); only when it is unknown are the ids scanned here
      (one device sync).

    Args:
        student_input_ids: [B, T] tokens the student was fed (any integer dtype, any device), compared with
            the cache's; None (the student was fed ``teacher_batch["input_ids"]``, which is then trusted, not
            checked) compares no tokens.
        teacher_batch: a cache batch with ``input_ids`` [B, T] (and ``topk_ids`` [B, T, K] for the id check).
        student_vocab_size: the student's output vocabulary (e.g. ``model.config.vocab_size``); None skips the
            vocabulary checks.
        teacher_vocab_size: the cache's vocabulary when the batch does not carry ``teacher_vocab_size``.
        allow_padded_vocab: accept a student vocabulary larger than the teacher's, or smaller than it when
            every id of the batch fits (see above). Default False.

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
    teacher_vocab = teacher_vocab_size_of(teacher_batch, teacher_vocab_size)
    if teacher_vocab is not None:
        # Every cached id < teacher_vocab (checked on the CPU by the batch maker), so the sizes settle the ids;
        # for a smaller student the batch's largest_id (made there too) does.
        check_batch_vocab(student_vocab_size, teacher_batch, teacher_vocab_size=teacher_vocab,
                          allow_padded_vocab=allow_padded_vocab)
        return
    topk_ids = teacher_batch.get("topk_ids")
    if topk_ids is not None:
        check_topk_ids_in_vocab(topk_ids, int(student_vocab_size), vocab_of="student")  # one device sync
    if teacher_batch.get("sample_ids") is not None:
        check_sample_ids_in_vocab(teacher_batch, int(student_vocab_size), vocab_of="student")  # one device sync


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
