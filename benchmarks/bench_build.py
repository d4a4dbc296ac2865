"""Benchmark `kdcache build`: overhead over a bare teacher forward, and bytes/token per codec.

Measures, in one run:

1. ``overhead_ratio``: build wall time ÷ bare teacher forward time over the same tokens and batches.
   Interleaved (bare forward pass, then a full build into a fresh directory) ``--reps`` times; medians.
   The build's pipeline time excludes its one-off setup (hashing weights/data, loading the teacher),
   which is reported separately (``overhead_ratio_incl_setup``).
2. ``bytes_per_token`` at k=32 with vocab 50,257 (random-init Llama), per codec preset, plus lossless
   transforms evaluated on the same arrays (fp16 logprob bit patterns delta-coded along K, bitshuffle).
3. The same for a tiny Llama TRAINED for ``--train-s`` seconds on stdlib source (vocab of a BPE tokenizer
   trained on the same text, noted in the output), because random-init teachers compress unlike trained ones.

Correctness is checked before timing (cache vs direct torch computation on the first sequences).
Last stdout line: one JSON object. Results (JSON + CSV with the command line and machine info) go to
``benchmarks/results/bench_build*``.

Usage::

    python benchmarks/bench_build.py --quick
    python benchmarks/bench_build.py --sequences 256 --reps 5 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
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

from cache_server import format as fmt  # noqa: E402
from cache_server.build_job import BuildOptions, compute_targets, run_build  # noqa: E402
from tests.teachers import stdlib_documents, train_tokenizer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }


def _tokenize_stdlib(tok_dir: Path, max_chars: int) -> np.ndarray:
    from cache_server.data_sources import load_tokenizer

    tok = load_tokenizer(tok_dir)
    docs = stdlib_documents(max_files=400, max_chars=max_chars)
    ids = []
    for enc in tok.tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids + [tok.eos_id])
    return np.asarray(ids, dtype=np.int64)


def _llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=1024, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _bare_forward(model, sequences: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Wall and process-CPU seconds of the teacher forward alone over all batches (logits discarded)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b0 in range(0, len(sequences), batch_size):
            ids = torch.from_numpy(np.array(sequences[b0 : b0 + batch_size], dtype=np.int64))
            model(input_ids=ids, use_cache=False).logits
    return time.perf_counter() - wall0, time.process_time() - cpu0


def _check_correct(cache: Path, model, topk: int) -> None:
    import zarr

    group = zarr.open_group(str(cache), mode="r")
    ids = torch.from_numpy(group["input_ids"][:2].astype(np.int64))
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits.double()
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


def _codec_table(cache: Path) -> dict:
    """bytes/token of the same arrays under every codec preset and a few lossless transforms."""
    import numcodecs

    manifest = fmt.load_manifest(cache)
    layout = fmt.layout_from_manifest(manifest)
    tokens = layout.num_sequences * layout.seq_len
    arrays = {}
    for spec in layout.arrays():
        parts = [
            fmt.decode_shard((cache / fmt.shard_relpath(spec.name, i, 1 + len(spec.trailing_shape))).read_bytes(),
                             spec, layout, i)
            for i in range(layout.num_shards)
        ]
        arrays[spec.name] = np.concatenate(parts)
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
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    batch, steps, losses = 16, 0, []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
        x = torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out_dir / name)
    return {"steps": steps, "train_s": round(time.perf_counter() - t0, 1), "first_loss": round(losses[0], 3),
            "final_loss_mean_last10": round(float(np.mean(losses[-10:])), 3), "hidden": 128, "layers": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (< 5 min on 2 CPU cores)")
    ap.add_argument("--sequences", type=int, help="sequences per timed pass (default 32 quick, 256 full)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=50_257)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--train-s", type=float, help="training budget of the trained teacher (default 45 quick, 300 full)")
    ap.add_argument("--tokenizer-vocab", type=int, default=4096)
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sequences = args.sequences or (32 if args.quick else 256)
    train_s = args.train_s if args.train_s is not None else (45.0 if args.quick else 300.0)
    machine = _machine()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    work = Path(tempfile.mkdtemp(prefix="kdcache_bench_build_"))
    try:
        tok_dir = train_tokenizer(work / "tok", vocab_size=args.tokenizer_vocab, max_chars=2_000_000)
        stream = _tokenize_stdlib(tok_dir, max_chars=6_000_000)
        T = args.seq_len
        data_path = work / "tokens.npy"
        np.save(data_path, stream[: sequences * T])
        sequences_arr = stream[: sequences * T].reshape(sequences, T)

        teacher_dir = work / "teacher_random"
        _llama(args.vocab, args.hidden, args.layers, seed=0).save_pretrained(teacher_dir, safe_serialization=True)
        # Time the bare forward on the model exactly as the build loads it (same dtype, same weight storage).
        from cache_server.teacher import inspect_teacher, load_teacher

        model = load_teacher(inspect_teacher(teacher_dir), "float32", "cpu")
        print(f"teacher: random-init Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
              f"{sequences} x {T} = {sequences * T} tokens per pass; torch threads {torch.get_num_threads()}",
              file=sys.stderr)

        def build(out: Path, **kw):
            opts = BuildOptions(teacher=str(teacher_dir), data=str(data_path), out=str(out), topk=args.topk,
                                seq_len=T, batch_size=args.batch_size, progress=False, **kw)
            return run_build(opts, log=lambda s: None)

        # Correctness before timing (also warms up kernels and the page cache).
        build(work / "warm", max_sequences=2)
        _check_correct(work / "warm", model, args.topk)
        _bare_forward(model, sequences_arr[:2], args.batch_size)

        rows = []
        for rep in range(args.reps):
            bare_s, bare_cpu_s = _bare_forward(model, sequences_arr, args.batch_size)
            out = work / f"cache_{rep}"
            cpu0 = time.process_time()
            res = build(out)
            build_cpu = time.process_time() - cpu0
            # Targets-only pass: forward + top-k/lse/entropy without any writer, to split the overhead.
            t0 = time.perf_counter()
            workspace = None
            with torch.inference_mode():
                for b0 in range(0, sequences, args.batch_size):
                    ids = torch.from_numpy(np.array(sequences_arr[b0 : b0 + args.batch_size], dtype=np.int64))
                    logits = model(input_ids=ids, use_cache=False).logits
                    if workspace is None or workspace.numel() < logits.numel():
                        workspace = torch.empty_like(logits)
                    compute_targets(logits, ids, args.topk, (), workspace)
            targets_s = time.perf_counter() - t0
            row = {
                "rep": rep, "bare_forward_s": bare_s, "bare_forward_cpu_s": bare_cpu_s,
                "forward_plus_targets_s": targets_s, "build_wall_s": res.wall_s, "build_setup_s": res.setup_s,
                "build_pipeline_s": res.wall_s - res.setup_s, "build_main_thread_compute_s": res.forward_s,
                "build_process_cpu_s": build_cpu, "writer_thread_cpu_s": res.writer_thread_cpu_s,
                "bytes_per_token": res.bytes_per_token,
            }
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr)
            if rep < args.reps - 1:
                shutil.rmtree(out)
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "rep"}
        codecs_random = _codec_table(work / f"cache_{args.reps - 1}")

        # Trained teacher: small vocab (BPE trained on the same stdlib text), noted in the output.
        train_dir = work / "teacher_trained"
        split = int(len(stream) * 0.9)
        train_info = _train_teacher(stream[:split], args.tokenizer_vocab, train_s, 128, train_dir, tok_dir)
        held = stream[split:]
        n_held = min(len(held) // T, sequences)
        np.save(work / "held.npy", held[: n_held * T])
        res_t = run_build(BuildOptions(teacher=str(train_dir), data=str(work / "held.npy"), out=str(work / "cache_trained"),
                                       topk=args.topk, seq_len=T, batch_size=args.batch_size, progress=False),
                          log=lambda s: None)
        codecs_trained = _codec_table(work / "cache_trained")
        stats_t = res_t.manifest["stats"]

        writer_share = med["writer_thread_cpu_s"] / med["build_process_cpu_s"]
        extra_cpu_share = max(0.0, med["build_process_cpu_s"] - med["bare_forward_cpu_s"]) / med["build_process_cpu_s"]
        summary = {
            "bench": "bench_build",
            "quick": args.quick,
            "overhead_ratio": round(med["build_pipeline_s"] / med["bare_forward_s"], 4),
            "overhead_ratio_incl_setup": round(med["build_wall_s"] / med["bare_forward_s"], 4),
            "targets_only_ratio": round(med["forward_plus_targets_s"] / med["bare_forward_s"], 4),
            "writer_overhead_vs_targets_only": round(med["build_pipeline_s"] / med["forward_plus_targets_s"], 4),
            "writer_thread_cpu_share": round(writer_share, 4),
            "build_extra_cpu_share_vs_bare": round(extra_cpu_share, 4),
            "medians_s": {k: round(v, 4) for k, v in med.items() if k.endswith("_s")},
            "tokens_per_pass": sequences * T,
            "bytes_per_token": round(med["bytes_per_token"], 3),
            "bytes_per_token_teacher": f"random-init Llama h{args.hidden} L{args.layers} vocab {args.vocab}, "
                                       f"k={args.topk}, fp16 logprobs, {fmt.DEFAULT_CODEC}, lossless uint16 ids",
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
            "machine": {**machine, "loadavg_end": os.getloadavg()},
            "command": command,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = "bench_build" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps({"summary": summary, "reps": rows}, indent=2) + "\n")
        with open(RESULTS / f"{stem}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["command", "machine", *rows[0].keys()])
            w.writeheader()
            for r in rows:
                w.writerow({"command": command, "machine": json.dumps(summary["machine"]), **r})
        print(json.dumps(summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
