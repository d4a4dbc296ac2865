"""The measurable parts of docs/SCALE.md, run here: Ray scheduling cost per shard, and manifest size/load cost.

1. ``ray``: the Ray engine (2 workers) over ``--shards`` (10,000) tiny shards (1 sequence of ``--seq-len`` 16
   tokens each, a tiny CPU teacher: tests.teachers.TinyLM, vocab 50, top-4), and, over ``--compare-shards``
   (1,000) such shards, the local engine against the Ray engine with 1 and 2 workers (identical caches).
   ``per_shard_ms`` is pipeline time (wall minus setup and manifest) per shard; ``ray_overhead_per_shard_ms``
   = (Ray 1 worker − local) per shard, what the driver round trip + actor call add to each shard when the
   work itself is almost nothing; ``driver_cpu_per_shard_ms`` is the driver process's CPU per shard. A real
   shard (32 MiB of top-k ids, ~16 k sequences of 2048 tokens at k=32) takes minutes of GPU time, so
   this overhead is what bounds the number of shards a driver can schedule, not the build's speed.
2. ``manifest``: synthesized manifests of a top-32 cache (T 2048, V 32,000 as Llama-2-7B, the planner's shard size)
   with 10 k and 100 k shards, assembled by ``build/assemble.py`` and serialized by the format module's own
   writer (``format.manifest_bytes``): file size, and ``format.load_manifest`` (read + parse + the one
   validation) time (median of ``--reps``) and memory (tracemalloc peak during the load; the loaded dict).

Last stdout line: one JSON object; also written to ``benchmarks/results/scale_sim[_TAG].json``.

Usage::

    python benchmarks/scale_sim.py                       # 10,000 shards, manifests at 10 k and 100 k
    python benchmarks/scale_sim.py --shards 1000 --tag quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_info  # noqa: E402
from cache_server import format as fmt  # noqa: E402
from cache_server.build.assemble import manifest_from_entries  # noqa: E402
from cache_server.build.job import run_build  # noqa: E402
from cache_server.build.options import BuildOptions  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def _build_row(label: str, res, shards: int) -> dict:
    pipeline_s = res.wall_s - res.setup_s - res.finalize_s
    return {"engine": label, "shards": shards, "wall_s": round(res.wall_s, 2), "setup_s": round(res.setup_s, 2),
            "pipeline_s": round(pipeline_s, 2), "finalize_s": round(res.finalize_s, 2),
            "per_shard_ms": round(1e3 * pipeline_s / shards, 3), "shards_per_s": round(shards / pipeline_s, 1),
            "driver_cpu_s": round(res.process_cpu_s, 2),
            "driver_cpu_per_shard_ms": round(1e3 * res.process_cpu_s / shards, 3)}


def _ray_part(args, work: Path) -> dict:
    import ray
    import torch
    from tests.teachers import save_factory_teacher

    teacher = save_factory_teacher(work / "tiny.safetensors", seed=0)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=100 * 1024**2,
             logging_level="WARNING")
    runs = [("local", "local", None, args.compare_shards), ("ray_1_worker", "ray", 1, args.compare_shards),
            ("ray_2_workers", "ray", 2, args.compare_shards), ("ray_2_workers", "ray", 2, args.shards)]
    rows, outputs = [], {}
    try:
        for label, engine, workers, shards in runs:
            data = work / f"tokens_{shards}.npy"
            if not data.exists():  # the same rows for every run of this size
                np.save(data, np.random.default_rng(0).integers(0, 50, size=(shards, args.seq_len)))
            out = work / f"{label}_{shards}"
            res = run_build(BuildOptions(
                teacher=str(teacher), model_factory="tests.teachers:tiny_lm_factory", data=str(data),
                out=str(out), topk=4, seq_len=args.seq_len, shard_seqs=1, chunk_seqs=1, batch_size=1,
                progress=False, space_check=False, engine=engine, workers=workers), log=lambda s: None)
            rows.append(_build_row(label, res, shards))
            outputs[(label, shards)] = fmt.load_manifest(out)["shards"]
            shutil.rmtree(out)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    by = {(r["engine"], r["shards"]): r for r in rows}
    local, one, two = (by[(k, args.compare_shards)] for k in ("local", "ray_1_worker", "ray_2_workers"))
    return {
        "teacher": "tests.teachers.TinyLM (vocab 50, hidden 16), top-4, 1 sequence of "
                   f"{args.seq_len} tokens per shard, batch 1",
        "rows": rows,
        "identical_to_local": all(outputs[(k, args.compare_shards)] == outputs[("local", args.compare_shards)]
                                  for k in ("ray_1_worker", "ray_2_workers")),
        "ray_overhead_per_shard_ms": round(one["per_shard_ms"] - local["per_shard_ms"], 3),
        "ray_2_over_1_worker_speedup": round(one["pipeline_s"] / two["pipeline_s"], 3),
        "torch_threads_driver": torch.get_num_threads(),
    }


def _synthetic_manifest(num_shards: int, seq_len: int, topk: int, vocab: int) -> tuple[dict, fmt.CacheLayout]:
    """The manifest of a top-k cache of ``num_shards`` planner-sized shards (random checksums, plausible sizes)."""
    shard_seqs, chunk_seqs = fmt.plan_chunking(seq_len, topk, vocab)
    layout = fmt.CacheLayout(num_sequences=num_shards * shard_seqs, seq_len=seq_len, topk=topk, vocab_size=vocab,
                             shard_seqs=shard_seqs, chunk_seqs=chunk_seqs)
    rng = np.random.default_rng(0)
    positions = shard_seqs * seq_len
    names = [spec.name for spec in layout.arrays()]
    entries = []
    for i in range(num_shards):
        files = {name: {"sha256": hashlib.sha256(f"{name}/{i}".encode()).hexdigest(),
                        "nbytes": int(rng.integers(1 << 20, 1 << 26))} for name in names}
        stats = {"positions": positions, "sequences": shard_seqs, "tail_mass_sum": 0.05 * positions,
                 "seq_entropy_sum": 2.0 * shard_seqs, "seq_nll_sum": 2.5 * shard_seqs,
                 "input_ids_sha256": hashlib.sha256(str(i).encode()).hexdigest()}
        entries.append({"shard": i, "files": files, "stats": stats})
    settings = {"teacher": {"kind": "transformers", "weights_sha256": {}}, "data_fingerprint": "sha256:0"}
    return manifest_from_entries(layout, settings, {}, entries), layout


def _manifest_part(args, work: Path) -> list[dict]:
    rows = []
    for num_shards in args.manifest_shards:
        manifest, layout = _synthetic_manifest(num_shards, 2048, 32, 32_000)
        cache = work / f"manifest_{num_shards}"
        cache.mkdir()
        t0 = time.perf_counter()
        raw = fmt.manifest_bytes(manifest)
        (cache / fmt.MANIFEST_NAME).write_bytes(raw)
        write_s = time.perf_counter() - t0
        del manifest
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            loaded = fmt.load_manifest(cache)
            times.append(time.perf_counter() - t0)
            del loaded
        tracemalloc.start()
        loaded = fmt.load_manifest(cache)
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert fmt.layout_from_manifest(loaded).num_shards == num_shards
        rows.append({"shards": num_shards, "arrays": len(list(layout.arrays())), "shard_seqs": layout.shard_seqs,
                     "tokens": layout.num_sequences * layout.seq_len, "manifest_bytes": len(raw),
                     "manifest_mib": round(len(raw) / 2**20, 2), "serialize_write_s": round(write_s, 3),
                     "load_s_median": round(statistics.median(times), 3), "load_s_all": [round(t, 3) for t in times],
                     "loaded_dict_mib": round(current / 2**20, 1), "load_peak_mib": round(peak / 2**20, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del loaded
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=10_000, help="tiny shards of the long Ray run (0 skips the Ray part)")
    ap.add_argument("--compare-shards", type=int, default=1_000,
                    help="tiny shards of the local vs Ray 1 vs Ray 2 workers comparison")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--manifest-shards", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    machine = machine_info()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    work = Path(tempfile.mkdtemp(prefix="kdcache_scale_sim_"))
    wall0 = time.perf_counter()
    try:
        summary = {"bench": "scale_sim", "manifest": _manifest_part(args, work)}
        if args.shards:
            summary["ray"] = _ray_part(args, work)
        summary.update(bench_wall_s=round(time.perf_counter() - wall0, 1),
                       machine={**machine, "loadavg_1_5_15min_end": [round(x, 2) for x in os.getloadavg()]},
                       command=command)
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = "scale_sim" + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
