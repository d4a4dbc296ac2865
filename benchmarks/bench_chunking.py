"""Why the default chunking: stored size and decode speed of a shard vs the inner-chunk size.

Writes the same synthetic k=32 arrays (distinct Zipf-like ids, sorted fp16 log-probs; benchmarks/_common.py) with
inner chunks of 128 KiB .. 4 MiB of ``topk_ids`` (shards fixed at ~32 MiB), then measures per setting: stored
bytes/token, the time to decode a whole shard with ``format.decode_shard`` (what a reader does once per shard),
and zarr-python's time for one random inner-chunk read (what reading through zarr per step would cost).
Settings are interleaved across repeats; medians reported.

Usage::

    python benchmarks/bench_chunking.py --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, write_fast_synthetic_cache, write_results  # noqa: E402
from cache_server import format as fmt  # noqa: E402


def _stored_shards(cache_dir: Path, layout) -> dict[str, bytes]:
    """Shard 0 of ``topk_ids`` and of what decoding it needs (format v2 orders it by ``topk_logprobs``)."""
    return {name: (cache_dir / fmt.shard_relpath(name, 0, 3)).read_bytes()
            for name in fmt.decode_inputs(layout, "topk_ids")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=50257)
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    chunk_kib = [128, 256, 1024, 4096]
    row_bytes = args.seq_len * args.topk * 2
    shard_seqs = (32 << 20) // row_bytes  # ~32 MiB of topk_ids per shard, as the default plan
    num_sequences = shard_seqs * (1 if args.quick else 2)
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-chunking-"))
    caches = {}
    for kib in chunk_kib:
        chunk_seqs = max(1, (kib << 10) // row_bytes)
        out = work / f"chunk{kib}"
        # Same data for every setting (same seed, same shards); only the inner chunking differs.
        write_fast_synthetic_cache(out, num_sequences, args.seq_len, args.topk, args.vocab_size, seed=3,
                                   shard_seqs=shard_seqs, chunk_seqs=chunk_seqs)
        caches[kib] = out

    # Correctness before timing: every setting decodes to the same arrays.
    reference = None
    for kib, out in caches.items():
        layout = fmt.layout_from_manifest(fmt.load_manifest(out))
        spec = next(s for s in layout.arrays() if s.name == "topk_ids")
        raws = _stored_shards(out, layout)
        decoded = fmt.decode_shard(raws["topk_ids"], spec, layout, 0, companions=raws)
        if reference is None:
            reference = decoded
        elif not np.array_equal(decoded, reference):
            raise SystemExit(f"chunk {kib} KiB decodes differently")

    import zarr

    rows, timings = [], {kib: {"decode_s": [], "zarr_chunk_read_ms": []} for kib in chunk_kib}
    rng = np.random.default_rng(0)
    for rep in range(repeats):
        for kib, out in caches.items():
            manifest = fmt.load_manifest(out)
            layout = fmt.layout_from_manifest(manifest)
            spec = next(s for s in layout.arrays() if s.name == "topk_ids")
            raws = _stored_shards(out, layout)
            t0 = time.perf_counter()
            fmt.decode_shard(raws["topk_ids"], spec, layout, 0, companions=raws)
            timings[kib]["decode_s"].append(time.perf_counter() - t0)
            arr = zarr.open_group(str(out), mode="r")["topk_ids"]
            starts = rng.integers(0, num_sequences // layout.chunk_seqs, size=8) * layout.chunk_seqs
            t0 = time.perf_counter()
            for s in starts:
                arr[int(s) : int(s) + layout.chunk_seqs]
            timings[kib]["zarr_chunk_read_ms"].append((time.perf_counter() - t0) / len(starts) * 1e3)

    summary_rows = []
    for kib, out in caches.items():
        manifest = fmt.load_manifest(out)
        topk_ids_bytes = sum(f["nbytes"] for f in manifest["shards"]["topk_ids"])
        tokens = num_sequences * args.seq_len
        decode_s = median(timings[kib]["decode_s"])
        shard_mib = shard_seqs * row_bytes / 2**20
        row = {
            "chunk_kib": kib,
            "chunk_seqs": manifest["chunk_seqs"],
            "topk_ids_bytes_per_token": round(topk_ids_bytes / tokens, 3),
            "total_bytes_per_token": round(manifest["stats"]["bytes_per_token"], 3),
            "shard_decode_ms": round(decode_s * 1e3, 2),
            "decode_mib_per_s": round(shard_mib / decode_s, 1),
            "zarr_random_chunk_read_ms": round(median(timings[kib]["zarr_chunk_read_ms"]), 3),
        }
        summary_rows.append(row)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    summary = {"benchmark": "bench_chunking", "quick": args.quick, "seq_len": args.seq_len, "topk": args.topk,
               "vocab_size": args.vocab_size, "shard_seqs": shard_seqs, "settings": summary_rows,
               "default_chunk_kib": 1024}
    write_results("bench_chunking" + ("_quick" if args.quick else ""), summary, rows)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
