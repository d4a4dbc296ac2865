"""Shared benchmark plumbing: machine info, result files, the synthetic cache, medians, a timer.

Every benchmark (and the examples) writes its synthetic caches with ``write_fast_synthetic_cache`` and records
the machine with ``machine_info``, so results of different benchmarks describe the same data and machines alike.

Shape notation::

    N  sequences in the cache   n  sequences in one shard   T  positions per sequence
    K  cached top-k             V  vocabulary
"""

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


def machine_info(device: Any = None) -> dict[str, Any]:
    """What a result was measured on: Python, OS, CPU, torch and its threads, the GPU, the load average now.

    Args:
        device: the torch device measured (``torch.device`` or its name); a CUDA device adds its name under
            ``gpu``. Without one, ``gpu`` names the first CUDA device when there is one.

    Returns:
        A JSON-serialisable dict (``cpu_model`` only where ``/proc/cpuinfo`` says it).
    """
    import torch

    cuda = torch.cuda.is_available()
    if device is not None and str(device).startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device))
    else:
        gpu = torch.cuda.get_device_name(0) if cuda and device is None else None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "loadavg_1_5_15min": [round(load, 2) for load in os.getloadavg()],  # other jobs skew every timing
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:  # not Linux: platform.processor() is all there is
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
    """The median as a float (``statistics.median`` of any iterable)."""
    return float(statistics.median(list(values)))


class Timer:
    """``with Timer() as t: ...`` then ``t.elapsed_s``: wall seconds of the block (``time.perf_counter``)."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed_s = time.perf_counter() - self.start


def _synthetic_topk_ids(rng: np.random.Generator, n: int, seq_len: int, topk: int, vocab_size: int) -> np.ndarray:
    """[n, T, K] top-k ids, distinct within each position, with a Zipf-like frequency across positions.

    Each position's ids are a Zipf-drawn start plus increasing offsets (gaps of 1 ..= (V-1)//K, so K of them
    stay distinct modulo V), in a random order: frequent tokens recur across positions as in real top-k, and
    no position repeats an id (the losses require distinct ids). O(n T K), no [.., V] array.
    """
    max_gap = max(1, (vocab_size - 1) // topk)
    start = (rng.zipf(1.2, size=(n, seq_len, 1)) - 1) % vocab_size  # [n, T, 1]; before adding: no int64 overflow
    offsets = np.cumsum(rng.integers(1, max_gap + 1, size=(n, seq_len, topk)), axis=-1)  # [n, T, K], increasing
    return rng.permuted((start + offsets) % vocab_size, axis=-1)


def _synthetic_shard(rng: np.random.Generator, n: int, layout: Any) -> dict[str, np.ndarray]:
    """One shard of teacher-shaped arrays: sorted log-probs of a peaked head plus a random tail mass."""
    T, K, V = layout.seq_len, layout.topk, layout.vocab_size
    logits = np.sort(rng.gumbel(size=(n, T, K)).astype(np.float32) * 2.0, axis=-1)[..., ::-1]  # [n, T, K]
    tail = rng.uniform(0.02, 0.6, size=(n, T, 1)).astype(np.float32)  # [n, T, 1] mass outside the top-k
    head = np.exp(logits - logits.max(-1, keepdims=True))
    head = head / head.sum(-1, keepdims=True) * (1 - tail)  # [n, T, K], Σ_K = 1 - tail
    logprobs = np.log(head)
    return {
        "input_ids": rng.integers(0, V, size=(n, T)).astype(layout.ids_dtype),  # [n, T]
        "topk_ids": _synthetic_topk_ids(rng, n, T, K, V).astype(layout.ids_dtype),  # [n, T, K]
        "topk_logprobs": logprobs.astype(layout.logprob_dtype),  # [n, T, K]
        "lse": rng.normal(10.0, 1.0, size=(n, T)).astype(np.float32),  # [n, T]
        "seq_nll": rng.uniform(1, 5, size=n).astype(np.float32),  # [n]
        "seq_entropy": (-(head * logprobs).sum(-1).mean(-1)).astype(np.float32),  # [n], of the top-k part
    }


def write_fast_synthetic_cache(
    out_dir: str | Path,
    num_sequences: int,
    seq_len: int,
    topk: int,
    vocab_size: int,
    temperatures: tuple[float, ...] = (),
    seed: int = 0,
    codec: str | None = None,
    shard_seqs: int | None = None,
    chunk_seqs: int | None = None,
    overwrite: bool = True,
) -> Path:
    """A cache shaped like teacher output without running a teacher (for read, serve, loader and step benchmarks).

    Written through the real ``CacheWriter``, so it is a complete cache (manifest, checksums) that every reader
    opens. Ids: distinct per position, Zipf-like across positions; log-probs: sorted descending, a peaked head
    plus a random tail mass; ``lse_t{τ}`` = lse / τ. Not a substitute for real teacher output when measuring
    compression.

    Args:
        out_dir: the cache directory.
        num_sequences, seq_len, topk, vocab_size: N, T, K, V.
        temperatures: extra τ whose ``lse_t{τ}`` arrays are stored.
        seed: the data are a function of (seed, shard index) only.
        codec: a ``cache_server.format`` codec preset (default: the format's default codec).
        shard_seqs: sequences per shard (default: the format's ``plan_chunking``).
        chunk_seqs: sequences per inner chunk (default: the planned chunk, lowered to divide ``shard_seqs``).
        overwrite: replace a cache already in ``out_dir`` that has other settings.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from cache_server import format as fmt
    from cache_server.build.writer import CacheWriter

    planned_shard_seqs, planned_chunk_seqs = fmt.plan_chunking(seq_len, topk, vocab_size, num_sequences=num_sequences)
    shard_seqs = shard_seqs or planned_shard_seqs
    if chunk_seqs is None:
        chunk_seqs = min(planned_chunk_seqs, shard_seqs)
        while shard_seqs % chunk_seqs:  # the layout needs whole chunks per shard
            chunk_seqs -= 1
    layout = fmt.CacheLayout(
        num_sequences=num_sequences, seq_len=seq_len, topk=topk, vocab_size=vocab_size,
        temperatures=tuple(temperatures), shard_seqs=shard_seqs, chunk_seqs=chunk_seqs,
        codec=codec or fmt.DEFAULT_CODEC,
    )
    settings = {"generator": "benchmarks/_common.write_fast_synthetic_cache", "seed": seed, "codec": layout.codec}
    writer = CacheWriter(out_dir, layout, settings=settings, manifest_fields={"teacher": {"name": "synthetic"}},
                         overwrite=overwrite)
    for i in writer.pending_shards():
        start, stop = layout.shard_range(i)
        arrays = _synthetic_shard(np.random.default_rng([seed, i]), stop - start, layout)
        for tau in layout.temperatures:
            arrays[fmt.temperature_key(tau)] = (arrays["lse"] / tau).astype(np.float32)
        writer.write_shard(i, arrays)
    writer.finalize()
    return Path(out_dir)


def train_for_seconds(model: Any, tokens: np.ndarray, seq_len: int, seconds: float, batch: int = 16,
                      lr: float = 3e-3, seed: int = 0) -> list[float]:
    """AdamW (weight decay 0.01) on random windows of ``tokens`` for a wall-time budget; returns step losses."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
        x = torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
