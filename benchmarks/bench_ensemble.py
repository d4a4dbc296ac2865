"""Packed ensemble vs a Python loop over members: one KD training step of M small GPT students from one cache.

For M = 1, 4, 8 students (GPT-2 blocks, d_model 128, 2 layers, V 4096, T 128, eager attention; transformers'
SDPA has no vmap batching rule on the CPU) trained on the same cache batches:

* packed: ``kdlib.ensemble.PackedEnsemble`` + ``packed_step`` (vmapped forward, ONE fused ``kd_loss`` over
  [M, B, T, V], one AdamW over the stacked [M, ...] parameters, per-member clipping);
* looped: M ordinary modules, M AdamW optimizers, one ``kd_loss_from_batch`` + backward + step per member.

Correctness first: from the same inits on the same batch, every packed member's loss and gradients must equal
its looped twin's (max difference, gradients relative to their largest entry; the run stops above 1e-4;
tests/test_ensemble_packed.py checks the parameters after 3 AdamW steps). Then rounds interleave packed
and looped (their order alternating per round); the median step time is reported, and the peak tensor memory
a step allocates above what was live before it (CPU: from the torch profiler's allocation timeline; CUDA:
``max_memory_allocated``). The last stdout line is the JSON summary with ``packed_over_looped_m8`` (packed step
time / looped step time at M = 8) and ``packed_step_over_single_m8`` (packed M = 8 step / ONE member's
ordinary step: 8 would be no gain over training them one after another).

Usage::

    python benchmarks/bench_ensemble.py --quick        # results/bench_ensemble_quick.{json,csv}
    python benchmarks/bench_ensemble.py --members 1 4 8 16 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import median, write_fast_synthetic_cache, write_results  # noqa: E402

import kdlib  # noqa: E402
from kdlib.batch import read_batch  # noqa: E402
from kdlib.ensemble import PackedEnsemble, packed_step  # noqa: E402

LOSS = dict(ce_weight=0.5, temperature=2.0)
CLIP = 1.0


def make_student(vocab: int, seq_len: int, d_model: int, layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=d_model, n_head=max(1, d_model // 32), vocab_size=vocab,
                        n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


class Looped:
    """M ordinary students with M optimizers: the baseline a user writes without packing."""

    def __init__(self, make, members: int, lr: float):
        self.models = []
        for seed in range(members):  # the seeds PackedEnsemble gives its members
            torch.manual_seed(seed)
            self.models.append(make())
        self.opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01) for m in self.models]

    def step(self, batch) -> list[float]:
        losses = []
        for model, opt in zip(self.models, self.opts):
            loss, _ = kdlib.kd_step_loss(model, batch, **LOSS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            losses.append(float(loss.detach()))
        return losses


class Packed:
    def __init__(self, make, members: int, lr: float):
        self.ensemble = PackedEnsemble(make, members)
        self.opt = torch.optim.AdamW(self.ensemble.parameters(), lr=lr, weight_decay=0.01)

    def step(self, batch) -> list[float]:
        return packed_step(self.ensemble, batch, self.opt, max_grad_norm=CLIP, **LOSS).tolist()


def check_equal(make, members: int, batch, lr: float) -> float:
    """Largest difference between packed and looped members on one batch from the same inits: of the losses,
    and of every gradient relative to that gradient's largest entry (a parameter comparison after an AdamW step
    would amplify rounding: Adam's first update is about ±lr wherever the gradient is tiny)."""
    from kdlib.ensemble import packed_kd_loss

    packed, looped = Packed(make, members, lr), Looped(make, members, lr)
    losses = packed_kd_loss(packed.ensemble.logits(batch["input_ids"].long()), batch, **LOSS)
    losses.sum().backward()
    stacked = list(packed.ensemble.parameters())
    diff = 0.0
    for m, model in enumerate(looped.models):
        loss, _ = kdlib.kd_step_loss(model, batch, **LOSS)
        loss.backward()
        diff = max(diff, abs(float(losses[m].detach()) - float(loss.detach())))
        for p, q in zip(stacked, model.parameters()):
            diff = max(diff, float((p.grad[m] - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)))
    return diff


