"""TRL: ``KDSFTTrainer``, TRL's ``SFTTrainer`` trained by sparse KD from a teacher-logit cache (or its URL).

Shape notation::

    B  sequences per batch   T  positions per sequence   V  student vocabulary   K  teacher top-k

``KDSFTTrainer`` is ``class KDSFTTrainer(KDLossMixin, SFTTrainer)``: the KD part is
:class:`kdlib.integrations.hf_trainer.KDLossMixin` (the same ``compute_loss`` as :class:`KDTrainer`: the student
is called on the cache row's own tokens without labels, then ``kdlib.kd_loss_from_batch`` computes KD + CE
from the cache's shifted labels, after the vocabulary check), everything else is TRL's and transformers': the
``SFTConfig`` (optimizer, schedule, accumulation, logging, PEFT through ``peft_config=``), the seeded sampler
over :class:`kdlib.CacheDataset`, checkpoints, and ``train(resume_from_checkpoint=...)``, which skips the
consumed batches of that sampler, so a resumed run trains on exactly the uninterrupted run's batches.

What it sets for you, because a cache is already tokenized:

* ``train_dataset``: ``kdlib.CacheDataset(cache)`` when ``cache=`` (a reader, a path or an ``http(s)://`` URL of
  ``kdcache serve``) is given without a dataset;
* ``data_collator``: ``torch.utils.data.default_collate`` (stacks the rows to a cache batch; TRL's
  language-modeling collator would pad and relabel them);
* ``args.dataset_kwargs["skip_prepare_dataset"] = True`` (TRL must not tokenize or pack the rows),
  ``args.packing = False``, ``args.remove_unused_columns = False`` (the teacher columns reach the loss), and
  the maximum sequence length (``max_seq_length`` in TRL < 0.12, ``max_length`` later) = the cache's.

Written against the surface that is stable across TRL releases: ``SFTTrainer(model=, args=SFTConfig(...),
train_dataset=, data_collator=, ...)`` with ``dataset_kwargs={"skip_prepare_dataset": True}`` and
``remove_unused_columns=False`` (what recent TRL documents for pre-processed datasets), and transformers'
``Trainer.compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None)``, which this class
replaces whole (recent SFTTrainers compute token-accuracy metrics there from labels the cache rows lack); the tokenizer is ``tokenizer=`` in TRL < 0.12 and
``processing_class=`` later: this class takes either name and passes it under the one the installed TRL has.
TRL 0.11 looks a tokenizer up by the model's name when none is given, so pass one for a model built from a
config.

**GKD.** ``GKDTrainer`` (``trl.GKDTrainer``; under ``trl.experimental`` in recent releases) with ``lmbda=0`` (no student-generated sequences) is the ONLINE form of this: a
live teacher, dense logits, ``generalized_jsd_loss(beta)`` at ``temperature``, no τ². The offline equivalent
from a cache is ``KDSFTTrainer(kd_kwargs={"divergence": "jsd", "beta": beta, "temperature": τ,
"tau_squared": False})`` (``beta=0``: forward KL), computed on the teacher's cached top-k with the exact tail
(docs/LOSSES.md, "Reproducing a peer's setting"). On-policy GKD (``lmbda > 0``) needs the teacher on sequences
the student generates, which no offline cache can hold.

``trl`` is an optional extra (``pip install 'kdcache[trl]'``); ``kdlib.integrations`` imports this module only
when ``KDSFTTrainer`` is asked for.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from trl import SFTTrainer

from kdlib.integrations.hf_trainer import KDLossMixin

__all__ = ["KDSFTTrainer"]

# TRL < 0.12 takes the tokenizer as `tokenizer=`, later releases as `processing_class=`.
_SFT_PARAMETERS = frozenset(inspect.signature(SFTTrainer.__init__).parameters)


def _prepare_sft_config(args: Any, seq_len: int | None) -> None:
    """The ``SFTConfig`` fields a pre-tokenized cache needs (every TRL release that has them)."""
    if args is None:
        return
    kwargs = dict(getattr(args, "dataset_kwargs", None) or {})
    kwargs["skip_prepare_dataset"] = True
    args.dataset_kwargs = kwargs
    if getattr(args, "packing", False):
        raise ValueError("KDSFTTrainer: SFTConfig(packing=True) would concatenate cache rows into new sequences "
                         "the teacher never saw, so its cached targets would not match them; use packing=False "
                         "(kdcache build already cuts documents, concatenated into one token stream, into its "
                         "sequences)")
    for name in ("max_seq_length", "max_length"):
        if hasattr(args, name) and seq_len is not None:
            setattr(args, name, int(seq_len))
    args.remove_unused_columns = False


class KDSFTTrainer(KDLossMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` whose loss is sparse KD (+ CE) against a kdcache cache (module docstring).

    Args:
        **kwargs: as for ``trl.SFTTrainer`` (``model=``, ``args=SFTConfig(...)``, ``tokenizer=`` or
            ``processing_class=`` (either name, on any TRL release), ``peft_config=``, ``callbacks=``...).
        cache: a cache reader, path or URL; without ``train_dataset`` the trainer trains on
            ``kdlib.CacheDataset(cache)``.
        kd_kwargs: ``kdlib.kd_loss`` options, e.g. ``{"ce_weight": 0.1, "temperature": 2.0}``.
        check_alignment: the per-step check of :class:`kdlib.integrations.hf_trainer.KDLossMixin` (default on).
        allow_padded_vocab: accept a padded student vocabulary, or a smaller one holding every cached id.
        index_key: for your own rows carrying cache sequence indices (with ``cache=`` and ``train_dataset=``).

    Raises:
        ValueError: ``SFTConfig(packing=True)``, or neither ``cache=`` nor a ``train_dataset``.

    Example::

        from trl import SFTConfig
        trainer = KDSFTTrainer(model=student, args=SFTConfig(output_dir="run", max_steps=100),
                               processing_class=tokenizer, cache="http://teacher-cache:8000/caches/web",
                               kd_kwargs={"ce_weight": 0.1, "temperature": 2.0})
        trainer.train()
    """

    def __init__(self, *args: Any, cache: Any = None, **kwargs: Any) -> None:
        if args:
            raise TypeError("KDSFTTrainer takes keyword arguments only (model=, args=, cache=, ...): SFTTrainer's "
                            "positional order differs between TRL releases")
        if cache is None and kwargs.get("train_dataset") is None:
            raise ValueError("KDSFTTrainer needs the teacher's targets: pass cache= (a kdcache directory, URL or "
                             "reader) or train_dataset=kdlib.CacheDataset(cache)")
        if cache is not None and not hasattr(cache, "lookup"):
            from kdlib.data.open import as_cache

            cache = as_cache(cache, None)
        for given, other in (("tokenizer", "processing_class"), ("processing_class", "tokenizer")):
            if given in kwargs and given not in _SFT_PARAMETERS and other in _SFT_PARAMETERS:
                kwargs[other] = kwargs.pop(given)  # either name works on every TRL release
        if kwargs.get("args") is None:
            from trl import SFTConfig

            kwargs["args"] = SFTConfig(output_dir="tmp_trainer")  # SFTTrainer's own default, made here to adjust
        dataset = kwargs.get("train_dataset")
        seq_len = getattr(cache, "seq_len", None) or getattr(getattr(dataset, "cache", None), "seq_len", None)
        _prepare_sft_config(kwargs.get("args"), seq_len)
        kwargs.setdefault("data_collator", torch.utils.data.default_collate)
        super().__init__(cache=cache, **kwargs)
