"""Chain distillation (Born-Again networks, the qlabs 8-model run): each model learns from the one before.

1. Corpus: the Python standard library's own sources, a byte-level BPE trained on them (``examples/demo.py``).
2. Model 1: a small GPT-2 trained with cross-entropy on the training tokens.
3. For k = 2 .. N: ``kdcache build`` a top-k cache from model k-1 (saved as a transformers directory) over the
   same tokens, then train model k (its own init seed) from that cache with ``kdlib`` (fused CE + KD).
4. After each model: its held-out loss and the ensemble's (probability averaging over models 1..k,
   ``kdlib.ensemble.evaluate_ensemble``), printed as the qlabs table and written to
   ``benchmarks/results/chain_distill*.{json,csv,txt}`` with the command that made them.

With ``--independent`` the same number of models is also trained with CE only, all at once in one
``kdlib.ensemble.PackedEnsemble`` (a deep ensemble of seeds), for comparison at the same steps per model.

Every step whose output exists is skipped on a rerun (tokenizer, tokens, models, caches). Usage::

    python examples/chain_distill.py --out chain_out                      # 6 models
    python examples/chain_distill.py --out chain_out --models 4 --steps 150 --independent
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _example_utils import REPO, tiny_gpt_student  # noqa: E402
from demo import kdcache, pick_threads, stdlib_files, tokenize, train_tokenizer  # noqa: E402

import kdlib  # noqa: E402
from kdlib.batch import shift_labels  # noqa: E402
from kdlib.ensemble import PackedEnsemble, evaluate_ensemble, packed_step  # noqa: E402


def log(msg: str) -> None:
    print(f"[chain] {msg}", flush=True)


def make_model(args, vocab_size: int, seed: int):
    model = tiny_gpt_student(vocab_size, args.seq_len, layers=args.layers, d_model=args.d_model, seed=seed)
    model.config._attn_implementation = "eager"  # vmap (the --independent ensemble) has no SDPA rule on CPU
    return model


def token_batches(windows: torch.Tensor, batch_size: int, seed: int):
    """Endless batches of the [N, T] training windows (a fresh permutation per pass), as cache-like dicts."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(windows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            ids = windows[order[start:start + batch_size]]
            yield {"input_ids": ids, "labels": shift_labels(ids)}


def cache_batches(cache, batch_size: int, seed: int):
    """Endless batches of a cache (kdlib.make_loader, epoch after epoch)."""
    loader = kdlib.make_loader(cache, batch_size, shuffle=True, seed=seed, rank=0, world_size=1)
    while True:
        yield from loader


