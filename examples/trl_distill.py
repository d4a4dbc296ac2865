"""Distill a small GPT student with TRL: ``KDSFTTrainer`` (TRL's ``SFTTrainer`` + the kdcache KD loss).

Usage::

    python examples/trl_distill.py --cache my_cache --tokenizer my_tokenizer_dir --steps 200 --out runs/trl
    python examples/trl_distill.py --cache http://127.0.0.1:8000/caches/web --steps 50      # a kdcache serve URL
    python examples/trl_distill.py --steps 10                          # on a small synthetic cache
    python examples/trl_distill.py --steps 6 --save-steps 3            # checkpoints at steps 3 and 6
    python examples/trl_distill.py --steps 6 --resume runs/trl/checkpoint-3   # continue exactly

The cache is already tokenized, so TRL does not prepare, pack or collate the rows itself: ``KDSFTTrainer``
trains on ``kdlib.CacheDataset(cache)`` with ``default_collate`` and computes KD (+ CE) from the cached top-k
(the student runs on each row's own tokens; its vocabulary is checked against the cache's every step). TRL
0.11 looks a tokenizer up by the model's name when it is given none: ``--tokenizer`` loads one from a local
directory, else a word-level placeholder of the cache's vocabulary size is built here (nothing downloaded).

Prints (and returns) one JSON line: the final global step, the logged losses, and the cache sequences of every
step's batch this run trained on (``sequences``; the resume test compares them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _example_utils import example_cache, tiny_gpt_student  # noqa: I001

from trl import SFTConfig

import kdlib
from kdlib.integrations.trl import KDSFTTrainer


class RecordingKDSFTTrainer(KDSFTTrainer):
    """``KDSFTTrainer`` that also records the cache sequences of every batch it computes a loss on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sequences: list[list[int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.sequences.append(inputs["sample_indices"].tolist())
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def placeholder_tokenizer(vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` tokens ``t0 ... t{V-1}`` (SFTTrainer wants one; the cache's rows
    are tokens already)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", pad_token="t0", eos_token="t0")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache directory or URL (default: a small synthetic one in --workdir)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a local tokenizer directory (optional)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kdcache_examples")
    parser.add_argument("--out", type=Path, default=None, help="output_dir (default: --workdir/trl_run)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint directory of this script")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    args = parser.parse_args(argv)

    cache = kdlib.open_cache(example_cache(args.cache, args.workdir))
    model = tiny_gpt_student(cache.vocab_size, cache.seq_len, layers=args.layers, d_model=args.d_model)
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = placeholder_tokenizer(cache.vocab_size)
    config = SFTConfig(
        output_dir=str(args.out or args.workdir / "trl_run"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = RecordingKDSFTTrainer(model=model, args=config, cache=cache, processing_class=tokenizer,
                                    kd_kwargs={"ce_weight": args.ce_weight, "temperature": args.temperature})
    output = trainer.train(resume_from_checkpoint=str(args.resume) if args.resume else None)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"steps": trainer.state.global_step, "train_loss": output.training_loss, "logged_losses": losses,
              "sequences": trainer.sequences}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
