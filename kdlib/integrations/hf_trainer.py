"""``KDTrainer``: a transformers ``Trainer`` whose loss is sparse KD (+ CE) against a teacher-logit cache.

Shape notation::

    B  sequences per batch   T  positions per sequence   V  student vocabulary   K  teacher top-k

Two ways to feed it:

1. ``train_dataset=kdlib.CacheDataset(cache)``, or just ``cache=`` (a reader, path or URL) without a
   ``train_dataset``: every row carries the tokens and the teacher's top-k; the Trainer's own sampler, sharding
   across processes and checkpoint resume (which skips the consumed batches of the seeded sampler, so it is
   exact) apply unchanged.
2. Your own dataset whose rows carry ``input_ids`` [T] and the cache's sequence index (``sample_indices``, or
   ``index_key=``); pass ``cache=``. The trainer looks the teacher targets up per batch (``cache.lookup``) and
   checks that your tokens are the cache's tokens.

Either way the student is called WITHOUT labels (no second CE inside the model); its logits [B, T, V] at
position t pair with the cache's position t (both predict token t+1), and ``kd_loss`` computes KD + CE from
the cache's shifted labels.

:class:`KDLossMixin` is the KD part alone, for other ``Trainer`` subclasses (``kdlib.integrations.trl`` puts it
on TRL's ``SFTTrainer``).

What ``check_alignment=True`` (the default) checks every step:

1. rows that carry the teacher data: the VOCABULARY only (the student's output size against the cache's, and
   thereby the top-k ids, which ``CacheDataset`` range-checked on the CPU). The student is fed the row's own
   ``input_ids``, so there are no other tokens to compare; no host-device sync;
2. your own rows with ``cache=``: the vocabulary, and your tokens against the looked-up cache rows (one
   comparison, one sync), which catches a shifted or reordered dataset.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from transformers import Trainer

from kdlib.alignment import check_alignment
from kdlib.batch import KEEP_ON_CPU, move_batch, read_batch, student_input_ids
from kdlib.integrations.step import TEACHER_KEYS, logits_of, split_teacher_batch

__all__ = ["KDTrainer", "KDLossMixin"]

logger = logging.getLogger(__name__)


class KDLossMixin:
    """The KD part of :class:`KDTrainer`, for any ``transformers.Trainer`` subclass (TRL's ``SFTTrainer``...).

    Put it first among the bases (``class MyTrainer(KDLossMixin, SomeTrainer)``): its ``compute_loss`` and
    ``_prepare_inputs`` take over, every other part of the trainer (sampler, accumulation, checkpoints, resume)
    stays the base's.

    Args:
        *args, **kwargs: as for the base trainer.
        kd_kwargs: ``kdlib.kd_loss`` options, e.g. ``{"ce_weight": 0.1, "temperature": 2.0}``.
        cache: a cache reader, path or URL. Without ``train_dataset`` the trainer trains on
            ``kdlib.CacheDataset(cache)``; with a dataset whose rows carry sequence indices instead of teacher
            data, the teacher rows are looked up in it.
        index_key: the batch entry holding cache sequence indices (with ``cache=``).
        check_alignment: check every step (module docstring): the vocabulary always, the tokens only for rows
            looked up by index.
        allow_padded_vocab: accept a student vocabulary larger than the teacher's (an embedding padded to a
            multiple of 64, e.g. 50304 for GPT-2's 50257), or smaller when every id of the batch is below it (a
            teacher embedding padded beyond the student's); see ``kdlib.check_alignment``.

    ``args.remove_unused_columns`` is forced to False: the teacher columns are not arguments of the model's
    ``forward`` and the Trainer would otherwise drop them.
    """

    def __init__(self, *args: Any, kd_kwargs: Mapping[str, Any] | None = None, cache: Any = None,
                 index_key: str = "sample_indices", check_alignment: bool = True, allow_padded_vocab: bool = False,
                 **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and getattr(training_args, "remove_unused_columns", False):
            logger.info("%s: setting remove_unused_columns=False so the teacher columns reach the loss",
                        type(self).__name__)
            training_args.remove_unused_columns = False
        if cache is not None and not hasattr(cache, "lookup"):
            from kdlib.data.open import as_cache

            cache = as_cache(cache, None)  # a path or URL
        if cache is not None and kwargs.get("train_dataset") is None and len(args) < 4:
            from kdlib.dataset import CacheDataset

            kwargs["train_dataset"] = CacheDataset(cache)
        super().__init__(*args, **kwargs)
        self.kd_kwargs = dict(kd_kwargs or {})
        self.kd_cache = cache
        self.index_key = index_key
        self.check_alignment = bool(check_alignment)
        self.allow_padded_vocab = bool(allow_padded_vocab)
        # kd_loss returns a per-micro-batch mean: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = False

    def _prepare_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        # The Trainer moves every entry to the device; the bookkeeping (teacher_vocab_size, largest_id, ...) stays
        # on the CPU, as in kdlib.batch.move_batch, so the alignment check reads it without waiting for the device.
        inputs = dict(inputs)
        on_cpu = {key: inputs.pop(key) for key in KEEP_ON_CPU if key in inputs}
        inputs = super()._prepare_inputs(inputs)
        inputs.update(on_cpu)
        return inputs

    def _teacher_batch(self, inputs: Mapping[str, Any], device: torch.device) -> tuple[dict, dict, bool]:
        """(student inputs, teacher batch, whether the student's tokens must be compared with the teacher's)."""
        student_inputs, teacher = split_teacher_batch(inputs)
        looked_up_by_index = "topk_ids" not in teacher and "sample_ids" not in teacher  # no teacher targets yet
        if looked_up_by_index:
            if self.kd_cache is None or self.index_key not in inputs:
                raise ValueError(
                    f"{type(self).__name__}: the batch has neither teacher targets ('topk_ids' / 'sample_ids') nor cache sequence indices "
                    f"({self.index_key!r}); keys: {sorted(inputs)}. Train on kdlib.CacheDataset(cache), or give "
                    f"rows a {self.index_key!r} entry and pass KDTrainer(..., cache=cache)")
            indices = torch.as_tensor(inputs[self.index_key]).cpu().numpy()
            # The same batch assembly as the loader's (top-k ids range-checked here, on the CPU; shifted labels).
            teacher = move_batch(read_batch(self.kd_cache, indices), device)
            student_inputs.pop(self.index_key, None)
        for key in TEACHER_KEYS:
            student_inputs.pop(key, None)
        student_inputs["input_ids"] = student_input_ids(student_inputs)  # int64, where the Trainer put it
        # Rows that carry the teacher data carry the tokens the teacher saw: the student gets exactly those.
        return student_inputs, teacher, looked_up_by_index

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        from kdlib.losses import kd_loss_from_batch

        device = inputs["input_ids"].device
        student_inputs, teacher, compare_tokens = self._teacher_batch(inputs, device)
        outputs = model(**student_inputs)
        logits = logits_of(outputs)  # [B, T, V]
        if self.check_alignment:
            check_alignment(student_inputs["input_ids"] if compare_tokens else None, teacher,
                            student_vocab_size=logits.shape[-1], allow_padded_vocab=self.allow_padded_vocab)
        # The vocabulary was checked above (or deliberately not): the loss must not refuse what was allowed.
        allow_padded = self.allow_padded_vocab or not self.check_alignment
        loss = kd_loss_from_batch(logits, teacher, allow_padded_vocab=allow_padded, **self.kd_kwargs)
        return (loss, outputs) if return_outputs else loss


class KDTrainer(KDLossMixin, Trainer):
    """``Trainer`` with ``compute_loss`` = ``kdlib.kd_loss`` on the cache batch (arguments: :class:`KDLossMixin`).

    Example::

        trainer = KDTrainer(model=student, args=TrainingArguments(...), cache="my_cache",
                            kd_kwargs={"ce_weight": 0.1})
        trainer.train()
    """
