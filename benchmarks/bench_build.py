"""Benchmark `kdcache build`: overhead over a bare teacher forward, and bytes/token per codec.

Measures, in one run:

1. ``overhead_ratio``: build wall time ÷ bare teacher forward time over the same tokens and batches, for
   a teacher of realistic proportions (headline: a GPT-2-small-shaped random-init Llama, hidden 768,
   12 layers, 12 heads, vocab 50,257) and, as a labelled secondary row, a small teacher (hidden 256,
   4 layers) whose vocabulary work is unrealistically large next to its body (``teachers`` in the JSON).
   Per teacher, ``--reps`` rounds each run a bare forward pass, a full build into a fresh directory and a
   targets-only pass (forward + ``compute_targets``, no writer), in a rotating order; every ratio is the
   median over rounds of the ratio within a round (``ratios_of_medians`` has median ÷ median). The
   build's pipeline time excludes its one-off setup (hashing weights/data, loading the teacher), reported
   separately (``overhead_ratio_incl_setup``). ``targets_only_ratio`` and
   ``writer_overhead_vs_targets_only`` split the overhead into the math and the background writer.
   A fourth kind in the same rotation builds a SAMPLED cache (``--targets sample --samples N``, default 32)
   of the same tokens: ``overhead_ratio_sampled`` (its pipeline ÷ bare forward; issue 10 target ≤ 1.05)
   and ``sampled_vs_topk_build`` (÷ the top-k build of the same round).
   Timed builds write a shard every ``--shard-seqs`` sequences so that shard writes overlap the forward
   as in a real build (a real build's default shard is thousands of sequences, far more than a quick
   pass); ``drain_s`` is the wait for the last shard after the last forward.
2. ``bytes_per_token`` at k=32 with vocab 50,257 (random-init small Llama, default chunking), per codec
   preset, plus lossless transforms evaluated on the same arrays (fp16 logprob bit patterns delta-coded
   along K, bitshuffle).
3. The same for a tiny Llama TRAINED for ``--train-s`` seconds on stdlib source (vocab of a BPE tokenizer
   trained on the same text, noted in the output), because random-init teachers compress unlike trained ones.

Correctness is checked before timing (cache vs direct torch computation on the first sequences).
Last stdout line: one JSON object. Results (JSON + CSV with the command line and machine info) go to
``benchmarks/results/bench_build*``.

Usage::

    python benchmarks/bench_build.py --quick
    python benchmarks/bench_build.py --sequences 256 --reps 5 --threads 1
    python benchmarks/bench_build.py --quick --hidden 256 --layers 4 --heads 4 --kv-heads 2 --small-hidden 0
    python benchmarks/bench_build.py --engine ray --quick --reps 3   # Ray engine vs local (_bench_ray.py)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_info, train_for_seconds  # noqa: E402
from cache_server import format as fmt  # noqa: E402
from cache_server.build.job import run_build  # noqa: E402
from cache_server.build.options import BuildOptions  # noqa: E402
from cache_server.build.targets import compute_targets  # noqa: E402
from tests.teachers import stdlib_documents, train_tokenizer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def _tokenize_stdlib(tok_dir: Path, max_chars: int) -> np.ndarray:
    from cache_server.build.sources import load_tokenizer

    tok = load_tokenizer(tok_dir)
    docs = stdlib_documents(max_files=400, max_chars=max_chars)
    ids = []
    for enc in tok.tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids + [tok.eos_id])
    return np.asarray(ids, dtype=np.int64)


def _llama(vocab: int, hidden: int, layers: int, seed: int, heads: int | None = None, kv_heads: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = heads or max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or max(1, hidden // 128),
        max_position_embeddings=1024, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously): timings end when the work ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_ids(sequences: np.ndarray, b0: int, batch_size: int, device: torch.device) -> torch.Tensor:
    ids = torch.from_numpy(np.array(sequences[b0 : b0 + batch_size], dtype=np.int64))  # [B, T]
    return ids.to(device, non_blocking=True)


def _bare_forward(model, sequences: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Wall and process-CPU seconds of the teacher forward alone over all batches (logits discarded)."""
    device = _device_of(model)
    _sync(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b0 in range(0, len(sequences), batch_size):
            model(input_ids=_batch_ids(sequences, b0, batch_size, device), use_cache=False).logits
    _sync(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def _check_correct(cache: Path, model, topk: int) -> None:
    from kdlib import open_cache

    # Decoded through kdlib: format v2 stores the slots in id order, the reader gives the canonical order.
    reader = open_cache(cache, decode_dir=cache.parent / f"{cache.name}_decoded")
    group = {k: v.numpy() for k, v in reader.read(0, 2).items()}
    ids = torch.from_numpy(group["input_ids"][:2].astype(np.int64)).to(_device_of(model))
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits.double().cpu()
    logprobs = torch.log_softmax(logits, -1)
    values, _ = logprobs.topk(topk, -1)
    stored = group["topk_logprobs"][:2].astype(np.float64)
    if not np.allclose(stored, values.numpy(), atol=5e-3, rtol=5e-3):
        raise SystemExit("correctness check failed: cached top-k logprobs differ from a direct torch computation")
    stored_ids = group["topk_ids"][:2].astype(np.int64)
    if not np.allclose(np.take_along_axis(logprobs.numpy(), stored_ids, -1), stored, atol=5e-3, rtol=5e-3):
        raise SystemExit("correctness check failed: cached top-k ids do not carry their logprobs")
    if not np.allclose(group["lse"][:2], torch.logsumexp(logits, -1).numpy(), rtol=1e-5, atol=1e-4):
        raise SystemExit("correctness check failed: lse")


def _check_sampled(cache: Path, model, samples: int) -> dict:
    """Sampled cache vs a direct torch computation on its first sequences (decoded through kdlib)."""
    from kdlib import open_cache

    reader = open_cache(cache, decode_dir=cache.parent / f"{cache.name}_decoded")
    batch = {k: v.numpy() for k, v in reader.read(0, 2).items()}
    with torch.inference_mode():
        ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(_device_of(model))
        logits = model(input_ids=ids, use_cache=False).logits
    logprobs = torch.log_softmax(logits.double(), -1).cpu().numpy()
    ids, counts = batch["sample_ids"].astype(np.int64), batch["sample_counts"].astype(np.int64)
    if not (counts.sum(-1) == samples).all():
        raise SystemExit("correctness check failed: sample counts do not sum to --samples")
    want = np.where(counts > 0, np.take_along_axis(logprobs, ids, -1), 0.0)
    if not np.allclose(batch["sample_logprobs"].astype(np.float64), want, atol=5e-3, rtol=5e-3):
        raise SystemExit("correctness check failed: sample_logprobs differ from a direct torch computation")
    return {"unique_per_position": round(float((counts > 0).sum(-1).mean()), 2)}


def _build_row(prefix: str, res, cpu0: float) -> dict:
    """The timing fields of one timed build, named ``{prefix}_...``."""
    return {
        f"{prefix}_wall_s": res.wall_s, f"{prefix}_setup_s": res.setup_s,
        f"{prefix}_pipeline_s": res.wall_s - res.setup_s, f"{prefix}_main_thread_compute_s": res.forward_s,
        f"{prefix}_drain_s": res.drain_s, f"{prefix}_finalize_s": res.finalize_s,
        f"{prefix}_writer_write_s": res.writer_write_s, f"{prefix}_writer_thread_cpu_s": res.writer_thread_cpu_s,
        f"{prefix}_process_cpu_s": time.process_time() - cpu0, f"{prefix}_bytes_per_token_timed": res.bytes_per_token,
    }


def _codec_table(cache: Path) -> dict:
    """bytes/token of the same arrays under every codec preset and a few lossless transforms."""
    import numcodecs

    manifest = fmt.load_manifest(cache)
    layout = fmt.layout_from_manifest(manifest)
    tokens = layout.num_sequences * layout.seq_len
    from kdlib import open_cache

    reader = open_cache(cache, decode_dir=cache.parent / f"{cache.name}_decoded")  # canonical order, every format
    specs = layout.arrays()
    decoded = reader.read(0, layout.num_sequences, arrays=[spec.name for spec in specs])
    arrays = {spec.name: decoded[spec.name].numpy().astype(spec.dtype) for spec in specs}
    out: dict = {"codec_presets": {}, "per_array_bytes_per_token": {}, "transforms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for codec in fmt.CODEC_PRESETS:
            lay = fmt.CacheLayout(**{**layout.__dict__, "codec": codec})
            d = Path(tmp) / codec
            fmt.create_arrays(d, lay)
            total, per_array = 0, {}
            for i in range(lay.num_shards):
                start, stop = lay.shard_range(i)
                files = fmt.write_shard(d, lay, i, {k: v[start:stop] for k, v in arrays.items()})
                for name, f in files.items():
                    per_array[name] = per_array.get(name, 0) + f["nbytes"]
                    total += f["nbytes"]
            out["codec_presets"][codec] = round(total / tokens, 3)
            out["per_array_bytes_per_token"][codec] = {k: round(v / tokens, 3) for k, v in per_array.items()}

    # Lossless transforms, compressed per inner chunk like the cache does (numcodecs directly).
    def chunked(arr: np.ndarray, codec) -> int:
        c = layout.chunk_seqs
        return sum(len(codec.encode(np.ascontiguousarray(arr[s : s + c]))) for s in range(0, len(arr), c))

    shuffle = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    bitshuffle = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    lp = arrays["topk_logprobs"]
    ids = arrays["topk_ids"]
    if lp.dtype == np.float16:
        bits = lp.view(np.uint16)  # negative fp16, sorted descending ⇒ bit patterns ascending along K
        delta = bits.copy()
        delta[..., 1:] = np.diff(bits, axis=-1)  # wraps mod 2^16: exactly invertible by cumsum
        assert np.array_equal(np.cumsum(delta, axis=-1, dtype=np.uint16), bits)
        out["transforms"]["topk_logprobs_fp16_shuffle"] = round(chunked(lp, shuffle) / tokens, 3)
        out["transforms"]["topk_logprobs_fp16_bitshuffle"] = round(chunked(lp, bitshuffle) / tokens, 3)
        out["transforms"]["topk_logprobs_delta_u16_shuffle"] = round(chunked(delta, shuffle) / tokens, 3)
        out["transforms"]["topk_logprobs_delta_u16_bitshuffle"] = round(chunked(delta, bitshuffle) / tokens, 3)
    out["transforms"]["topk_ids_shuffle"] = round(chunked(ids, shuffle) / tokens, 3)
    out["transforms"]["topk_ids_bitshuffle"] = round(chunked(ids, bitshuffle) / tokens, 3)
    rest = sum(chunked(arrays[k], shuffle) for k in arrays if k not in ("topk_logprobs", "topk_ids")) / tokens
    if lp.dtype == np.float16:
        best_lp = min(v for k, v in out["transforms"].items() if k.startswith("topk_logprobs"))
        best_ids = min(out["transforms"]["topk_ids_shuffle"], out["transforms"]["topk_ids_bitshuffle"])
        out["transforms"]["best_combination_total"] = round(best_lp + best_ids + rest, 3)
    return out


def _train_teacher(tokens: np.ndarray, vocab: int, seconds: float, seq_len: int, out_dir: Path, tok_dir: Path) -> dict:
    """AdamW on stdlib tokens for a fixed time budget; saves a transformers checkpoint."""
    model = _llama(vocab, hidden=128, layers=2, seed=1)
    t0 = time.perf_counter()
    losses = train_for_seconds(model, tokens, seq_len, seconds)
    steps = len(losses)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out_dir / name)
    return {"steps": steps, "train_s": round(time.perf_counter() - t0, 1), "first_loss": round(losses[0], 3),
            "final_loss_mean_last10": round(float(np.mean(losses[-10:])), 3), "hidden": 128, "layers": 2}


def _targets_only(model, sequences: np.ndarray, batch_size: int, topk: int) -> tuple[float, float]:
    """Forward + compute_targets without any writer: (wall seconds, seconds inside compute_targets)."""
    from cache_server.build.targets import workspace_numel

    device = _device_of(model)
    _sync(device)
    t0 = time.perf_counter()
    targets_s = 0.0
    workspace = None
    with torch.inference_mode():
        for b0 in range(0, len(sequences), batch_size):
            ids = _batch_ids(sequences, b0, batch_size, device)
            logits = model(input_ids=ids, use_cache=False).logits
            _sync(device)
            c0 = time.perf_counter()
            if workspace is None or workspace.numel() < workspace_numel(logits):
                # as run_build: allocated once on the logits' device, reused
                workspace = torch.empty(workspace_numel(logits), device=logits.device)
            compute_targets(logits, ids, topk, (), workspace)
            _sync(device)
            targets_s += time.perf_counter() - c0
            del logits
    return time.perf_counter() - t0, targets_s


def _time_teacher(label: str, desc: str, teacher_dir: Path, data_path: Path, sequences_arr: np.ndarray, args,
                  work: Path) -> tuple[dict, list[dict]]:
    """Interleaved bare forward / build / targets-only rounds for one teacher; medians and ratios."""
    from cache_server.build.teacher import inspect_teacher, load_teacher

    # Time the bare forward on the model exactly as the build loads it (same dtype, same weight storage).
    model = load_teacher(inspect_teacher(teacher_dir), args.dtype, args.device)
    n_seq, T = sequences_arr.shape
    print(f"[{label}] {desc}; {n_seq} x {T} = {n_seq * T} tokens per pass, batch {args.batch_size}, "
          f"shard every {args.shard_seqs} sequences; torch threads {torch.get_num_threads()}", file=sys.stderr)

    def build(out: Path, **kw):
        kw.setdefault("topk", args.topk)
        opts = BuildOptions(teacher=str(teacher_dir), data=str(data_path), out=str(out), seq_len=T,
                            batch_size=args.batch_size, progress=False, device=args.device, dtype=args.dtype, **kw)
        return run_build(opts, log=lambda s: None)

    # Correctness before timing (also warms up kernels, the allocator and the page cache).
    build(work / f"{label}_warm", max_sequences=min(n_seq, 2 * args.batch_size), shard_seqs=args.batch_size)
    _check_correct(work / f"{label}_warm", model, args.topk)
    shutil.rmtree(work / f"{label}_warm")
    sampled = {"targets": "sample", "samples": args.samples, "topk": 0}
    sampled_check = {}
    if args.samples:
        build(work / f"{label}_warm_s", max_sequences=min(n_seq, 2 * args.batch_size), shard_seqs=args.batch_size,
              **sampled)
        sampled_check = _check_sampled(work / f"{label}_warm_s", model, args.samples)
        shutil.rmtree(work / f"{label}_warm_s")
        shutil.rmtree(work / f"{label}_warm_s_decoded", ignore_errors=True)
    _bare_forward(model, sequences_arr[: args.batch_size], args.batch_size)

    rows = []
    kinds = ["bare", "build", "targets"] + (["build_sampled"] if args.samples else [])
    for rep in range(args.reps):
        row: dict = {"teacher": label, "rep": rep, "order": ""}
        order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]  # no kind always first or after another
        row["order"] = ">".join(order)
        for kind in order:
            if kind == "bare":
                row["bare_forward_s"], row["bare_forward_cpu_s"] = _bare_forward(model, sequences_arr, args.batch_size)
            elif kind == "targets":
                row["forward_plus_targets_s"], row["compute_targets_s"] = _targets_only(
                    model, sequences_arr, args.batch_size, args.topk)
            else:
                out = work / f"{label}_cache_{rep}"
                cpu0 = time.process_time()
                res = build(out, shard_seqs=args.shard_seqs, **(sampled if kind == "build_sampled" else {}))
                row.update(_build_row(kind, res, cpu0))
                shutil.rmtree(out)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr)
    del model
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
    batches = -(-n_seq // args.batch_size)

    def paired(num: str, den: str) -> float:
        """Median over rounds of num/den measured in the same round: slow drift of the machine cancels."""
        return round(statistics.median(r[num] / r[den] for r in rows), 4)

    result = {
        "teacher": desc,
        "overhead_ratio": paired("build_pipeline_s", "bare_forward_s"),
        "overhead_ratio_incl_setup": paired("build_wall_s", "bare_forward_s"),
        "targets_only_ratio": paired("forward_plus_targets_s", "bare_forward_s"),
        "writer_overhead_vs_targets_only": paired("build_pipeline_s", "forward_plus_targets_s"),
        "ratios_of_medians": {  # the older estimator (median build / median bare), for comparison
            "overhead_ratio": round(med["build_pipeline_s"] / med["bare_forward_s"], 4),
            "targets_only_ratio": round(med["forward_plus_targets_s"] / med["bare_forward_s"], 4),
            "writer_overhead_vs_targets_only": round(med["build_pipeline_s"] / med["forward_plus_targets_s"], 4),
        },
        "compute_targets_ms_per_batch": round(1e3 * med["compute_targets_s"] / batches, 2),
        "bare_forward_ms_per_batch": round(1e3 * med["bare_forward_s"] / batches, 1),
        **({"overhead_ratio_sampled": paired("build_sampled_pipeline_s", "bare_forward_s"),
            "sampled_vs_topk_build": paired("build_sampled_pipeline_s", "build_pipeline_s"),
            "sampled_samples": args.samples,
            "sampled_bytes_per_token_timed": round(statistics.median(
                r["build_sampled_bytes_per_token_timed"] for r in rows), 3),
            "sampled_unique_per_position": sampled_check.get("unique_per_position")} if args.samples else {}),
        "build_extra_cpu_share_vs_bare": round(
            max(0.0, med["build_process_cpu_s"] - med["bare_forward_cpu_s"]) / med["build_process_cpu_s"], 4),
        "medians_s": {k: round(v, 4) for k, v in med.items()},
        "spread_overhead_ratio": [round(min(r["build_pipeline_s"] / r["bare_forward_s"] for r in rows), 4),
                                  round(max(r["build_pipeline_s"] / r["bare_forward_s"] for r in rows), 4)],
        "tokens_per_pass": n_seq * T,
        "batch_shape": [args.batch_size, T],
        "reps": args.reps,
    }
    print(f"[{label}] overhead_ratio {result['overhead_ratio']}, targets_only_ratio {result['targets_only_ratio']}, "
          f"writer x{result['writer_overhead_vs_targets_only']}, sampled build "
          f"{result.get('overhead_ratio_sampled')} x bare", file=sys.stderr)
    return result, rows


def _writer_threads() -> dict:
    """What the background writer compresses with (reported, so a result says how it was produced)."""
    import numcodecs.blosc
    import zarr

    return {
        "zarr_threading_max_workers": zarr.config.get("threading.max_workers", None),  # None: asyncio default
        "blosc_use_threads": numcodecs.blosc.use_threads,  # zarr sets False: Blosc's own threads are unused
    }


def _engine_main(args) -> None:
    """``--engine ray``: interleaved local / Ray builds of the same tokens (benchmarks/_bench_ray.py)."""
    from benchmarks._bench_ray import bench_engines

    sequences = args.sequences or (32 if args.quick else 128)
    machine = machine_info()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    work = Path(tempfile.mkdtemp(prefix="kdcache_bench_build_ray_"))
    wall0 = time.perf_counter()
    try:
        tok_dir = train_tokenizer(work / "tok", vocab_size=args.tokenizer_vocab, max_chars=2_000_000)
        stream = _tokenize_stdlib(tok_dir, max_chars=6_000_000)[: sequences * args.seq_len]
        np.save(work / "tokens.npy", stream)
        kv = args.kv_heads or args.heads
        _llama(args.vocab, args.hidden, args.layers, 0, args.heads, kv).save_pretrained(work / "teacher",
                                                                                       safe_serialization=True)
        result = bench_engines(work / "teacher", work / "tokens.npy", args.seq_len, args, work, REPO)
        summary = {"bench": "bench_build_engine_ray", "quick": args.quick,
                   "teacher": f"random-init Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
                              f"({kv} kv), vocab {args.vocab}",
                   "tokens_per_build": sequences * args.seq_len, "shard_seqs": args.shard_seqs,
                   "batch_size": args.batch_size, **result, "bench_wall_s": round(time.perf_counter() - wall0, 1),
                   "machine": {**machine, "loadavg_1_5_15min_end": [round(x, 2) for x in os.getloadavg()]},
                   "command": command}
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = "bench_build_ray" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (~6-8 min on 2 CPU cores)")
    ap.add_argument("--sequences", type=int, help="sequences per timed pass (default 32 quick, 256 full)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=50_257)
    ap.add_argument("--hidden", type=int, default=768, help="headline teacher (default: GPT-2-small shape)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (multi-head attention, as GPT-2)")
    ap.add_argument("--small-hidden", type=int, default=256, help="secondary small teacher; 0 skips it")
    ap.add_argument("--small-layers", type=int, default=4)
    ap.add_argument("--small-heads", type=int, default=4)
    ap.add_argument("--small-kv-heads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard-seqs", type=int, default=16,
                    help="timed builds write a shard every N sequences (real builds: thousands)")
    ap.add_argument("--samples", type=int, default=32,
                    help="draws per position of the timed sampled build (--targets sample); 0 skips it")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--train-s", type=float, help="training budget of the trained teacher (default 45 quick, 300 full)")
    ap.add_argument("--tokenizer-vocab", type=int, default=4096)
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    ap.add_argument("--device", default="cpu", help="where the teacher runs, as kdcache build --device (cuda, cuda:1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="teacher compute dtype, as kdcache build --dtype (default float32)")
    ap.add_argument("--engine", default="local", choices=["local", "ray"],
                    help="ray: only the engine comparison (Ray 1 and 2 workers vs local, benchmarks/_bench_ray.py)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine == "ray":
        return _engine_main(args)
    sequences = args.sequences or (32 if args.quick else 256)
    train_s = args.train_s if args.train_s is not None else (45.0 if args.quick else 300.0)
    machine = machine_info()  # its load average is the one at the start
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    work = Path(tempfile.mkdtemp(prefix="kdcache_bench_build_"))
    wall0 = time.perf_counter()
    try:
        tok_dir = train_tokenizer(work / "tok", vocab_size=args.tokenizer_vocab, max_chars=2_000_000)
        stream = _tokenize_stdlib(tok_dir, max_chars=6_000_000)
        T = args.seq_len
        data_path = work / "tokens.npy"
        np.save(data_path, stream[: sequences * T])
        sequences_arr = stream[: sequences * T].reshape(sequences, T)

        teachers = []  # (label, description, directory)
        kv = args.kv_heads or args.heads
        head_label = f"h{args.hidden}_L{args.layers}"
        gpt2_shape = (args.hidden, args.layers, args.heads, kv) == (768, 12, 12, 12)
        head_desc = (f"random-init Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({kv} kv), "
                     f"vocab {args.vocab}" + (" (GPT-2-small shape)" if gpt2_shape else ""))
        teachers.append((head_label, head_desc, work / "teacher_head"))
        _llama(args.vocab, args.hidden, args.layers, 0, args.heads, kv).save_pretrained(
            teachers[0][2], safe_serialization=True)
        if args.small_hidden:
            small_label = f"h{args.small_hidden}_L{args.small_layers}"
            small_desc = (f"random-init Llama hidden {args.small_hidden}, {args.small_layers} layers, "
                          f"{args.small_heads} heads ({args.small_kv_heads} kv), vocab {args.vocab} "
                          "(secondary: vocabulary work unrealistically large next to the body)")
            teachers.append((small_label, small_desc, work / "teacher_small"))
            _llama(args.vocab, args.small_hidden, args.small_layers, 0, args.small_heads, args.small_kv_heads
                   ).save_pretrained(teachers[1][2], safe_serialization=True)

        results, rows = {}, []
        for label, desc, directory in teachers:
            results[label], teacher_rows = _time_teacher(label, desc, directory, data_path, sequences_arr, args, work)
            rows.extend(teacher_rows)
        head = results[head_label]

        # Bytes/token on a build with the default chunking (the timed builds use small shards), on the small
        # random teacher when there is one (comparable with earlier results), else the headline teacher.
        codec_label, _, codec_dir = teachers[-1]
        codec_build = run_build(BuildOptions(teacher=str(codec_dir), data=str(data_path), out=str(work / "cache_codec"),
                                             topk=args.topk, seq_len=T, batch_size=args.batch_size, progress=False),
                                log=lambda s: None)
        codecs_random = _codec_table(work / "cache_codec")

        # Trained teacher: small vocab (BPE trained on the same stdlib text), noted in the output.
        train_dir = work / "teacher_trained"
        split = int(len(stream) * 0.9)
        train_info = _train_teacher(stream[:split], args.tokenizer_vocab, train_s, 128, train_dir, tok_dir)
        held = stream[split:]
        n_held = min(len(held) // T, sequences)
        np.save(work / "held.npy", held[: n_held * T])
        run_build(BuildOptions(teacher=str(train_dir), data=str(work / "held.npy"), out=str(work / "cache_trained"),
                               topk=args.topk, seq_len=T, batch_size=args.batch_size, progress=False),
                  log=lambda s: None)
        codecs_trained = _codec_table(work / "cache_trained")
        stats_t = fmt.load_manifest(work / "cache_trained")["stats"]

        summary = {
            "bench": "bench_build",
            "quick": args.quick,
            "headline_teacher": head["teacher"],
            "overhead_ratio": head["overhead_ratio"],
            "overhead_ratio_incl_setup": head["overhead_ratio_incl_setup"],
            "targets_only_ratio": head["targets_only_ratio"],
            "writer_overhead_vs_targets_only": head["writer_overhead_vs_targets_only"],
            "compute_targets_ms_per_batch": head["compute_targets_ms_per_batch"],
            "overhead_ratio_sampled": head.get("overhead_ratio_sampled"),
            "sampled_vs_topk_build": head.get("sampled_vs_topk_build"),
            "teachers": results,
            "tokens_per_pass": sequences * T,
            "shard_seqs_timed": args.shard_seqs,
            "bytes_per_token": round(codec_build.bytes_per_token, 3),
            "bytes_per_token_teacher": f"random-init Llama {codec_label.replace('_', ' ')} vocab {args.vocab}, "
                                       f"k={args.topk}, fp16 logprobs, {fmt.DEFAULT_CODEC}, lossless uint16 ids, "
                                       "default chunking",
            "bytes_per_token_by_codec_random": codecs_random["codec_presets"],
            "transforms_random": codecs_random["transforms"],
            "trained_teacher": {
                "desc": f"Llama h128 L2 trained {train_info['train_s']} s AdamW on stdlib source, "
                        f"BPE vocab {args.tokenizer_vocab} (not >=50k: a stdlib-trained BPE cannot fill 50k)",
                **train_info,
                "held_out_tokens": n_held * T,
                "mean_nll": round(stats_t["mean_nll"], 3),
                "mean_entropy": round(stats_t["mean_entropy"], 3),
                "mean_tail_mass": round(stats_t["mean_tail_mass"], 4),
                "bytes_per_token_by_codec": codecs_trained["codec_presets"],
                "per_array_bytes_per_token": codecs_trained["per_array_bytes_per_token"][fmt.DEFAULT_CODEC],
                "transforms": codecs_trained["transforms"],
            },
            "per_array_bytes_per_token_random": codecs_random["per_array_bytes_per_token"][fmt.DEFAULT_CODEC],
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "teacher_dtype": args.dtype,
            "writer": _writer_threads(),
            "bench_wall_s": round(time.perf_counter() - wall0, 1),
            "machine": {**machine, "loadavg_1_5_15min_end": [round(x, 2) for x in os.getloadavg()]},
            "command": command,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = "bench_build" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps({"summary": summary, "reps": rows}, indent=2) + "\n")
        fields = ["command", "machine", *dict.fromkeys(k for r in rows for k in r)]
        with open(RESULTS / f"{stem}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({"command": command, "machine": json.dumps(summary["machine"]), **r})
        print(json.dumps(summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
