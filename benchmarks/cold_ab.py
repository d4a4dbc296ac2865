"""Before/after of the cold read path: two source trees read the same cache, interleaved, paired medians.

Shape notation::

    N  sequences (1,024)   T  positions per sequence (256)   K  top-k (32)   B  sequences per batch (8)

Each round runs, for each tree in turn (the order alternates), one fresh process with that tree first on
``sys.path``: it opens the cache over a fresh decode directory and reads one shuffled pass (warm-up: imports,
thread pools, what a benchmark's correctness pass leaves), then the measured cold pass (another fresh decode
directory: every shard checked, decoded and written), then a warm pass over the decoded copies. The cache is a
``write_fast_synthetic_cache`` one (V = 50,257, the default codec), written by the AFTER tree when missing; a
cache written by newer code must be readable by the older tree (format changes keep old readers working).
``after_over_before`` is the median over rounds of the per-round ratio of cold-pass seconds.

Usage (``git worktree add /tmp/before <rev>`` makes the before tree)::

    python benchmarks/cold_ab.py --before /tmp/before [--after .] [--shard-seqs 64] [--rounds 6] [--decode-threads 1]

Writes nothing under results/ by itself (``--out FILE.json`` does); the last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The child: one tree, one cache, one round -> one JSON line (kept as text so the child imports only its tree).
_CHILD = r"""
import json, shutil, sys, time
tree, cache, work, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, tree)
import torch
torch.set_num_threads(1)
import kdlib
ARRAYS = ["input_ids", "topk_ids", "topk_logprobs", "lse"]
options = {} if threads == "default" else {"decode_threads": int(threads)}

def one_pass(c):
    first, start, tokens = None, time.perf_counter(), 0
    for batch in kdlib.make_loader(c, 8, shuffle=True, seed=0, num_workers=0, drop_last=True, arrays=ARRAYS):
        first = time.perf_counter() - start if first is None else first
        tokens += batch["input_ids"].numel()
    return time.perf_counter() - start, first, tokens

with kdlib.open_cache(cache, decode_dir=work + "/warmup", **options) as c:
    one_pass(c)
start = time.perf_counter()
with kdlib.open_cache(cache, decode_dir=work + "/cold", **options) as c:
    cold_s, first_s, tokens = one_pass(c)
    if hasattr(c.store, "wait_writes"):
        c.store.wait_writes()  # copies written behind the pass count toward it
    cold_s = time.perf_counter() - start  # from the open, as a fresh node sees it, until every copy is on disk
    warm_s = one_pass(c)[0]
print(json.dumps({"cold_s": cold_s, "first_batch_s": first_s, "warm_s": warm_s, "tokens": tokens}))
"""


def _round(tree: Path, cache: Path, threads: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="cold-ab-") as work:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(tree), str(cache), work, threads],
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the pass in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the older source tree (a git worktree)")
    parser.add_argument("--after", type=Path, default=REPO, help="the newer source tree (default: this one)")
    parser.add_argument("--cache", type=Path, default=None, help="cache to read (default: written under --work)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kdcache-cold-ab")
    parser.add_argument("--shard-seqs", type=int, default=None, help="sequences per shard of the written cache")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--decode-threads", default="default", help="'default' or a positive integer")
    parser.add_argument("--out", type=Path, default=None, help="also write the summary and rows to this JSON file")
    args = parser.parse_args(argv)
    cache = args.cache
    if cache is None:
        cache = args.work / f"cache_s{args.shard_seqs or 'default'}"
        if not (cache / "manifest.json").exists():
            sys.path.insert(0, str(args.after))
            from benchmarks._common import write_fast_synthetic_cache

            chunk = min(64, args.shard_seqs) if args.shard_seqs else None
            write_fast_synthetic_cache(cache, 1024, 256, 32, 50257, shard_seqs=args.shard_seqs, chunk_seqs=chunk)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    rows = []
    for r in range(args.rounds):
        for name in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
            row = {"tree": name, "round": r, **_round(trees[name], cache, args.decode_threads)}
            rows.append(row)
            print(f"round {r} {name}: cold {1e3 * row['cold_s']:.0f} ms, first batch "
                  f"{1e3 * row['first_batch_s']:.0f} ms, warm {1e3 * row['warm_s']:.0f} ms", file=sys.stderr)
    by = {name: [row for row in rows if row["tree"] == name] for name in trees}

    def med(name: str, key: str) -> float:
        return round(1e3 * statistics.median(row[key] for row in by[name]), 1)

    summary = {
        "benchmark": "cold_ab", "cache": str(cache), "rounds": args.rounds, "decode_threads": args.decode_threads,
        "trees": {name: str(path) for name, path in trees.items()},
        **{f"{name}_{key}_ms": med(name, key) for name in trees for key in ("cold_s", "first_batch_s", "warm_s")},
        "after_over_before_cold": round(statistics.median(
            a["cold_s"] / b["cold_s"] for a, b in zip(by["after"], by["before"])), 3),
        "after_over_before_warm": round(statistics.median(
            a["warm_s"] / b["warm_s"] for a, b in zip(by["after"], by["before"])), 3),
        "loadavg_1min": round(os.getloadavg()[0], 2), "command": " ".join(sys.argv),
    }
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
