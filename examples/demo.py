"""End-to-end demo on the embedded default: a small teacher, a real corpus, a local cache, a KD student.

1. Corpus: the Python standard library's own source files (present wherever Python is).
2. Tokenizer: a byte-level BPE trained on that corpus with `tokenizers` (no download).
3. Teacher: a small Llama (transformers) trained for 300 steps on the corpus, saved as safetensors.
4. `kdcache build` → `kdcache info` → `kdcache verify` on the local cache directory.
5. A smaller student trained from the cache with `kdlib` (cache loader + fused CE+KD loss), compared with the
   same student trained on CE alone for the same steps.

Every step is skipped when its output already exists, so a rerun is fast. Usage::

    python examples/demo.py --out demo_out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pick_threads(requested: int | None) -> int:
    """Threads for torch: the CPUs this process may use, less those other processes keep busy.

    OpenMP threads that wait at a barrier for a core a neighbour holds make each step slower than fewer
    threads would (benchmarks/thread_oversubscription.py measures it with this demo's teacher), so a shared
    machine gets fewer threads, not more.
    """
    if requested:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def stdlib_files(limit_bytes: int, skip_bytes: int = 0) -> list[Path]:
    """Stdlib sources in name order: the files after the first ``skip_bytes``, up to ``limit_bytes``."""
    files, total = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        size = path.stat().st_size
        if skip_bytes > 0:
            skip_bytes -= size
            continue
        files.append(path)
        total += size
        if total >= limit_bytes:
            break
    return files


def train_tokenizer(out_dir: Path, files: list[Path], vocab_size: int) -> Path:
    path = out_dir / "tokenizer" / "tokenizer.json"
    if path.exists():
        return path.parent
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path.parent)
    log(f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()} -> {path.parent}")
    return path.parent


def tokenize(out_dir: Path, tokenizer_dir: Path, files: list[Path], name: str = "tokens.npy") -> Path:
    path = out_dir / name
    if path.exists():
        return path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids: list[int] = []
    for f in files:
        ids.extend(tok(f.read_text(errors="replace"))["input_ids"])
        ids.append(tok.eos_token_id)
    np.save(path, np.asarray(ids, dtype=np.uint16))
    log(f"corpus: {len(files)} stdlib files -> {len(ids):,} tokens -> {path}")
    return path


def make_model(vocab_size: int, hidden: int, layers: int, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def train_teacher(out_dir: Path, tokens: np.ndarray, vocab_size: int, seq_len: int, steps: int) -> Path:
    """A fixed number of AdamW steps (cosine decay), so the teacher is the same on every machine."""
    teacher_dir = out_dir / "teacher"
    if (teacher_dir / "model.safetensors").exists():
        return teacher_dir
    model = make_model(vocab_size, hidden=128, layers=2, seq_len=seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=3e-4)
    rng = np.random.default_rng(0)
    started, loss = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=16)
        batch = torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64))
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        schedule.step()
        loss = out.loss.item()
        if step % 50 == 0:
            log(f"teacher step {step}/{steps}: loss {loss:.3f} ({(time.perf_counter() - started) / step:.2f} s/step)")
    model.save_pretrained(teacher_dir, safe_serialization=True)
    log(f"teacher: Llama 2x128 trained {steps} steps in {time.perf_counter() - started:.0f}s, final loss {loss:.3f} "
        f"-> {teacher_dir}")
    return teacher_dir


def kdcache(*args: str) -> None:
    cmd = [sys.executable, "-m", "cache_server", *args]
    log("$ kdcache " + " ".join(args))
    subprocess.run(cmd, check=True, cwd=ROOT)


def train_students(cache_dir: Path, eval_tokens: np.ndarray, vocab_size: int, steps: int) -> dict:
    """Same student init, same batches (the cache loader, seed 0), same steps: CE only vs CE + KD.

    Both modes read their batches through ``kdlib.make_loader``; the KD mode adds the teacher's top-k via
    ``kdlib.integrations.distill_loss`` (alignment check + fused CE+KD loss). Returns held-out CE per mode.
    """
    import kdlib
    from kdlib.integrations import distill_loss

    cache = kdlib.open_cache(cache_dir)
    n_eval = min(64, len(eval_tokens) // cache.seq_len)  # held-out stdlib files, never in the cache
    eval_ids = torch.from_numpy(eval_tokens[: n_eval * cache.seq_len].astype(np.int64)).view(n_eval, cache.seq_len)
    eval_labels = torch.cat([eval_ids[:, 1:], torch.full_like(eval_ids[:, :1], -100)], dim=1)
    results = {}
    for mode in ("ce", "kd"):
        torch.manual_seed(1)
        student = make_model(vocab_size, hidden=64, layers=1, seq_len=cache.seq_len)
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
        loader = kdlib.make_loader(cache, batch_size=8, shuffle=True, seed=0, rank=0, world_size=1)
        step, batches = 0, iter(loader)
        while step < steps:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            ids = batch["input_ids"].long()
            logits = student(input_ids=ids).logits  # [B, T, V]
            if mode == "ce":
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            else:
                loss = distill_loss(logits, batch, student_input_ids=ids, ce_weight=0.5, kd_weight=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            logits = student(input_ids=eval_ids).logits
            results[mode] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), eval_labels.flatten()).item()
        log(f"student ({mode}): held-out CE after {steps} steps = {results[mode]:.4f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--corpus-bytes", type=int, default=3_000_000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("KDCACHE_DEMO_THREADS", "0")),
                        help="torch threads (default: free CPUs = usable CPUs minus the 1-minute load average)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    # The `kdcache build` subprocess gets the same limits through its environment.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the tokenizers library's thread pool
    os.environ.setdefault("BLOSC_NTHREADS", str(threads))  # c-blosc's compression threads in the build
    log(f"using {threads} torch thread(s) of {os.cpu_count()} CPUs")
    started = time.perf_counter()

    files = stdlib_files(args.corpus_bytes)
    tokenizer_dir = train_tokenizer(out, files, args.vocab_size)
    tokens_path = tokenize(out, tokenizer_dir, files)
    tokens = np.load(tokens_path)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    teacher_dir = train_teacher(out, tokens, vocab_size, args.seq_len, args.teacher_steps)

    cache_dir = out / "cache"
    kdcache(
        "build", "--teacher", str(teacher_dir), "--data", str(tokens_path), "--topk", str(args.topk),
        "--seq-len", str(args.seq_len), "--temperatures", "2", "--out", str(cache_dir), "--batch-size", "16",
    )
    kdcache("info", str(cache_dir))
    kdcache("verify", str(cache_dir), "--no-progress")

    eval_files = stdlib_files(200_000, skip_bytes=args.corpus_bytes + 1)
    eval_tokens = np.load(tokenize(out, tokenizer_dir, eval_files, name="heldout_tokens.npy"))
    results = train_students(cache_dir, eval_tokens, vocab_size, args.student_steps)
    summary = {
        "cache_dir": str(cache_dir),
        "bytes_per_token": json.loads((cache_dir / "manifest.json").read_text())["stats"]["bytes_per_token"],
        "student_heldout_ce": results,
        "wall_time_s": round(time.perf_counter() - started, 1),
        # This process plus its finished children (the `kdcache build`/`info`/`verify` subprocesses).
        "cpu_time_s": round(time.process_time() + _children_cpu_s(), 1),
        "torch_threads": threads,
    }
    log("done: " + json.dumps(summary))


if __name__ == "__main__":
    main()
