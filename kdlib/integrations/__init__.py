"""Training-framework glue: the checked KD loss for plain loops, and ``KDTrainer`` for transformers.

Shape notation::

    B  sequences per batch   T  positions per sequence   V  student vocabulary   K  teacher top-k

* :func:`distill_loss` — ``check_alignment`` + ``kd_loss_from_batch`` in one call (plain PyTorch / accelerate).
* :class:`KDTrainer` (``kdlib.integrations.hf_trainer``, imported lazily: transformers is an optional extra).
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import torch

from kdlib.alignment import check_alignment

__all__ = ["distill_loss", "TEACHER_KEYS", "split_teacher_batch", "KDTrainer"]

# Batch entries that belong to the teacher side (never passed to the student model).
TEACHER_KEYS = ("topk_ids", "topk_logprobs", "lse", "labels", "sample_indices", "teacher_vocab_size")


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


def __getattr__(name: str) -> Any:
    if name == "KDTrainer":
        return importlib.import_module("kdlib.integrations.hf_trainer").KDTrainer
    raise AttributeError(f"module 'kdlib.integrations' has no attribute {name!r}")
