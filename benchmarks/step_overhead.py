"""Training-step overhead of offline KD from a cache versus plain cross-entropy, in one interleaved run.

Shape notation::

    B  sequences per batch   T  positions per sequence   V  vocabulary   K  cached top-k

One small GPT student (default 4 layers, d_model 256, V 8192, T 256, B 8) alternates several kinds of training
step on the same model and optimizer, after a warm-up, in ABBA order (so drift hits every mode equally):

* ``ce``: tokens from a plain in-memory array [N, T] → student → ``F.cross_entropy`` → backward → AdamW.
* ``ce_loader``: the same CE step, but its tokens and labels come from the local cache via ``kdlib.make_loader``
  (the loader's whole cost, no KD loss): ``loader_overhead_ratio = median(ce_loader) / median(ce)``.
* ``kd``: tokens from the local cache via ``kdlib.make_loader`` (shard-aware shuffle, background prefetch) →
  student → ``distill_loss`` (alignment check + ``kd_loss`` fused with CE, ``ce_weight``) → backward → AdamW.
* ``kd_http`` (``--http``): like ``kd`` but the cache is read through the HTTP server (``tests/serverproc.py``),
  from a fresh local shard directory (nothing fetched or decoded before timing) limited to
  ``3 * shuffle_window_shards`` shards (smaller than the cache, so a longer run fetches shards again every
  epoch). The loader fetches and decodes the next shuffle window in the background; ``http_requests_timed``
  counts the HTTP requests made while the timed steps ran (the JSON shows that traffic happened).

Each step's wall time includes fetching its batch. Reported: per-mode medians and the headline
``overhead_ratio = median(kd) / median(ce)`` (target ≤ 1.02), in wall time and in process CPU time (all threads,
including the loader's prefetch threads; steadier than wall time on a shared machine, whose load average is
recorded). Correctness is checked before timing: the batches hold the cache's tokens, the KD step's loss equals
``kdlib.kd_loss`` computed directly on widened copies of the same batch, and the HTTP reader returns the local
cache's bytes.

Usage::

    python benchmarks/step_overhead.py --quick            # ~1 min on 2 CPU cores
    python benchmarks/step_overhead.py                     # longer; CUDA when present
    python benchmarks/step_overhead.py --quick --http      # adds the HTTP-server mode

Writes ``benchmarks/results/step_overhead{_quick}.{json,csv,png}``; the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kdlib  # noqa: E402
from benchmarks._common import machine_info, write_fast_synthetic_cache  # noqa: E402
from cache_server import format as fmt  # noqa: E402
from kdlib.alignment import shift_labels  # noqa: E402
from kdlib.integrations import distill_loss  # noqa: E402
from kdlib.loader import epoch_order, move_batch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------------- steps


def build_student(V: int, T: int, layers: int, d_model: int, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=d_model, n_head=max(1, d_model // 64), vocab_size=V,
                        n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).to(device)


def cycle(loader) -> Iterator[dict]:
    while True:
        yield from loader


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(model, optimizer, tokens: torch.Tensor, kd_batches: dict[str, Iterator[dict]], order: np.ndarray,
               batch_size: int, kd_kwargs: dict[str, Any], device: torch.device,
               ce_batches: Iterator[dict] | None = None) -> dict[str, Callable[[], float]]:
    """One closure per mode; each runs one full training step and returns its loss."""
    ce_position = [0]

    def ce_step() -> float:
        start = ce_position[0] % (len(order) - len(order) % batch_size)
        ce_position[0] += batch_size
        input_ids = tokens[order[start: start + batch_size]].to(device, non_blocking=True)  # [B, T] int64
        labels = shift_labels(input_ids)
        logits = model(input_ids=input_ids).logits  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def ce_loader_step() -> float:
        batch = move_batch(next(ce_batches), device)  # tokens [B, T] int64 and labels [B, T] from the cache loader
        logits = model(input_ids=batch["input_ids"]).logits  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def kd_step_for(batches: Iterator[dict]) -> Callable[[], float]:
        def kd_step() -> float:
            batch = move_batch(next(batches), device)
            logits = model(input_ids=batch["input_ids"]).logits  # [B, T, V]
            loss = distill_loss(logits, batch, **kd_kwargs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return kd_step

    steps = {"ce": ce_step}
    if ce_batches is not None:
        steps["ce_loader"] = ce_loader_step
    for name, batches in kd_batches.items():
        steps[name] = kd_step_for(batches)
    return steps


def check_correctness(model, cache, kd_kwargs: dict[str, Any], device: torch.device, tokens: torch.Tensor) -> float:
    """The KD step's loss equals kd_loss on widened copies of the same batch; the batch holds the cache tokens."""
    loader = kdlib.make_loader(cache, 4, seed=123, prefetch=0)
    batch = move_batch(next(iter(loader)), device)
    idx = batch["sample_indices"].cpu()
    if not torch.equal(batch["input_ids"].cpu(), tokens[idx]):
        raise RuntimeError("loader batch tokens differ from the cache's input_ids")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        via_step = distill_loss(logits, batch, **kd_kwargs)
        direct = kdlib.kd_loss(
            logits, batch["topk_ids"].long(), batch["topk_logprobs"].float(), labels=shift_labels(tokens[idx]).to(device),
            teacher_lse=batch["lse"].float(), **kd_kwargs)
        reference = kdlib.losses.kd_loss_reference(
            logits.double(), batch["topk_ids"].long(), batch["topk_logprobs"].double(),
            labels=batch["labels"], teacher_lse=batch["lse"].double(), **kd_kwargs)
    err = max(abs(float(via_step) - float(direct)), abs(float(via_step) - float(reference)))
    if not err <= 1e-3 * max(1.0, abs(float(reference))):
        raise RuntimeError(f"KD step loss {float(via_step)} != direct kd_loss {float(direct)} / reference "
                           f"{float(reference)}")
    return err


