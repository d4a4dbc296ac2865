"""Teacher-training step time with a busy neighbour process: all CPUs as torch threads vs the demo's choice.

`make demo` trains its teacher and students with torch on the CPU. On a shared machine, OpenMP threads that
wait at a barrier for a core a neighbour holds make every step slower than fewer threads would, which is
why ``examples/demo.py`` picks its thread count from the idle CPUs (``pick_threads``). This benchmark
measures that: the demo's own teacher model and batch shape, timed at ``threads = all CPUs`` and at
``threads = pick_threads()`` while a neighbour process spins on one core (bounded in time, stopped at the
end), interleaved A/B/A/B with medians, and once more without a neighbour as the baseline.

Usage::

    python benchmarks/thread_oversubscription.py --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, median, write_results  # noqa: E402
from examples.demo import make_model, pick_threads  # noqa: E402


def _spin(stop_at_s: float) -> None:
    """A neighbour that keeps one core busy until ``stop_at_s`` (wall clock), then exits."""
    x = 0
    while time.time() < stop_at_s:
        x += 1


def _step_times(model, optimizer, batch: torch.Tensor, threads: int, steps: int) -> list[float]:
    torch.set_num_threads(threads)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (4 if args.quick else 10)
    steps = 3 if args.quick else 5
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus < 2:
        raise SystemExit("needs at least 2 CPUs to show oversubscription")

    model = make_model(vocab_size=4096, hidden=128, layers=2, seq_len=128)  # the demo's teacher
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 4096, size=(16, 128)).astype(np.int64))
    _step_times(model, optimizer, batch, cpus, 2)  # warm-up

    quiet = {"all_cpus": [], "one_thread": []}
    for _ in range(max(2, rounds // 2)):
        quiet["all_cpus"] += _step_times(model, optimizer, batch, cpus, steps)
        quiet["one_thread"] += _step_times(model, optimizer, batch, 1, steps)

    budget_s = 600 if not args.quick else 240
    neighbour = mp.get_context("spawn").Process(target=_spin, args=(time.time() + budget_s,), daemon=True)
    neighbour.start()
    try:
        time.sleep(5)  # let the 1-minute load average notice the neighbour a little
        busy = {"all_cpus": [], "picked": []}
        picked = []
        for _ in range(rounds):
            busy["all_cpus"] += _step_times(model, optimizer, batch, cpus, steps)
            threads = pick_threads(None)
            picked.append(threads)
            busy["picked"] += _step_times(model, optimizer, batch, threads, steps)
    finally:
        neighbour.terminate()
        neighbour.join()

    rows = [{"neighbour": n, "mode": m, "median_step_s": median(v), "steps": len(v)}
            for n, d in (("none", quiet), ("one busy core", busy)) for m, v in d.items()]
    summary = {
        "benchmark": "thread_oversubscription",
        "quick": args.quick,
        "cpus": cpus,
        "quiet_all_cpus_step_s": round(median(quiet["all_cpus"]), 4),
        "quiet_one_thread_step_s": round(median(quiet["one_thread"]), 4),
        "busy_all_cpus_step_s": round(median(busy["all_cpus"]), 4),
        "busy_picked_step_s": round(median(busy["picked"]), 4),
        "busy_all_cpus_over_picked": round(median(busy["all_cpus"]) / median(busy["picked"]), 3),
        "picked_threads": sorted(set(picked)),
        "machine": machine_info(),
        "command": "python benchmarks/thread_oversubscription.py" + (" --quick" if args.quick else ""),
    }
    for row in rows:
        print(f"neighbour {row['neighbour']:14s} {row['mode']:10s} median step {row['median_step_s']:.3f} s",
              file=sys.stderr)
    write_results("thread_oversubscription" + ("_quick" if args.quick else ""), summary, rows)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
