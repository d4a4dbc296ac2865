"""Shared benchmark plumbing: machine info, result files, fast synthetic caches, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "machine_info", "write_results", "median", "write_fast_synthetic_cache", "Timer"]


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def write_results(name: str, summary: dict[str, Any], rows: Iterable[dict[str, Any]] = ()) -> Path:
    """Write ``results/{name}.json`` (summary + rows + command + machine) and ``results/{name}.csv`` (rows)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "summary": summary,
        "rows": rows,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    if rows:
        import csv

        keys = sorted({k for row in rows for k in row})
        with open(RESULTS_DIR / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    return path


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed_s = time.perf_counter() - self.start


def write_fast_synthetic_cache(
    out_dir: str | Path,
    num_sequences: int,
    seq_len: int,
    topk: int,
    vocab_size: int,
    temperatures: tuple[float, ...] = (),
    seed: int = 0,
    codec: str = "blosc-zstd",
) -> Path:
    """A large cache shaped like teacher output without running a teacher (for read/serve benchmarks).

    Ids: Zipf-like draws (frequent tokens recur, as in real top-k); log-probs: sorted descending, a peaked
    head plus a random tail mass. Not a substitute for real teacher output when measuring compression.
    """
    from cache_server import format as fmt
    from cache_server.build.writer import CacheWriter

    shard_seqs, chunk_seqs = fmt.plan_chunking(seq_len, topk, vocab_size, num_sequences=num_sequences)
    layout = fmt.CacheLayout(
        num_sequences=num_sequences, seq_len=seq_len, topk=topk, vocab_size=vocab_size,
        temperatures=tuple(temperatures), shard_seqs=shard_seqs, chunk_seqs=chunk_seqs, codec=codec,
    )
    writer = CacheWriter(out_dir, layout, settings={"fast_synthetic_seed": seed, "codec": codec}, overwrite=True)
    ids_dtype = layout.ids_dtype
    for i in writer.pending_shards():
        a, b = layout.shard_range(i)
        n = b - a
        rng = np.random.default_rng([seed, i])
        ids = (rng.zipf(1.2, size=(n, seq_len, topk)) % vocab_size).astype(ids_dtype)
        logits = np.sort(rng.gumbel(size=(n, seq_len, topk)).astype(np.float32) * 2.0, axis=-1)[..., ::-1]
        tail = rng.uniform(0.02, 0.6, size=(n, seq_len, 1)).astype(np.float32)
        head = np.exp(logits - logits.max(-1, keepdims=True))
        head = head / head.sum(-1, keepdims=True) * (1 - tail)
        lse = rng.normal(10.0, 1.0, size=(n, seq_len)).astype(np.float32)
        arrays = {
            "input_ids": rng.integers(0, vocab_size, size=(n, seq_len)).astype(ids_dtype),
            "topk_ids": ids,
            "topk_logprobs": np.log(head).astype(layout.logprob_dtype),
            "lse": lse,
            "seq_nll": rng.uniform(1, 5, size=n).astype(np.float32),
            "seq_entropy": rng.uniform(1, 5, size=n).astype(np.float32),
        }
        for tau in temperatures:
            arrays[fmt.temperature_key(tau)] = (lse / tau).astype(np.float32)
        writer.write_shard(i, arrays)
    writer.finalize()
    return Path(out_dir)
