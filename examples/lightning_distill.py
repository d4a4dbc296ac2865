"""Distill a small GPT student with PyTorch Lightning: ``CacheDataModule`` + ``DistillModule``.

Usage::

    python examples/lightning_distill.py --cache my_cache --steps 200 --ce-weight 0.1 --out runs/pl
    python examples/lightning_distill.py --steps 10                          # on a small synthetic cache
    python examples/lightning_distill.py --steps 10 --ckpt-every 5           # checkpoints at steps 5, 10
    python examples/lightning_distill.py --steps 20 --resume runs/pl/ckpt/step=5.ckpt   # continue exactly

The DataModule's state (the cache loader's exact position) is part of every Lightning checkpoint, so
``--resume`` trains on exactly the batches the uninterrupted run would have seen after that step (mid-epoch
too), with the optimizer state restored by Lightning. ``training_step`` is ``kdlib.kd_step_loss``: the student
runs on the batch's own tokens and the fused KD (+ CE) loss checks the vocabulary.

Prints (and returns) one JSON line: the final global step, the logged losses, and the cache sequences of every
training batch this run saw (``sequences``; the resume test compares them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _example_utils import example_cache, tiny_gpt_student  # noqa: I001

import lightning.pytorch as pl

import kdlib
from kdlib.integrations.lightning import CacheDataModule, DistillModule


class _Record(pl.Callback):
    """The cache sequences of every training batch, and the loss of every step."""

    def __init__(self) -> None:
        self.sequences: list[list[int]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sequences.append(batch["sample_indices"].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache directory or URL (default: a small synthetic one in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kdcache_examples")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: --workdir/pl_run)")
    parser.add_argument("--steps", type=int, default=10, help="total optimizer steps (a resumed run included)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the cache loader")
    parser.add_argument("--ckpt-every", type=int, default=0, help="save a checkpoint every N steps (0: none)")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint of this script to continue from")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    args = parser.parse_args(argv)

    out = args.out or args.workdir / "pl_run"
    cache = kdlib.open_cache(example_cache(args.cache, args.workdir))
    student = tiny_gpt_student(cache.vocab_size, cache.seq_len, layers=args.layers, d_model=args.d_model)
    module = DistillModule(student, lr=args.lr,
                           loss_kwargs={"ce_weight": args.ce_weight, "temperature": args.temperature})
    data = CacheDataModule(cache, args.batch_size, seed=args.seed)
    record = _Record()
    callbacks: list[pl.Callback] = [record]
    if args.ckpt_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", save_top_k=-1,
                                                      every_n_train_steps=args.ckpt_every))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="gpu" if torch.cuda.is_available() else "cpu",
                         devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=bool(args.ckpt_every), default_root_dir=str(out),
                         num_sanity_val_steps=0, deterministic=True, callbacks=callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=str(args.resume) if args.resume else None)
    checkpoints = sorted(str(p) for p in (out / "ckpt").glob("*.ckpt")) if args.ckpt_every else []
    result = {"steps": trainer.global_step, "losses": record.losses, "sequences": record.sequences,
              "checkpoints": checkpoints}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
