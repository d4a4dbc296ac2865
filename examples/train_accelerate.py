"""The plain distillation loop under 🤗 accelerate: each process reads its own disjoint part of the cache.

Usage::

    accelerate launch --multi_gpu --num_processes 8 examples/train_accelerate.py --cache my_cache   # 8 GPUs
    # CPU only: 2 processes over gloo (accelerate's --cpu flag starts a single local process; --multi_gpu
    # starts torch.distributed.run, and without CUDA the example asks for a CPU/gloo Accelerator)
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --steps 10
    torchrun --nproc_per_node 2 examples/train_accelerate.py --steps 10                            # same

The cache loader partitions by itself (rank and world size from the Accelerator), so it is NOT passed to
``accelerator.prepare`` (that would shard it a second time); only the model and optimizer are. Every rank
takes the same number of steps per epoch (see ``kdlib.loader`` on remainders), so DDP's all-reduce never
waits for a rank that ran out of data. ``--seen-dir`` writes each rank's cache indices, losses and a sha256 of
its final parameters to ``rank{r}.json`` (DDP keeps the replicas identical, so the hashes agree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from _example_utils import example_cache, tiny_gpt_student  # noqa: I001

import kdlib
from kdlib.integrations import distill_loss
from kdlib.loader import move_batch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache directory or URL (default: a small synthetic one in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kdcache_examples")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: epochs)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--drop-last", action="store_true", help="skip an epoch's remainder instead of splitting it")
    parser.add_argument("--seen-dir", type=Path, help="write this rank's trained-on cache indices here")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo between CPU processes
    if accelerator.is_main_process:
        path = example_cache(args.cache, args.workdir)
    accelerator.wait_for_everyone()  # rank 0 writes the example cache once
    path = example_cache(args.cache, args.workdir)
    cache = kdlib.open_cache(path)
    loader = kdlib.make_loader(cache, args.batch_size, seed=0, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, drop_last=args.drop_last)
    model = tiny_gpt_student(cache.vocab_size, cache.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)

    seen: list[int] = []
    losses: list[float] = []
    model.train()
    for _ in range(args.epochs):
        for batch in loader:
            batch = move_batch(batch, accelerator.device)
            logits = model(input_ids=batch["input_ids"]).logits  # [B, T, V]
            loss = distill_loss(logits, batch, ce_weight=args.ce_weight)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            seen += batch["sample_indices"].tolist()
            if args.steps is not None and len(losses) >= args.steps:
                break

    if args.seen_dir:
        args.seen_dir.mkdir(parents=True, exist_ok=True)
        (args.seen_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(
            {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "seen": seen,
             "steps": len(losses), "losses": losses, "loader_state": loader.state_dict(),
             "param_sha256": parameters_sha256(accelerator.unwrap_model(model))}))
    accelerator.print(f"rank 0: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"steps": len(losses), "losses": losses, "seen": seen}


def parameters_sha256(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes, in name order (equal on every rank iff the replicas are in sync)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
