"""Throughput of ``kdlib.make_loader`` (batches assembled from decoded, memory-mapped shards) per worker count.

Shape notation::

    B  sequences per batch   T  positions per sequence   K  top-k

``loader_throughput(cache, batch_size)`` is called by ``bench_read.py``; it is also runnable standalone::

    python benchmarks/loader_throughput.py --quick                   # synthetic cache, ~20 s
    python benchmarks/loader_throughput.py --quick --cold            # every run starts with nothing decoded
    python benchmarks/loader_throughput.py --cache my_cache --batch-size 16 --workers 0,2,4

Tokens/s counts positions delivered (B x T per batch) after ``warmup_batches``; worker start-up is reported
separately (``startup_s``: time to the first batch). Warm (default): every shard is decoded before timing, so a
batch is memory-map slices (the steady state of a local cache). ``--cold``: each worker count reads through its
own empty decode directory, so shard decoding (and the loader's next-window prefetch) is part of the time. The loader does the full training-side work per batch:
shard-aware shuffled indices, per-shard gathers, labels. Writes ``benchmarks/results/loader_throughput*.json``;
the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["loader_throughput"]


def loader_throughput(
    cache: Any,
    batch_size: int,
    num_workers_list: Sequence[int] = (0, 2),
    shuffle: bool = True,
    *,
    max_batches: int | None = 200,
    warmup_batches: int = 2,
    seed: int = 0,
    prefetch: int = 2,
    prepare: bool = True,
    cold_decode_root: str | Path | None = None,
    pin_memory: bool = False,
) -> dict[str, Any]:
    """Measure loader throughput for each worker count.

    Args:
        cache: an open cache (``kdlib.open_cache``) or a path/URL.
        batch_size: B sequences per batch.
        num_workers_list: worker counts to measure (0 = background thread in this process).
        shuffle: shard-aware shuffle (False reads sequentially).
        max_batches: stop after this many batches (None = one epoch).
        warmup_batches: batches excluded from timing (after worker start-up).
        seed: shuffle seed.
        prefetch: batches read ahead per worker.
        prepare: decode every shard before timing (measures the loader, not shard decoding).
        cold_decode_root: if given, each worker count opens the cache afresh with its own empty decode
            directory under this root (``prepare`` is ignored): decoding is timed too.
        pin_memory: batches in pinned (page-locked) host memory, as a CUDA training loop wants them.

    Returns:
        ``{"batch_size", "seq_len", "topk", "shuffle", "per_workers": [{"num_workers", "batches",
        "tokens_per_s", "batches_per_s", "startup_s"}...], "best_tokens_per_s"}``.
    """
    import kdlib

    reader = kdlib.open_cache(cache) if isinstance(cache, (str, Path)) else cache
    if prepare and cold_decode_root is None:
        reader.prepare()
    tokens_per_batch = batch_size * reader.seq_len
    results = []
    for num_workers in num_workers_list:
        run_reader = reader
        if cold_decode_root is not None:
            location = getattr(reader, "path", None) or reader.url
            run_reader = kdlib.open_cache(location, decode_dir=Path(cold_decode_root) / f"workers{num_workers}")
        loader = kdlib.make_loader(run_reader, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers,
                                   prefetch=prefetch, drop_last=True, pin_memory=pin_memory)
        limit = len(loader) if max_batches is None else min(len(loader), max_batches)
        if limit <= warmup_batches:
            raise ValueError(f"the cache gives only {limit} batches of {batch_size}; need more than "
                             f"warmup_batches={warmup_batches}: use a smaller batch_size")
        start = time.perf_counter()
        timed_from = None
        startup_s = None
        count = 0
        checksum = 0
        for batch in loader:
            if count == 0:
                startup_s = time.perf_counter() - start
            count += 1
            checksum += int(batch["sample_indices"][0])  # touch the batch
            if count == warmup_batches:
                timed_from = time.perf_counter()
            if count >= limit:
                break
        elapsed_s = time.perf_counter() - timed_from
        timed = count - warmup_batches
        results.append({
            "num_workers": num_workers,
            "batches": timed,
            "elapsed_s": round(elapsed_s, 4),
            "batches_per_s": round(timed / elapsed_s, 1),
            "tokens_per_s": round(timed * tokens_per_batch / elapsed_s),
            "startup_s": round(startup_s, 3),
        })
    return {
        "batch_size": batch_size,
        "seq_len": reader.seq_len,
        "topk": reader.topk,
        "shuffle": shuffle,
        "cold": cold_decode_root is not None,
        "per_workers": results,
        "best_tokens_per_s": max(r["tokens_per_s"] for r in results),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks._common import write_fast_synthetic_cache, write_results

    import kdlib

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small synthetic cache, few batches")
    parser.add_argument("--cache", help="existing cache directory or URL (default: a synthetic one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--cold", action="store_true", help="nothing decoded before each run (decoding is timed)")
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--sequences", type=int, default=None, help="synthetic cache size (quick 1024, full 8192)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--pin-memory", action="store_true", help="batches in pinned host memory (CUDA loops)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kd_loader_tp_"))
    try:
        if args.cache:
            cache_path = args.cache
        else:
            n = args.sequences or (1024 if args.quick else 8192)
            print(f"writing a synthetic cache ({n} x {args.seq_len}, k={args.topk}) ...", file=sys.stderr)
            cache_path = str(write_fast_synthetic_cache(work / "cache", n, args.seq_len, args.topk, args.vocab))
        cache = kdlib.open_cache(cache_path, decode_dir=work / "decoded")
        max_batches = args.max_batches or (100 if args.quick else 1000)
        summary = loader_throughput(cache, args.batch_size, [int(w) for w in args.workers.split(",")],
                                    shuffle=not args.no_shuffle, max_batches=max_batches,
                                    cold_decode_root=work / "cold" if args.cold else None,
                                    pin_memory=args.pin_memory)
        summary["benchmark"] = "loader_throughput"
        summary["quick"] = args.quick
        summary["cache_sequences"] = cache.num_sequences
        name = "loader_throughput" + ("_cold" if args.cold else "") + ("_quick" if args.quick else "")
        path = write_results(name, summary, summary["per_workers"])
        print(f"wrote {path}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
