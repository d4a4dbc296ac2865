"""``bench_build.py --engine ray``: the Ray engine's wall time over the local engine's on the same tokens.

In one run, on one local Ray session (all CPUs of the machine): ``--reps`` rounds, each building the same
tokens with the local engine, the Ray engine with 1 worker (torch threads = all cores, as the local build)
and with 2 workers (half the cores each), in a rotating order. The local build runs in its own fresh
subprocess (as each Ray actor is its own process), not in the benchmark process that holds the Ray driver
(``--threads`` does not reach it: it keeps torch's default, all cores). Ratios are medians over rounds of the
ratio within a round (slow drift of the machine cancels):

* ``ray_1_over_local`` — pipeline time (wall minus setup and manifest: the part that scales with the
  tokens); goal ≤ 1.05. ``ray_1_over_local_incl_setup`` includes starting the actors and loading the teacher
  in them (a fixed cost of seconds, which a real build amortizes over hours).
* ``scaling_2_over_1_workers`` — Ray 1-worker pipeline ÷ 2-worker pipeline (> 1: two workers are faster).

Every Ray build is checked identical (manifest shards) to the local build of its round.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cache_server import format as fmt
from cache_server.build.job import run_build
from cache_server.build.options import BuildOptions

__all__ = ["bench_engines"]

KINDS = (("local", "local", None), ("ray_1", "ray", 1), ("ray_2", "ray", 2))

# The local build in a fresh interpreter: BuildOptions kwargs as JSON in argv[1]; timings as JSON on stdout.
_LOCAL_CHILD = """
import json, sys
from cache_server.build.job import run_build
from cache_server.build.options import BuildOptions
res = run_build(BuildOptions(**json.loads(sys.argv[1])), log=lambda s: None)
print(json.dumps({"wall_s": res.wall_s, "setup_s": res.setup_s, "finalize_s": res.finalize_s}))
"""


def _run_local_subprocess(kwargs: dict, repo: Path) -> dict:
    """One local-engine build in its own Python process; its ``wall_s``/``setup_s``/``finalize_s``."""
    proc = subprocess.run([sys.executable, "-c", _LOCAL_CHILD, json.dumps(kwargs)], cwd=repo, capture_output=True,
                          text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"local build subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_engines(teacher_dir: Path, data_path: Path, seq_len: int, args, work: Path, repo: Path) -> dict:
    """Interleaved local / Ray 1 worker / Ray 2 workers builds of the same tokens; medians and ratios."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=100 * 1024**2,
             logging_level="WARNING")
    rows = []
    try:
        for rep in range(args.reps):
            order = KINDS[rep % len(KINDS):] + KINDS[: rep % len(KINDS)]
            row: dict = {"rep": rep, "order": ">".join(k[0] for k in order)}
            shards = {}
            for label, engine, workers in order:
                out = work / f"engines_{label}_{rep}"
                kwargs = dict(teacher=str(teacher_dir), data=str(data_path), out=str(out), topk=args.topk,
                              seq_len=seq_len, batch_size=args.batch_size, shard_seqs=args.shard_seqs,
                              progress=False, engine=engine, workers=workers, device=args.device, dtype=args.dtype)
                if engine == "local":
                    t = _run_local_subprocess(kwargs, repo)
                else:
                    res = run_build(BuildOptions(**kwargs), log=lambda s: None)
                    t = {"wall_s": res.wall_s, "setup_s": res.setup_s, "finalize_s": res.finalize_s}
                row[f"{label}_wall_s"] = t["wall_s"]
                row[f"{label}_setup_s"] = t["setup_s"]
                row[f"{label}_pipeline_s"] = t["wall_s"] - t["setup_s"] - t["finalize_s"]
                shards[label] = fmt.load_manifest(out)["shards"]
                shutil.rmtree(out)
            row["identical"] = all(s == shards["local"] for s in shards.values())
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  file=sys.stderr, flush=True)
    finally:
        ray.shutdown()

    def paired(num: str, den: str) -> float:
        return round(statistics.median(r[num] / r[den] for r in rows), 4)

    return {
        "ray_1_over_local": paired("ray_1_pipeline_s", "local_pipeline_s"),
        "ray_1_over_local_incl_setup": paired("ray_1_wall_s", "local_wall_s"),
        "scaling_2_over_1_workers": paired("ray_1_pipeline_s", "ray_2_pipeline_s"),
        "ray_2_over_local": paired("ray_2_pipeline_s", "local_pipeline_s"),
        "medians_s": {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0] if k.endswith("_s")},
        "all_identical_to_local": all(r["identical"] for r in rows),
        "reps": rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
