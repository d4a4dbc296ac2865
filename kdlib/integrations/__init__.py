"""Training-framework glue: the checked KD loss for plain loops, and ``KDTrainer`` for transformers.

Shape notation::

    B  sequences per batch   T  positions per sequence   V  student vocabulary   K  teacher top-k

In ``kdlib.integrations.step`` (re-exported here):

* :func:`kd_step_loss` — runs the student on the batch's OWN ``input_ids`` and returns (KD + CE loss, logits):
  the student cannot see other tokens than the teacher did, so no shift can happen (plain PyTorch / accelerate).
* :func:`distill_loss` — ``check_alignment`` + ``kd_loss_from_batch`` for logits you computed yourself. By
  default it checks the VOCABULARY only (sizes, and thereby the top-k ids); your tokens are compared with the
  cache's only when you pass ``student_input_ids=``.

And, imported lazily (their frameworks are optional extras): :class:`KDTrainer` and :class:`KDLossMixin`
(``kdlib.integrations.hf_trainer``, transformers), :class:`KDSFTTrainer` (``kdlib.integrations.trl``, TRL's
``SFTTrainer``), :class:`CacheDataModule` and :class:`DistillModule` (``kdlib.integrations.lightning``, PyTorch
Lightning).
"""

from __future__ import annotations

import importlib
from typing import Any

from kdlib.integrations.step import TEACHER_KEYS, distill_loss, kd_step_loss, logits_of, split_teacher_batch

__all__ = ["kd_step_loss", "distill_loss", "logits_of", "TEACHER_KEYS", "split_teacher_batch", "KDTrainer",
           "KDLossMixin", "KDSFTTrainer", "CacheDataModule", "DistillModule"]

_LAZY = {"KDTrainer": "hf_trainer", "KDLossMixin": "hf_trainer", "KDSFTTrainer": "trl",
         "CacheDataModule": "lightning", "DistillModule": "lightning"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"kdlib.integrations.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kdlib.integrations' has no attribute {name!r}")