def http_cache(cache_dir: Path, stack: contextlib.ExitStack, decode_dir: Path, max_decoded_bytes: int):
    """Serve the cache with the project's server (tests/serverproc.py) and open it by URL, with an empty local
    shard directory of ``max_decoded_bytes`` (nothing is fetched or decoded before timing)."""
    from tests.serverproc import ServerProcess

    server = stack.enter_context(ServerProcess([str(cache_dir)], token_dir=decode_dir.parent))
    return kdlib.open_cache(server.cache_url(cache_dir.name), decode_dir=decode_dir,
                            max_decoded_bytes=max_decoded_bytes)


def check_http_bytes(remote, cache) -> None:
    """The HTTP reader returns exactly the local cache's arrays (one sequence; fetches a few shards)."""
    got, want = remote.read(0, 1), cache.read(0, 1)
    for name, value in want.items():
        if not torch.equal(got[name], value):
            raise RuntimeError(f"HTTP reader's {name} differs from the local cache's")


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps on CPU (a minute on 2 cores)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (quick 16, full 100)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (quick 3, full 10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=None, help="cache size (quick 256, full 2048)")
    parser.add_argument("--shard-seqs", type=int, default=16,
                        help="sequences per shard (small, so the quick run crosses several shuffle windows)")
    parser.add_argument("--window-shards", type=int, default=4, help="loader shuffle_window_shards")
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--device", default=None, help="default: cuda when available (full mode), else cpu")
    parser.add_argument("--http", action="store_true", help="also time a mode reading through the HTTP server")
    parser.add_argument("--cache-dir", type=Path, default=None, help="reuse/write the cache here (default: tmp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    quick = args.quick
    steps = args.steps or (16 if quick else 100)
    warmup = args.warmup if args.warmup is not None else (3 if quick else 10)
    N = args.sequences or (256 if quick else 2048)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not quick else "cpu"))
    B, T, V, K = args.batch_size, args.seq_len, args.vocab, args.topk
    kd_kwargs = {"ce_weight": args.ce_weight, "kd_weight": args.kd_weight}
    tag = "step_overhead_quick" if quick else "step_overhead"
    args.out.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kd_step_overhead_")))
        cache_dir = args.cache_dir or tmp / "cache"
        t0 = time.perf_counter()
        if not (cache_dir / fmt.MANIFEST_NAME).exists():
            # overwrite=False: a --cache-dir holding another cache is refused, not replaced
            write_fast_synthetic_cache(cache_dir, N, T, K, V, shard_seqs=args.shard_seqs,
                                       chunk_seqs=min(8, args.shard_seqs), overwrite=False)
        cache = kdlib.open_cache(cache_dir, decode_dir=tmp / "decoded")
        if (cache.seq_len, cache.topk, cache.vocab_size) != (T, K, V):
            raise SystemExit(f"--cache-dir holds T={cache.seq_len} K={cache.topk} V={cache.vocab_size}, not the "
                             f"requested T={T} K={K} V={V}")
        cache.prepare()
        print(f"cache: {cache} written+decoded in {time.perf_counter() - t0:.1f}s at {cache_dir}", file=sys.stderr)
        tokens = cache.read(0, cache.num_sequences, arrays=["input_ids"])["input_ids"].to(torch.int64)  # [N, T]

        model = build_student(V, T, args.layers, args.d_model, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        err = check_correctness(model, cache, kd_kwargs, device, tokens)
        print(f"correctness: KD step loss == kd_loss on the same batch (|diff| {err:.2e})", file=sys.stderr)

        order = epoch_order(cache.num_sequences, cache.shard_seqs, shuffle=True, seed=0, epoch=0)
        loader_kwargs = dict(seed=0, shuffle=True, num_workers=0, prefetch=2, pin_memory=device.type == "cuda",
                             shuffle_window_shards=args.window_shards)
        kd_batches = {"kd": cycle(kdlib.make_loader(cache, B, **loader_kwargs))}
        ce_batches = cycle(kdlib.make_loader(cache, B, **loader_kwargs))
        http_note = None
        remote = None
        http: dict[str, Any] = {}
        if args.http:
            if not (REPO / "tests" / "serverproc.py").exists():
                http_note = "tests/serverproc.py does not exist yet: HTTP mode skipped"
            else:
                decoded_per_shard = cache.store.decoded_bytes() / cache.num_shards
                shard_cache_shards = min(cache.num_shards - 1, 3 * args.window_shards)
                http["max_decoded_bytes"] = int(decoded_per_shard * (shard_cache_shards + 0.5))
                http["cache_decoded_bytes"] = cache.store.decoded_bytes()
                # A fresh directory per run and no prepare(): the timed steps fetch what they read.
                remote = http_cache(cache_dir, stack, tmp / f"shards_http_{os.getpid()}_{time.time_ns()}",
                                    http["max_decoded_bytes"])
                check_http_bytes(remote, cache)
                kd_batches["kd_http"] = cycle(kdlib.make_loader(remote, B, **loader_kwargs))
        steps_by_mode = make_steps(model, optimizer, tokens, kd_batches, order, B, kd_kwargs, device, ce_batches)
        modes = list(steps_by_mode)

        times: dict[str, list[float]] = {m: [] for m in modes}
        cpu_times: dict[str, list[float]] = {m: [] for m in modes}  # all threads of this process
        load_before = os.getloadavg()
        rows = []
        total = warmup + steps
        from tqdm import tqdm

        for i in tqdm(range(total), desc="steps", unit="round", file=sys.stderr):
            if remote is not None and i == warmup:
                http_start = dict(remote.source.stats)
                evicted_start = remote.store.evicted
            round_modes = modes if i % 2 == 0 else modes[::-1]  # ABBA: drift hits every mode alike
            for mode in round_modes:
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                loss = steps_by_mode[mode]()
                float(loss)  # the step is done when its loss is known
                synchronize(device)
                elapsed_s = time.perf_counter() - start
                cpu_s = time.process_time() - start_cpu
                if i >= warmup:
                    times[mode].append(elapsed_s)
                    cpu_times[mode].append(cpu_s)
                    rows.append({"round": i - warmup, "mode": mode, "step_s": elapsed_s, "cpu_s": cpu_s,
                                 "loss": float(loss)})
        if remote is not None:
            # Requests of every thread of this process (the loader's producer and the shard-prefetch threads)
            # while the timed rounds ran.
            http["http_requests_timed"] = remote.source.stats["requests"] - http_start["requests"]
            http["http_bytes_timed"] = remote.source.stats["bytes"] - http_start["bytes"]
            http["http_retries_timed"] = remote.source.stats["retries"] - http_start["retries"]
            http["shards_evicted_timed"] = remote.store.evicted - evicted_start
            http["http_requests_total"] = remote.source.stats["requests"]
            remote.close()

    load_after = os.getloadavg()
    medians = {m: statistics.median(v) for m, v in times.items()}
    cpu_medians = {m: statistics.median(v) for m, v in cpu_times.items()}
    summary: dict[str, Any] = {
        "benchmark": "step_overhead",
        "quick": quick,
        "device": str(device),
        "machine": machine_info(device),
        "student": {"arch": "gpt2", "layers": args.layers, "d_model": args.d_model, "vocab": V},
        "batch_size": B, "seq_len": T, "topk": K, "cache_sequences": N, "shard_seqs": cache.shard_seqs,
        "shuffle_window_shards": args.window_shards,
        "warmup_steps": warmup, "timed_steps_per_mode": steps,
        "kd_kwargs": kd_kwargs,
        **{f"{m}_median_s": round(v, 5) for m, v in medians.items()},
        "overhead_ratio": round(medians["kd"] / medians["ce"], 4),
        "loader_overhead_ratio": round(medians["ce_loader"] / medians["ce"], 4),
        **{f"{m}_cpu_median_s": round(v, 5) for m, v in cpu_medians.items()},
        "overhead_ratio_cpu_time": round(cpu_medians["kd"] / cpu_medians["ce"], 4),
        "loader_overhead_ratio_cpu_time": round(cpu_medians["ce_loader"] / cpu_medians["ce"], 4),
        # Noise on a shared machine only adds time: the per-round paired ratio (kd and ce ran back to back) and
        # the ratio of minima are robust views of the same quantity.
        "overhead_ratio_paired_median": round(statistics.median(
            k / c for k, c in zip(times["kd"], times["ce"])), 4),
        "overhead_ratio_of_minima": round(min(times["kd"]) / min(times["ce"]), 4),
        "load_avg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "target_ratio": 1.02,
        "published_best_ratio": 1.074,
        "correctness_abs_err": err,
    }
    if "kd_http" in medians:
        summary["http_overhead_ratio"] = round(medians["kd_http"] / medians["ce"], 4)
        summary["http_overhead_ratio_cpu_time"] = round(cpu_medians["kd_http"] / cpu_medians["ce"], 4)
        summary.update(http)
    if http_note:
        summary["http_note"] = http_note
    summary["command"] = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO),
                                                                         *(argv if argv is not None else sys.argv[1:])])

    (args.out / f"{tag}.json").write_text(json.dumps({**summary, "steps": rows}, indent=1) + "\n")
    with open(args.out / f"{tag}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["round", "mode", "step_s", "cpu_s", "loss"])
        writer.writeheader()
        writer.writerows(rows)
    plot(times, cpu_times, summary, args.out / f"{tag}.png")
    print(f"wrote {args.out / tag}.{{json,csv,png}}", file=sys.stderr)
    print(json.dumps(summary))
    return summary


def plot(times: dict[str, list[float]], cpu_times: dict[str, list[float]], summary: dict[str, Any],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series, label, ratio in ((axes[0], times, "wall", summary["overhead_ratio"]),
                                     (axes[1], cpu_times, "process CPU", summary["overhead_ratio_cpu_time"])):
        for mode, values in series.items():
            line, = ax.plot(range(len(values)), [v * 1e3 for v in values], marker="o", ms=3, lw=1, label=mode)
            ax.axhline(statistics.median(values) * 1e3, color=line.get_color(), ls="--", lw=1)
        ax.set_xlabel("timed round (modes interleaved ABBA)")
        ax.set_ylabel(f"training step {label} time (ms)")
        ax.set_title(f"{label} time: KD/CE median ratio {ratio:.3f}", fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"KD-from-cache vs CE step, {summary['device']}, B={summary['batch_size']} T={summary['seq_len']} "
                 f"V={summary['student']['vocab']} K={summary['topk']} (dashed: medians)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