def timed(runner, batch, device) -> float:
    started = time.perf_counter()
    runner.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def peak_step_mb(runner, batch, device) -> float:
    """Peak tensor memory a step allocates above what was live before it (MB).

    CUDA: ``max_memory_allocated``. CPU: the step's allocation timeline from the torch profiler (each op's own
    allocations at its start, each free where it happens), since the resident set does not show reuse of
    memory the allocator already holds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner.step(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(batch)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def measure(make, members: int, batches, rounds: int, lr: float, device) -> dict[str, float]:
    """Interleaved rounds (order alternating) after one warm-up step each: median step time; then one
    profiled step each for the peak memory."""
    runners = {"packed": Packed(make, members, lr), "looped": Looped(make, members, lr)}
    for runner in runners.values():
        runner.step(batches[0])
    times = {name: [] for name in runners}
    for r in range(rounds):
        order = ("packed", "looped") if r % 2 == 0 else ("looped", "packed")
        for name in order:
            times[name].append(timed(runners[name], batches[(r + 1) % len(batches)], device))
    out = {f"{name}_step_s": median(values) for name, values in times.items()}
    out.update({f"{name}_peak_mb": peak_step_mb(runner, batches[0], device) for name, runner in runners.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds, M = 1 4 8 (results *_quick)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (results of another count get a _threads{n} suffix); on a busy "
                             "machine 1 thread avoids OpenMP barrier waits that 2 threads pay per op")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 5
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    lr = 3e-3

    def make():
        return make_student(args.vocab_size, args.seq_len, args.d_model, args.layers)

    with tempfile.TemporaryDirectory() as tmp:
        print(f"[bench_ensemble] writing a synthetic cache (T={args.seq_len}, K={args.topk}, V={args.vocab_size})",
              file=sys.stderr)
        cache = kdlib.open_cache(write_fast_synthetic_cache(Path(tmp) / "cache", 8 * args.batch_size, args.seq_len,
                                                            args.topk, args.vocab_size, temperatures=(2.0,)))
        batches = [read_batch(cache, range(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(8)]
        max_diff = check_equal(make, max(args.members), batches[0], lr)
        print(f"[bench_ensemble] packed == looped after one step: max |diff| {max_diff:.2e}", file=sys.stderr)
        if max_diff > 1e-4:
            raise SystemExit(f"packed and looped members differ by {max_diff:.2e} after one step; not timing")
        rows = []
        for members in args.members:
            row = {"members": members, "batch_size": args.batch_size, **measure(make, members, batches, args.rounds,
                                                                                 lr, device)}
            row["packed_over_looped"] = row["packed_step_s"] / row["looped_step_s"]
            rows.append(row)
            print(f"[bench_ensemble] M={members}: packed {row['packed_step_s'] * 1e3:.0f} ms "
                  f"({row['packed_peak_mb']:.0f} MB), looped {row['looped_step_s'] * 1e3:.0f} ms "
                  f"({row['looped_peak_mb']:.0f} MB), ratio {row['packed_over_looped']:.2f}", file=sys.stderr)
    by_m = {row["members"]: row for row in rows}
    single = by_m[1]["looped_step_s"] if 1 in by_m else float("nan")
    top = by_m.get(8, rows[-1])
    summary = {
        "packed_over_looped_m8": round(top["packed_over_looped"], 3),
        "packed_step_over_single_m8": round(top["packed_step_s"] / single, 3),
        "packed_peak_over_looped_peak_m8": round(top["packed_peak_mb"] / max(top["looped_peak_mb"], 1e-9), 3),
        "max_abs_diff_packed_vs_looped": max_diff,
        "model": f"GPT-2 d{args.d_model} x{args.layers} layers, V {args.vocab_size}, T {args.seq_len}, "
                 f"B {args.batch_size}, K {args.topk}",
        "rounds": args.rounds, "threads": args.threads,
    }
    name = ("bench_ensemble_quick" if args.quick else "bench_ensemble") + ("" if args.threads == 2 else
                                                                           f"_threads{args.threads}")
    path = write_results(name, summary, rows)
    print(f"[bench_ensemble] wrote {path}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
