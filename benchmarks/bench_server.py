"""Serving a k=32 cache over loopback HTTP: one streaming client's throughput, 16 clients' request latency.

Setup: a synthetic k=32 cache (V=151,936, uint32 ids, fp16 log-probs; benchmarks/_common.py), a real
``python -m cache_server serve`` subprocess on 127.0.0.1 (uvloop + httptools), clients in this process.

1. Correctness first: one remote read of every sequence and array must equal the local reader's.
2. Throughput (A/B interleaved, medians): A = ``RemoteCache`` streaming the whole cache with a cold client
   cache (fresh decode dir each repeat: fetch + sha256 + decode + memmap); B = ``LocalCache`` over the same
   directory, cold decode dir (decode only, no HTTP). Every batch is copied into staging tensors as a
   loader would. Reports tokens/s and wire MB/s of A and the ratio A/B.
3. Latency: 16 client threads, each with its own HTTP connection, each fetching every stored shard of
   every array in its own random order; p50/p99 of request latency (first byte sent to last byte read).

Shape notation: N sequences, T positions, K=32 top-k entries, V vocabulary, S sequences per shard.

Usage::

    python benchmarks/bench_server.py --quick     # ~1M tokens, a few minutes on 2 cores
    python benchmarks/bench_server.py             # ~4M tokens, more repeats
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, write_fast_synthetic_cache, write_results  # noqa: E402
from cache_server import format as fmt  # noqa: E402
from kdlib.data.cache import LocalCache  # noqa: E402
from kdlib.data.remote import DEFAULT_PIECE_BYTES, RemoteCache  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

TOKEN = "bench-token"
NUM_CLIENTS = 16


def stream_all(cache, batch_seqs: int) -> int:
    """Read every sequence in order, copying each batch into staging tensors; return tokens read."""
    staging: dict[str, torch.Tensor] = {}
    tokens = 0
    for start in range(0, cache.num_sequences, batch_seqs):
        stop = min(start + batch_seqs, cache.num_sequences)
        for name, tensor in cache.read(start, stop).items():
            buf = staging.get(name)
            if buf is None:
                buf = staging[name] = torch.empty((batch_seqs, *tensor.shape[1:]), dtype=tensor.dtype)
            buf[: stop - start].copy_(tensor)
        tokens += (stop - start) * cache.seq_len
    return tokens


def check_correctness(url: str, cache_dir: Path, work: Path) -> None:
    local = LocalCache(cache_dir, decode_dir=work / "check-local")
    with RemoteCache(url, token=TOKEN, decode_dir=work / "check-remote") as remote:
        names = list(local.store.specs)
        for start in range(0, local.num_sequences, 64):
            stop = min(start + 64, local.num_sequences)
            got, want = remote.read(start, stop, arrays=names), local.read(start, stop, arrays=names)
            for name in names:
                if not torch.equal(got[name], want[name]):
                    raise SystemExit(f"MISMATCH: remote != local for {name} rows [{start}, {stop})")
    shutil.rmtree(work / "check-local")
    shutil.rmtree(work / "check-remote")


def latency_run(server: ServerProcess, manifest: dict, seed: int) -> tuple[list[float], float, int, int]:
    """16 threads fetch every shard of every array as the client does (``DEFAULT_PIECE_BYTES`` Range pieces of
    large shards); returns (latencies_s, wall_s, bytes, errors)."""
    items = [(array, i) for array, entries in manifest["shards"].items() for i in range(len(entries))]
    latencies: list[list[float]] = [[] for _ in range(NUM_CLIENTS)]
    received = [0] * NUM_CLIENTS
    errors = [0] * NUM_CLIENTS
    barrier = threading.Barrier(NUM_CLIENTS + 1)
    url = server.cache_url("bench")

    def client(c: int) -> None:
        order = items[:]
        random.Random(seed * 1000 + c).shuffle(order)
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            barrier.wait()
            for array, i in order:
                nbytes = manifest["shards"][array][i]["nbytes"]
                body = bytearray()
                for lo in range(0, nbytes, DEFAULT_PIECE_BYTES):
                    hi = min(lo + DEFAULT_PIECE_BYTES, nbytes)
                    headers = {"Range": f"bytes={lo}-{hi - 1}"} if nbytes > DEFAULT_PIECE_BYTES else {}
                    t0 = time.perf_counter()
                    response = http.get(f"{url}/shards/{array}/{i}", headers=headers)
                    piece = response.content
                    latencies[c].append(time.perf_counter() - t0)
                    if response.status_code not in (200, 206):
                        errors[c] += 1
                    body += piece
                received[c] += len(body)
                if len(body) != nbytes or fmt.shard_sha256(body) != manifest["shards"][array][i]["sha256"]:
                    errors[c] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(NUM_CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    return [x for per in latencies for x in per], wall_s, sum(received), sum(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~1M tokens, 3 repeats")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=151_936)
    parser.add_argument("--shard-seqs", type=int, default=None,
                        help="S (default: format.plan_chunking's choice, ~32 MiB of raw topk_ids per shard)")
    parser.add_argument("--batch-seqs", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    num_sequences = 1024 if args.quick else 4096
    repeats = 3 if args.quick else 5
    latency_repeats = 1 if args.quick else 3

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdcache-bench-server-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache_dir = write_fast_synthetic_cache(work / "bench", num_sequences, args.seq_len, args.topk, args.vocab_size,
                                           temperatures=(2.0,), shard_seqs=args.shard_seqs)
    manifest = fmt.load_manifest(cache_dir)
    args.shard_seqs = manifest["shard_seqs"]
    stored_bytes = sum(e["nbytes"] for entries in manifest["shards"].values() for e in entries)
    tokens_total = num_sequences * args.seq_len
    print(f"cache: {num_sequences} x {args.seq_len} tokens, k={args.topk}, {manifest['num_shards']} shards, "
          f"{stored_bytes / 1e6:.1f} MB stored, written in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    with ServerProcess([str(cache_dir)], token=TOKEN, token_dir=work) as server:
        url = server.cache_url("bench")
        check_correctness(url, cache_dir, work)
        print("correctness: remote == local for every array and row", flush=True)

        remote_tps, local_tps, remote_mbps = [], [], []
        for r in range(repeats):
            for mode in ("remote", "local"):  # interleaved A/B
                decode_dir = work / f"dec-{mode}-{r}"
                started = time.perf_counter()
                if mode == "remote":
                    cache = RemoteCache(url, token=TOKEN, decode_dir=decode_dir)
                else:
                    cache = LocalCache(cache_dir, decode_dir=decode_dir)
                tokens = stream_all(cache, args.batch_seqs)
                elapsed_s = time.perf_counter() - started
                wire_bytes = cache.source.stats["bytes"] if mode == "remote" else 0
                if mode == "remote":
                    cache.close()
                tps = tokens / elapsed_s
                (remote_tps if mode == "remote" else local_tps).append(tps)
                if mode == "remote":
                    remote_mbps.append(wire_bytes / elapsed_s / 1e6)
                rows.append({"phase": "stream", "mode": mode, "repeat": r, "tokens": tokens, "seconds": elapsed_s,
                             "tokens_per_s": tps, "wire_bytes": wire_bytes})
                print(f"  {mode:6s} repeat {r}: {tps / 1e6:.2f} M tokens/s"
                      + (f", {wire_bytes / elapsed_s / 1e6:.0f} MB/s on the wire" if wire_bytes else ""), flush=True)
                shutil.rmtree(decode_dir, ignore_errors=True)

        all_latencies: list[float] = []
        total_errors = 0
        for r in range(latency_repeats):
            latencies, wall_s, nbytes, errors = latency_run(server, manifest, seed=r)
            all_latencies += latencies
            total_errors += errors
            rows.append({"phase": "latency", "repeat": r, "requests": len(latencies), "seconds": wall_s,
                         "bytes": nbytes, "errors": errors,
                         "p50_ms": float(np.percentile(latencies, 50) * 1e3),
                         "p99_ms": float(np.percentile(latencies, 99) * 1e3)})
            print(f"  {NUM_CLIENTS} clients repeat {r}: {len(latencies)} requests, {nbytes / wall_s / 1e6:.0f} MB/s "
                  f"aggregate, p50 {rows[-1]['p50_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms, {errors} errors",
                  flush=True)

    shard_nbytes = [e["nbytes"] for entries in manifest["shards"].values() for e in entries]
    summary = {
        "tokens_per_s": round(median(remote_tps)),
        "mb_per_s": round(median(remote_mbps), 1),
        "local_cold_tokens_per_s": round(median(local_tps)),
        "remote_over_local": round(median(remote_tps) / median(local_tps), 3),
        "p50_ms": round(float(np.percentile(all_latencies, 50) * 1e3), 2),
        "p99_ms": round(float(np.percentile(all_latencies, 99) * 1e3), 2),
        "concurrent_clients": NUM_CLIENTS,
        "errors": total_errors,
        "num_tokens": tokens_total,
        "topk": args.topk,
        "vocab_size": args.vocab_size,
        "shard_seqs": args.shard_seqs,
        "max_shard_bytes": max(shard_nbytes),
        "piece_bytes": DEFAULT_PIECE_BYTES,
        "stored_bytes": stored_bytes,
        "repeats": repeats,
        "quick": args.quick,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),  # other jobs on the machine skew every number
    }
    write_results("bench_server_quick" if args.quick else "bench_server", summary, rows)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
