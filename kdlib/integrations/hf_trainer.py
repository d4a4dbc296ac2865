"""``KDTrainer``: a transformers ``Trainer`` whose loss is sparse KD (+ CE) against a teacher-logit cache.

Shape notation::

    B  sequences per batch   T  positions per sequence   V  student vocabulary   K  teacher top-k

Two ways to feed it:

1. ``train_dataset=kdlib.CacheDataset(cache)``: every row carries the tokens and the teacher's top-k; the
   Trainer's own sampler, sharding across processes and checkpoint resume apply unchanged.
2. Your own dataset whose rows carry ``input_ids`` [T] and the cache's sequence index (``sample_indices``, or
   ``index_key=``); pass ``cache=``. The trainer looks the teacher targets up per batch (``cache.lookup``) and
   checks that your tokens are the cache's tokens.

Either way the student is called WITHOUT labels (no second CE inside the model); its logits [B, T, V] at
position t pair with the cache's position t (both predict token t+1), and ``kd_loss`` computes KD + CE from
the cache's shifted labels. ``check_alignment`` runs on every step unless disabled; it costs no host-device sync
when the rows carry the teacher data (the student's tokens are the row's own; the vocabulary sizes are Python
ints; top-k ids were range-checked on the CPU by ``CacheDataset``), and one comparison (one sync) when your own
tokens are checked against the looked-up cache rows.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from transformers import Trainer

from kdlib.alignment import check_alignment, check_topk_ids_in_vocab, shift_labels
from kdlib.integrations import TEACHER_KEYS, split_teacher_batch

__all__ = ["KDTrainer"]

logger = logging.getLogger(__name__)


class KDTrainer(Trainer):
    """``Trainer`` with ``compute_loss`` = ``kdlib.kd_loss`` on the cache batch.

    Args:
        *args, **kwargs: as for ``transformers.Trainer``.
        kd_kwargs: ``kdlib.kd_loss`` options, e.g. ``{"ce_weight": 0.1, "temperature": 2.0}``.
        cache: a cache reader, needed only when the dataset rows carry sequence indices instead of teacher data.
        index_key: the batch entry holding cache sequence indices (with ``cache=``).
        check_alignment: compare the student's tokens and vocabulary with the cache's every step.
        allow_padded_vocab: accept a student vocabulary larger than the teacher's (an embedding padded to a
            multiple of 64, e.g. 50304 for GPT-2's 50257); see ``kdlib.check_alignment``.

    ``args.remove_unused_columns`` is forced to False: the teacher columns are not arguments of the model's
    ``forward`` and the Trainer would otherwise drop them.
    """

    def __init__(self, *args: Any, kd_kwargs: Mapping[str, Any] | None = None, cache: Any = None,
                 index_key: str = "sample_indices", check_alignment: bool = True, allow_padded_vocab: bool = False,
                 **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and getattr(training_args, "remove_unused_columns", False):
            logger.info("KDTrainer: setting remove_unused_columns=False so the teacher columns reach the loss")
            training_args.remove_unused_columns = False
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
        # The Trainer moves every entry to the device; teacher_vocab_size stays on the CPU so the alignment check
        # reads it without waiting for the device.
        inputs = dict(inputs)
        vocab = inputs.pop("teacher_vocab_size", None)
        inputs = super()._prepare_inputs(inputs)
        if vocab is not None:
            inputs["teacher_vocab_size"] = vocab
        return inputs

    def _teacher_batch(self, inputs: Mapping[str, Any], device: torch.device) -> tuple[dict, dict, bool]:
        """(student inputs, teacher batch, whether the student's tokens must be compared with the teacher's)."""
        student_inputs, teacher = split_teacher_batch(inputs)
        looked_up_by_index = "topk_ids" not in teacher
        if looked_up_by_index:
            if self.kd_cache is None or self.index_key not in inputs:
                raise ValueError(
                    f"KDTrainer: the batch has neither teacher top-k ('topk_ids') nor cache sequence indices "
                    f"({self.index_key!r}); keys: {sorted(inputs)}. Train on kdlib.CacheDataset(cache), or give "
                    f"rows a {self.index_key!r} entry and pass KDTrainer(..., cache=cache)")
            looked_up = self.kd_cache.lookup(torch.as_tensor(inputs[self.index_key]).cpu())
            if "topk_ids" in looked_up:
                check_topk_ids_in_vocab(looked_up["topk_ids"], self.kd_cache.vocab_size)  # on the CPU
            teacher = {k: v.to(device, non_blocking=True) for k, v in looked_up.items()}
            teacher["labels"] = shift_labels(teacher["input_ids"])
            teacher["teacher_vocab_size"] = torch.tensor(self.kd_cache.vocab_size)
            student_inputs.pop(self.index_key, None)
        for key in TEACHER_KEYS:
            student_inputs.pop(key, None)
        if "input_ids" not in student_inputs:
            raise ValueError(f"KDTrainer: the batch has no 'input_ids' for the student (keys: {sorted(inputs)})")
        student_inputs["input_ids"] = student_inputs["input_ids"].to(torch.int64)
        # Rows that carry the teacher data carry the tokens the teacher saw: the student gets exactly those.
        return student_inputs, teacher, looked_up_by_index

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        from kdlib.losses import kd_loss_from_batch

        device = inputs["input_ids"].device
        student_inputs, teacher, compare_tokens = self._teacher_batch(inputs, device)
        outputs = model(**student_inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]  # [B, T, V]
        if self.check_alignment:
            check_alignment(student_inputs["input_ids"] if compare_tokens else None, teacher,
                            student_vocab_size=logits.shape[-1], allow_padded_vocab=self.allow_padded_vocab)
        # The vocabulary was checked above (or deliberately not): the loss must not refuse what was allowed.
        loss = kd_loss_from_batch(logits, teacher, allow_padded_vocab=self.allow_padded_vocab or not self.check_alignment,
                                  **self.kd_kwargs)
        return (loss, outputs) if return_outputs else loss
