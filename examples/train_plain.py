"""Distill a small GPT student from a teacher-logit cache with a plain PyTorch loop (resumable).

Usage::

    python examples/train_plain.py --cache my_cache --steps 200 --ce-weight 0.1 --checkpoint ckpt.pt
    python examples/train_plain.py --steps 20                        # on a small synthetic cache
    python examples/train_plain.py --checkpoint ckpt.pt --resume     # continue exactly where it stopped

The loader yields compact CPU batches (uint16/int32 ids, fp16 log-probs); ``move_batch`` copies them to the
device (asynchronously from pinned memory on CUDA) and ``distill_loss`` checks alignment then computes
KD + CE. The checkpoint holds the loader's state (seed, epoch, global sample cursor), so a resumed run sees
no sample twice, even with another --num-workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from _example_utils import example_cache, tiny_gpt_student  # noqa: I001  (adds the repo to sys.path)

import kdlib
from kdlib.integrations import distill_loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache directory or URL (default: a small synthetic one in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kdcache_examples")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps in this run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="save model/optimizer/loader state here at the end")
    parser.add_argument("--resume", action="store_true", help="load --checkpoint first")
    parser.add_argument("--seen-file", type=Path, help="append the cache indices trained on (JSON lines)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = kdlib.open_cache(example_cache(args.cache, args.workdir))
    loader = kdlib.make_loader(cache, args.batch_size, seed=args.seed, num_workers=args.num_workers,
                               device=device)
    model = tiny_gpt_student(cache.vocab_size, cache.seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.resume:
        state = torch.load(args.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        print(f"resumed at epoch {loader.epoch}, sample {loader.cursor} of {cache.num_sequences}", file=sys.stderr)

    losses: list[float] = []
    seen: list[int] = []
    model.train()
    while len(losses) < args.steps:
        for batch in loader:  # one epoch (the rest of it after a resume); the next `for` starts the next epoch
            logits = model(input_ids=batch["input_ids"]).logits  # [B, T, V]
            loss = distill_loss(logits, batch, ce_weight=args.ce_weight, temperature=args.temperature)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            seen += batch["sample_indices"].tolist()
            if len(losses) % 10 == 0:
                print(f"step {len(losses)}: loss {losses[-1]:.4f}", file=sys.stderr)
            if len(losses) >= args.steps:
                break

    if args.checkpoint:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "loader": loader.state_dict()}, args.checkpoint)
        print(f"saved {args.checkpoint} (loader at epoch {loader.epoch}, sample {loader.cursor})", file=sys.stderr)
    if args.seen_file:
        with open(args.seen_file, "a") as fh:
            fh.write(json.dumps(seen) + "\n")
    result = {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
              "loader_state": loader.state_dict()}
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    return result


if __name__ == "__main__":
    main()
