"""The loader half of the peers benchmark (issue 16): kdcache vs litdata (raw, zstd) vs mosaic streaming.

Shape notation::

    N  sequences   B  sequences per batch (8)   T  positions per sequence (256)   K  top-k (32)

The SAME arrays go into each system's own format: a kdcache cache (``write_fast_synthetic_cache``: top-32
over V = 50,257, format v2, the default blosc-zstd codec, the default shard planning; also the same cache
built with ``--codec blosc-lz4``, row ``kdcache_lz4``, checked to decode to the same values), then its decoded
arrays (``input_ids`` [N, T] uint16, ``topk_ids`` [N, T, K] uint16, ``topk_logprobs`` [N, T, K] float16,
``lse`` [N, T] float32, plus the sequence index) written sample by sample into a litdata dataset
(``BinaryWriter``, uncompressed and ``zstd``) and an MDS dataset (mosaicml-streaming, uncompressed).
Before timing, every batch of one shuffled pass of each peer is checked bit for bit against kdcache's
arrays at the sample's index.

Each system is then read as a training loop reads it: shuffled, B = 8, 0 workers, every batch delivered as
torch tensors. ``cold`` is the first pass over fresh directories (kdcache: an empty decode directory, so
the pass checks, decodes and writes every shard, and ends once every decoded copy is on disk; litdata: a
fresh dataset object and cache directory; mosaic: a fresh dataset after its shared memory is cleaned);
``warm`` is a second pass with the same object (kdcache: a new loader over the now-decoded directory).
Rounds are paired (every system, cold then warm, in each round; the order rotates) and medians reported;
``*_vs_litdata`` ratios are medians of the per-round ratios of the default-codec cache against the FASTER
litdata variant of that round (per variant, and for ``kdcache_lz4`` as ``{mode}_lz4_vs_{peer}``, in ``ratios``). ``kdcache_inline`` is the default cache read
with ``prefetch=0``: batches made in the training thread, as litdata and mosaic make theirs with 0 workers
(``kdcache``, the loader's default, makes them in a background thread, which overlaps a training step but
costs a thread hand-off per group of batches when there is no step; ratios ``{mode}_inline_vs_{peer}``).

Environment: litdata and mosaicml-streaming import torchvision, which does not import beside the
project's own CPU torch, so this runs from a separate venv::

    python3 -m venv /work/peers_venv
    /work/peers_venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/peers_venv/bin/pip install -e '.[build,server,triton,train,dev,peers]'
    /work/peers_venv/bin/python benchmarks/_peers_read.py --quick

``benchmarks/compare_peers.py`` imports :func:`read_rows` and :func:`read_ratios`; run standalone, the last
stdout line is a JSON object with ``cold_read_vs_litdata`` and ``warm_read_vs_litdata``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["read_rows", "read_ratios", "SEQ_LEN", "TOPK", "VOCAB_SIZE", "BATCH_SIZE"]

SEQ_LEN, TOPK, VOCAB_SIZE, BATCH_SIZE = 256, 32, 50257, 8
ARRAYS = ("input_ids", "topk_ids", "topk_logprobs", "lse")
_QUICK_SEQUENCES, _FULL_SEQUENCES = 1024, 4096


# ------------------------------------------------------------------------------------------------ the data
def _write_kdcache(work: Path, num_sequences: int, codec: str | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """The kdcache cache (``codec``: a format codec preset, default the format's) and its decoded arrays
    {name: [N, ...]} (what every peer stores)."""
    import kdlib
    from benchmarks._common import write_fast_synthetic_cache

    cache_dir = write_fast_synthetic_cache(work / f"kdcache_{codec or 'default'}", num_sequences, SEQ_LEN, TOPK,
                                           VOCAB_SIZE, codec=codec)
    with kdlib.open_cache(cache_dir, decode_dir=work / "truth_decoded") as cache:
        store = cache.store
        truth = {name: np.concatenate([np.asarray(store.get(name, s)) for s in range(cache.num_shards)])
                 for name in ARRAYS}
    shutil.rmtree(work / "truth_decoded")
    return cache_dir, truth


def _samples(truth: dict[str, np.ndarray]) -> Iterable[tuple[int, dict[str, Any]]]:
    for i in range(len(truth["input_ids"])):
        yield i, {"index": np.array([i], dtype=np.int64), **{name: truth[name][i] for name in ARRAYS}}


def _write_litdata(out: Path, truth: dict[str, np.ndarray], compression: str | None) -> Path:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out), chunk_bytes="64MB", compression=compression)
    for i, sample in _samples(truth):
        writer.add_item(i, sample)
    writer.done()
    writer.merge()
    return out


def _write_mds(out: Path, truth: dict[str, np.ndarray]) -> Path:
    from streaming import MDSWriter

    def column(name: str) -> str:
        a = truth[name]
        return f"ndarray:{a.dtype.name}:{','.join(str(d) for d in a.shape[1:])}"

    columns = {"index": "ndarray:int64:1", **{name: column(name) for name in ARRAYS}}
    with MDSWriter(out=str(out), columns=columns, compression=None, size_limit=1 << 26) as writer:
        for _, sample in _samples(truth):
            writer.write(sample)
    return out


# ------------------------------------------------------------------------------------------------ the readers
class _Pass:
    """One system's passes: ``cold()`` opens it over fresh directories and reads a pass; ``warm()`` reads
    another pass with what the cold pass left (both return an iterator of batches)."""

    def __init__(self, name: str, open_fresh: Callable[[Path], Any], iterate: Callable[[Any], Iterable[dict]]):
        self.name, self.open_fresh, self.iterate = name, open_fresh, iterate
        self.state: Any = None

    def cold(self, fresh: Path) -> Iterable[dict]:
        self.state = self.open_fresh(fresh)
        return self.iterate(self.state)

    def warm(self) -> Iterable[dict]:
        return self.iterate(self.state)


def _kdcache_pass(cache_dir: Path, name: str = "kdcache", prefetch: int = 2) -> _Pass:
    """``prefetch``: the loader's default 2 (batches made in a background thread, handed over in groups), or
    0 (made in this thread, as litdata and mosaic make theirs with 0 workers)."""
    import kdlib

    def open_fresh(fresh: Path) -> Any:
        return kdlib.open_cache(cache_dir, decode_dir=fresh)

    def iterate(cache: Any) -> Iterable[dict]:
        loader = kdlib.make_loader(cache, BATCH_SIZE, shuffle=True, seed=0, num_workers=0, drop_last=True,
                                   arrays=list(ARRAYS), prefetch=prefetch)
        for batch in loader:
            yield {"index": batch["sample_indices"], **{name: batch[name] for name in ARRAYS}}
        # Copies written behind the reads count toward the pass that decoded them (a pass ends with every
        # decoded copy on disk), so the warm pass after it does not share the machine with them.
        cache.store.wait_writes()

    return _Pass(name, open_fresh, iterate)


def _litdata_pass(name: str, data_dir: Path) -> _Pass:
    from litdata import StreamingDataLoader, StreamingDataset

    def open_fresh(fresh: Path) -> Any:
        dataset = StreamingDataset(str(data_dir), cache_dir=str(fresh), shuffle=True, seed=0)
        return StreamingDataLoader(dataset, batch_size=BATCH_SIZE, num_workers=0, drop_last=True)

    def iterate(loader: Any) -> Iterable[dict]:
        for batch in loader:
            yield {"index": batch["index"].reshape(-1), **{n: batch[n] for n in ARRAYS}}

    return _Pass(name, open_fresh, iterate)


def _mosaic_pass(data_dir: Path) -> _Pass:
    import torch
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    def open_fresh(fresh: Path) -> Any:
        previous = getattr(open_fresh, "dataset", None)
        if previous is not None:
            del open_fresh.dataset
            del previous
        clean_stale_shared_memory()
        dataset = StreamingDataset(local=str(data_dir), shuffle=True, shuffle_seed=0, batch_size=BATCH_SIZE)
        open_fresh.dataset = dataset
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=0, drop_last=True)

    def iterate(loader: Any) -> Iterable[dict]:
        for batch in loader:
            yield {"index": batch["index"].reshape(-1), **{n: batch[n] for n in ARRAYS}}

    return _Pass("mosaic", open_fresh, iterate)


# ------------------------------------------------------------------------------------------------ checks + timing
def _check_pass(system: str, batches: Iterable[dict], truth: dict[str, np.ndarray]) -> int:
    """Every value of every batch equals the truth at the sample's index; returns the sequences seen."""
    seen = 0
    for batch in batches:
        index = batch["index"].numpy().astype(np.int64)
        for name in ARRAYS:
            got = batch[name].numpy()
            want = truth[name][index]
            if got.dtype.kind in "iu":
                ok = np.array_equal(got.astype(np.int64), want.astype(np.int64))
            else:
                ok = np.array_equal(got.view(np.uint8), want.view(np.uint8)) if got.dtype == want.dtype else \
                    np.array_equal(got.astype(np.float64), want.astype(np.float64))
            if not ok:
                raise SystemExit(f"{system}: {name} of samples {index.tolist()} differ from the written arrays")
        seen += len(index)
    return seen


def _timed(batches: Iterable[dict]) -> tuple[float, int, float]:
    """(seconds, tokens, seconds to the first batch) of one pass; each batch is touched (one value per array)."""
    start = time.perf_counter()
    first_s, tokens, touch = None, 0, 0.0
    for batch in batches:
        if first_s is None:
            first_s = time.perf_counter() - start
        for name in ARRAYS:
            touch += float(batch[name].reshape(-1)[-1])
        tokens += int(batch["input_ids"].shape[0]) * SEQ_LEN
    return time.perf_counter() - start, tokens, first_s or 0.0


def read_rows(quick: bool, tmp_dir: str | Path, *, rounds: int | None = None) -> list[dict[str, Any]]:
    """Write the same top-32 data into every system, check it, time cold and warm passes in paired rounds.

    Args:
        quick: 1,024 sequences (262k tokens), 3 rounds; else 4,096 sequences, 5 rounds.
        tmp_dir: scratch directory (datasets and decode directories are written under it).
        rounds: override the number of paired rounds.

    Returns:
        One row per (system, mode, round): ``{"comparison": "loader", "system", "mode", "round", "seconds",
        "tokens", "tokens_per_s", "first_batch_s", "sequences", "batch_size", "seq_len", "topk", "vocab_size"}``.
    """
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="peers-read-", dir=tmp_dir))
    num_sequences = _QUICK_SEQUENCES if quick else _FULL_SEQUENCES
    rounds = rounds or (3 if quick else 5)
    cache_dir, truth = _write_kdcache(work, num_sequences)
    lz4_dir, lz4_truth = _write_kdcache(work, num_sequences, codec="blosc-lz4")
    if any(not np.array_equal(lz4_truth[name], truth[name]) for name in ARRAYS):
        raise SystemExit("the blosc-lz4 kdcache cache decodes to other values than the default one")
    systems = [_kdcache_pass(cache_dir), _kdcache_pass(lz4_dir, "kdcache_lz4"),
               _kdcache_pass(cache_dir, "kdcache_inline", prefetch=0),
               _litdata_pass("litdata_raw", _write_litdata(work / "litdata_raw", truth, None)),
               _litdata_pass("litdata_zstd", _write_litdata(work / "litdata_zstd", truth, "zstd")),
               _mosaic_pass(_write_mds(work / "mds", truth))]
    expected = num_sequences // BATCH_SIZE * BATCH_SIZE
    for system in systems:  # correctness before timing
        seen = _check_pass(system.name, system.cold(work / f"check_{system.name}"), truth)
        if seen != expected:
            raise SystemExit(f"{system.name}: a pass gave {seen} sequences, expected {expected}")
    rows = []
    common = {"comparison": "loader", "sequences": num_sequences, "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN,
              "topk": TOPK, "vocab_size": VOCAB_SIZE, "workers": 0, "shuffle": True}
    for r in range(rounds):
        for system in systems[r % len(systems):] + systems[: r % len(systems)]:
            fresh = work / f"fresh_{system.name}_{r}"
            for mode in ("cold", "warm"):
                seconds, tokens, first_s = _timed(system.cold(fresh) if mode == "cold" else system.warm())
                rows.append({**common, "system": system.name, "mode": mode, "round": r, "seconds": round(seconds, 4),
                             "tokens": tokens, "tokens_per_s": round(tokens / seconds),
                             "first_batch_s": round(first_s, 4)})
            shutil.rmtree(fresh, ignore_errors=True)
            print(f"round {r} {system.name}: " + ", ".join(
                f"{row['mode']} {row['tokens_per_s'] / 1e6:.2f}M tok/s" for row in rows[-2:]), file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def read_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (system, mode) and kdcache's per-round ratios against litdata (the faster variant)."""
    by = {}
    for row in rows:
        by.setdefault((row["system"], row["mode"]), {})[row["round"]] = row["tokens_per_s"]
    medians = {f"{system}_{mode}_tokens_per_s": round(statistics.median(v.values())) for (system, mode), v in by.items()}
    ratios: dict[str, float] = {}
    for mode in ("cold", "warm"):
        ours = by[("kdcache", mode)]
        variants = {"kdcache": "", "kdcache_lz4": "lz4_", "kdcache_inline": "inline_"}
        for us, variant in [(u, v) for u in variants for v in ("litdata_raw", "litdata_zstd", "mosaic")]:
            mine, theirs = by.get((us, mode), {}), by.get((variant, mode), {})
            paired = [mine[r] / theirs[r] for r in mine if r in theirs]
            if paired:
                ratios[f"{mode}_{variants[us]}vs_{variant}"] = round(statistics.median(paired), 3)
        best = [ours[r] / max(by[("litdata_raw", mode)][r], by[("litdata_zstd", mode)][r]) for r in ours]
        ratios[f"{mode}_read_vs_litdata"] = round(statistics.median(best), 3)
    return {"cold_read_vs_litdata": ratios.pop("cold_read_vs_litdata"),
            "warm_read_vs_litdata": ratios.pop("warm_read_vs_litdata"), "ratios": ratios, "medians": medians}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks._common import write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,024 sequences, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--tmp-dir", default=None, help="scratch directory (default: the system's)")
    args = parser.parse_args(argv)
    rows = read_rows(args.quick, args.tmp_dir or tempfile.gettempdir(), rounds=args.rounds)
    summary = {"benchmark": "peers_read", "quick": args.quick, **read_ratios(rows)}
    write_results("peers_read" + ("_quick" if args.quick else ""), summary, rows)
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
