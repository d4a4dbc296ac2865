"""Read throughput of a k=32 cache: warm (decoded, page-cached) and cold (decode on first touch).

Every batch is materialized: copied into preallocated staging tensors as a training loader would (a lazy
view that is never touched would not count). Cold runs start from an empty decode directory with the stored
shard files dropped from the page cache (posix_fadvise DONTNEED) and readahead off; both modes run pinned to
one core. Modes are interleaved (cold, warm, cold, warm, ...) and medians reported. The same cache is also
written in format v1 (slots in canonical order, no delta filter) and read in the same rounds, so the cost of
format v2's decode (a per-position sort) is reported as a ratio measured under the same load
(``cold_v2_over_v1``, ``warm_v2_over_v1``; ``--no-v1`` skips it).

Usage::

    python benchmarks/bench_read.py --quick          # ~1M tokens
    python benchmarks/bench_read.py                  # ~8M tokens
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, write_fast_synthetic_cache, write_results  # noqa: E402
from cache_server import format as fmt  # noqa: E402
from kdlib.data.open import open_cache  # noqa: E402


def drop_from_page_cache(cache_dir: Path) -> None:
    for path in cache_dir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_v1_copy(cache_dir: Path, out_dir: Path, manifest: dict) -> Path:
    """The same cache in format version 1 (slots stored in canonical order, no delta filter), for the A/B."""
    import dataclasses

    layout = dataclasses.replace(fmt.layout_from_manifest(manifest), format_version=1)
    v2 = fmt.layout_from_manifest(manifest)
    fmt.create_arrays(out_dir, layout, attributes=fmt.group_attributes(layout))
    specs = {spec.name: spec for spec in v2.arrays()}
    shards = {name: [] for name in specs}
    for i in range(v2.num_shards):
        raws = {name: (cache_dir / fmt.shard_relpath(name, i, 1 + len(spec.trailing_shape))).read_bytes()
                for name, spec in specs.items()}
        arrays = {name: fmt.decode_shard(raws[name], spec, v2, i, companions=raws) for name, spec in specs.items()}
        for name, entry in fmt.write_shard(out_dir, layout, i, arrays).items():
            shards[name].append(entry)
    (out_dir / fmt.MANIFEST_NAME).write_bytes(fmt.manifest_bytes({**manifest, "format_version": 1, "shards": shards}))
    return out_dir


def read_all(cache_dir: Path, decode_dir: Path, batch_seqs: int, readahead: int) -> tuple[float, int]:
    """Read every sequence in batches, copying each batch into staging buffers; return (seconds, tokens)."""
    started = time.perf_counter()
    cache = open_cache(cache_dir, decode_dir=decode_dir, readahead=readahead)
    staging: dict[str, torch.Tensor] = {}
    tokens = 0
    for start in range(0, cache.num_sequences, batch_seqs):
        stop = min(start + batch_seqs, cache.num_sequences)
        batch = cache.read(start, stop)
        for name, tensor in batch.items():
            buf = staging.get(name)
            if buf is None:
                buf = staging[name] = torch.empty((batch_seqs, *tensor.shape[1:]), dtype=tensor.dtype)
            buf[: stop - start].copy_(tensor)
        tokens += (stop - start) * cache.seq_len
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--batch-seqs", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-loader", action="store_true", help="skip the loader throughput section")
    parser.add_argument("--no-v1", action="store_true", help="skip the format v1 copy read in the same rounds")
    args = parser.parse_args()
    num_sequences = 1024 if args.quick else 8192
    repeats = args.repeats or (3 if args.quick else 5)

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-read-"))
    cache_dir = work / "cache"
    print(f"writing synthetic cache: {num_sequences} x {args.seq_len} tokens, k={args.topk}, V={args.vocab_size}",
          file=sys.stderr)
    write_fast_synthetic_cache(cache_dir, num_sequences, args.seq_len, args.topk, args.vocab_size, temperatures=(2.0,))
    manifest = fmt.load_manifest(cache_dir)
    os.sync()  # a fresh cache's dirty pages would otherwise be written back during the first timed run

    # Correctness before timing: our decode-once path equals zarr's own read (zarr returns the stored form:
    # format v2 slots by ascending id, which slots.canonicalize puts back in canonical order).
    import warnings

    import zarr

    from cache_server.format import slots

    group = zarr.open_group(str(cache_dir), mode="r")
    with open_cache(cache_dir, decode_dir=work / "check") as check_cache:  # closing waits for readahead
        check = check_cache.read(5, 40)
    layout = fmt.layout_from_manifest(manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: "numcodecs codecs are not in the Zarr v3 specification"
        via_zarr = slots.canonicalize(layout, {spec.name: group[spec.name][5:40] for spec in layout.arrays()})
    for name, tensor in check.items():
        want = via_zarr[name]
        got = tensor.numpy()
        if got.dtype.kind in "iu":
            got = got.astype(np.int64)
            want = want.astype(np.int64)
        if not np.array_equal(got, want):
            raise SystemExit(f"correctness check failed for {name}")
    shutil.rmtree(work / "check")

    # The same data in format v1, read in the same interleaved rounds: the v2 decode's cost as a ratio.
    caches = {"v2": cache_dir}
    if not args.no_v1:
        caches["v1"] = write_v1_copy(cache_dir, work / "v1", manifest)
    rows = []
    tps: dict[tuple[str, str], list[float]] = {}
    decode_dir = work / "decoded"
    for rep in range(repeats):
        for version, directory in caches.items():
            shutil.rmtree(decode_dir, ignore_errors=True)
            drop_from_page_cache(directory)
            for mode in ("cold", "warm"):
                seconds, tokens = read_all(directory, decode_dir, args.batch_seqs, readahead=0)
                tps.setdefault((version, mode), []).append(tokens / seconds)
                rows.append({"format": version, "mode": mode, "repeat": rep, "seconds": seconds, "tokens": tokens,
                             "tokens_per_s": tokens / seconds})
            print(f"repeat {rep} {version}: cold {tps[version, 'cold'][-1] / 1e6:.2f}M tok/s, warm "
                  f"{tps[version, 'warm'][-1] / 1e6:.2f}M tok/s", file=sys.stderr)
    cold_tps, warm_tps = tps["v2", "cold"], tps["v2", "warm"]

    summary = {
        "benchmark": "bench_read",
        "quick": args.quick,
        "cache": {"num_sequences": num_sequences, "seq_len": args.seq_len, "topk": args.topk,
                  "vocab_size": args.vocab_size, "codec": manifest["codec"],
                  "bytes_per_token": round(manifest["stats"]["bytes_per_token"], 2)},
        "batch_seqs": args.batch_seqs,
        "cores": 1,
        "warm_tokens_per_s": round(median(warm_tps)),
        "cold_tokens_per_s": round(median(cold_tps)),
        "warm_target": 10_000_000,
        "cold_target": 2_000_000,
        "format_version": manifest["format_version"],
    }
    if "v1" in caches:
        summary["v1"] = {"warm_tokens_per_s": round(median(tps["v1", "warm"])),
                         "cold_tokens_per_s": round(median(tps["v1", "cold"]))}
        summary["cold_v2_over_v1"] = round(median(tps["v2", "cold"]) / median(tps["v1", "cold"]), 3)
        summary["warm_v2_over_v1"] = round(median(tps["v2", "warm"]) / median(tps["v1", "warm"]), 3)

    if not args.skip_loader:
        try:
            from benchmarks.loader_throughput import loader_throughput
        except ImportError as exc:
            summary["loader"] = f"unavailable: {exc}"
        else:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            cache = open_cache(cache_dir, decode_dir=decode_dir)
            summary["loader"] = loader_throughput(cache, batch_size=args.batch_seqs)

    write_results("bench_read" + ("_quick" if args.quick else ""), summary, rows)
    shutil.rmtree(work, ignore_errors=True) if args.workdir is None else None
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