def train(model, batches, steps: int, lr: float, loss_of, name: str) -> float:
    """AdamW with cosine decay for ``steps`` steps; ``loss_of(model, batch)`` gives the loss. Returns the last."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)
    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    model.train()
    for step in range(1, steps + 1):
        loss = loss_of(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % max(1, steps // 4) == 0 or step == steps:
            rate = step / (time.perf_counter() - started)
            log(f"{name} step {step}/{steps}: loss {loss.item():.3f} ({rate:.1f} steps/s)")
    return float(loss.detach())


def ce_loss(model, batch):
    logits = model(input_ids=batch["input_ids"].long()).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def chain(args, out: Path, tokens_path: Path, windows: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> list:
    """Models 1..N of the chain, each evaluated alone and as the ensemble of all so far."""
    models, rows = [], []
    for k in range(1, args.models + 1):
        model_dir = out / f"model_{k}"
        model = make_model(args, vocab, seed=k)
        started = time.perf_counter()
        if (model_dir / "model.safetensors").exists():
            model = type(model).from_pretrained(model_dir)
        elif k == 1:
            train(model, token_batches(windows, args.batch_size, seed=k), args.steps, args.lr, ce_loss, "model 1 (CE)")
        else:
            cache_dir = out / f"cache_from_model_{k - 1}"
            kdcache("build", "--teacher", str(out / f"model_{k - 1}"), "--data", str(tokens_path), "--topk",
                    str(args.topk), "--seq-len", str(args.seq_len), "--out", str(cache_dir), "--batch-size", "32",
                    "--no-progress")
            cache = kdlib.open_cache(cache_dir)

            def kd(model, batch):
                return kdlib.kd_step_loss(model, batch, ce_weight=args.ce_weight, kd_weight=1 - args.ce_weight)[0]

            train(model, cache_batches(cache, args.batch_size, seed=k), args.steps, args.lr, kd,
                  f"model {k} (KD from model {k - 1})")
        if not (model_dir / "model.safetensors").exists():
            model.save_pretrained(model_dir, safe_serialization=True)
        models.append(model)
        result = evaluate_ensemble(models, eval_ids, batch_size=16)
        rows.append({"model": k, "val_loss": result.member_losses[-1], "ensemble_val_loss": result.ensemble_loss,
                     "ensemble_ece": result.ensemble_ece, "member_ece": result.member_eces[-1],
                     "train_and_build_s": round(time.perf_counter() - started, 1)})
        log(table_line(rows[-1]))
    return rows


def independent(args, out: Path, vocab: int, eval_ids: torch.Tensor) -> dict:
    """N CE-only members with their own seeds trained at once in one PackedEnsemble (a deep ensemble)."""
    cache = kdlib.open_cache(out / "cache_from_model_1")  # its tokens; kd_weight=0 makes the loss plain CE
    # tiny_gpt_student seeds torch itself, so the members are built here with their seeds and then packed
    ensemble = PackedEnsemble.from_members([make_model(args, vocab, seed=s) for s in range(1, args.models + 1)])
    opt = torch.optim.AdamW(ensemble.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr / 10)
    batches, started = cache_batches(cache, args.batch_size, seed=1), time.perf_counter()
    for step in range(1, args.steps + 1):
        losses = packed_step(ensemble, next(batches), opt, max_grad_norm=1.0, ce_weight=1.0, kd_weight=0.0)
        schedule.step()
        if step % max(1, args.steps // 4) == 0:
            log(f"independent x{args.models} (packed) step {step}/{args.steps}: mean loss {losses.mean():.3f}")
    result = evaluate_ensemble(ensemble, eval_ids, batch_size=16)
    log(f"independent CE ensemble of {args.models}: member val losses "
        f"{', '.join(f'{x:.4f}' for x in result.member_losses)}; ensemble {result.ensemble_loss:.4f} "
        f"({time.perf_counter() - started:.0f}s for all {args.models} members)")
    return {"member_val_losses": list(result.member_losses), "ensemble_val_loss": result.ensemble_loss,
            "train_s": round(time.perf_counter() - started, 1)}


def table_line(row: dict) -> str:
    if row["model"] == 1:
        return f"Model 1 Val Loss: {row['val_loss']:.6f}"
    return f"Model {row['model']} Val Loss: {row['val_loss']:.6f} (Ensemble loss: {row['ensemble_val_loss']:.6f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("chain_out"))
    parser.add_argument("--models", type=int, default=6, help="N, models in the chain")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.5, help="CE share of the loss (the rest is KD)")
    parser.add_argument("--corpus-bytes", type=int, default=1_500_000)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--independent", action="store_true", help="also train N CE-only members packed")
    parser.add_argument("--results-name", default="chain_distill")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: free CPUs)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the `kdcache build` subprocesses
    started = time.perf_counter()

    files = stdlib_files(args.corpus_bytes)
    tokenizer_dir = train_tokenizer(out, files, args.vocab_size)
    tokens_path = tokenize(out, tokenizer_dir, files)
    tokens = np.load(tokens_path)
    eval_tokens = np.load(tokenize(out, tokenizer_dir, stdlib_files(150_000, skip_bytes=args.corpus_bytes + 1),
                                   name="heldout_tokens.npy"))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    n_train, n_eval = len(tokens) // args.seq_len, min(128, len(eval_tokens) // args.seq_len)
    windows = torch.from_numpy(tokens[: n_train * args.seq_len].astype(np.int64)).view(n_train, args.seq_len)
    eval_ids = torch.from_numpy(eval_tokens[: n_eval * args.seq_len].astype(np.int64)).view(n_eval, args.seq_len)
    log(f"{n_train} training sequences of {args.seq_len} tokens, {n_eval} held-out; vocab {vocab}; "
        f"{threads} torch thread(s)")

    rows = chain(args, out, tokens_path, windows, eval_ids, vocab)
    summary = {"chain": rows, "final_ensemble_val_loss": rows[-1]["ensemble_val_loss"],
               "model_1_val_loss": rows[0]["val_loss"], "settings": {k: str(v) for k, v in vars(args).items()}}
    if args.independent:
        summary["independent_packed_ce"] = independent(args, out, vocab, eval_ids)
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    sys.path.insert(0, str(REPO))
    from benchmarks._common import RESULTS_DIR, write_results

    path = write_results(args.results_name, summary, rows)
    table = "\n".join(table_line(row) for row in rows)
    if args.independent:
        baseline = summary["independent_packed_ce"]
        table += (f"\nIndependent CE ensemble of {args.models} (one PackedEnsemble): member val losses "
                  f"{', '.join(f'{x:.6f}' for x in baseline['member_val_losses'])}; ensemble loss "
                  f"{baseline['ensemble_val_loss']:.6f}")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    (RESULTS_DIR / f"{args.results_name}.txt").write_text(f"$ {command}\n\n{table}\n\n"
                                                           f"wall time {summary['wall_time_s']:.0f}s\n")
    print(table)
    log(f"wrote {path} and {RESULTS_DIR / (args.results_name + '.txt')}")
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))


if __name__ == "__main__":
    main()
