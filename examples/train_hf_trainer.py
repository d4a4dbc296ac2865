"""Distill a small GPT student with the transformers ``Trainer``: ``KDTrainer`` + ``CacheDataset``.

Usage::

    python examples/train_hf_trainer.py --cache my_cache --steps 200 --ce-weight 0.1 --out runs/kd
    python examples/train_hf_trainer.py --steps 10                       # on a small synthetic cache
    accelerate launch --multi_gpu --num_processes 2 examples/train_hf_trainer.py --steps 10

Every dataset row carries the tokens and the teacher's top-k, so the Trainer's own sampler, multi-process
sharding, gradient accumulation and checkpoint resume apply unchanged. ``KDTrainer.compute_loss`` calls the
student without labels and computes ``kd_loss`` (+ CE with ``ce_weight``) from the cache's shifted labels,
after checking the student's vocabulary against the cache's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import TrainingArguments

from _example_utils import example_cache, tiny_gpt_student  # noqa: I001

import kdlib
from kdlib.integrations.hf_trainer import KDTrainer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache directory or URL (default: a small synthetic one in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kdcache_examples")
    parser.add_argument("--out", type=Path, default=None, help="Trainer output_dir (default: --workdir/hf_run)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)

    cache = kdlib.open_cache(example_cache(args.cache, args.workdir))
    model = tiny_gpt_student(cache.vocab_size, cache.seq_len)
    training_args = TrainingArguments(
        output_dir=str(args.out or args.workdir / "hf_run"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the teacher columns are not forward() arguments
        seed=0,
    )
    trainer = KDTrainer(
        model=model,
        args=training_args,
        train_dataset=kdlib.CacheDataset(cache),
        kd_kwargs={"ce_weight": args.ce_weight, "temperature": args.temperature},
    )
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"steps": trainer.state.global_step, "train_loss": output.training_loss, "logged_losses": losses}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
