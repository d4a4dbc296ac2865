"""The demo's data and models: stdlib source files, a byte-level BPE trained on them, small Llamas.

Shared by ``examples/demo.py`` and ``benchmarks/distill_quality.py`` (same corpus, same tokenizer code, the
benchmark only asks for a larger vocabulary and larger models). Every step that writes an artifact skips
itself when the artifact exists, so reruns reuse the tokenizer, the token arrays and the teacher.

Shape notation::

    N  sequences   T  positions per sequence   V  vocabulary
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["log", "pick_threads", "stdlib_files", "train_tokenizer", "tokenize", "make_model", "train_teacher",
           "heldout_batch", "heldout_loss", "count_params"]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


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
    """A byte-level BPE of ``vocab_size`` trained on ``files``, saved as a transformers tokenizer directory."""
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
    """The files' tokens as one uint16 stream, EOS after each file, saved as ``out_dir/name``."""
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


def make_model(vocab_size: int, hidden: int, layers: int, seq_len: int, seed: int = 0):
    """A Llama built from a config (nothing downloaded): 4 heads, 2 KV heads, MLP width 2·hidden."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_teacher(out_dir: Path, tokens: np.ndarray, vocab_size: int, seq_len: int, steps: int, *,
                  hidden: int = 128, layers: int = 2, batch_size: int = 16, lr: float = 3e-3,
                  name: str = "teacher") -> Path:
    """A fixed number of AdamW steps (cosine decay), so the teacher is the same on every machine.

    Returns ``out_dir/name`` (a transformers directory with ``model.safetensors``); an existing one is reused.
    """
    teacher_dir = out_dir / name
    if (teacher_dir / "model.safetensors").exists():
        return teacher_dir
    model = make_model(vocab_size, hidden=hidden, layers=layers, seq_len=seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)
    rng = np.random.default_rng(0)
    started, loss = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        batch = torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64))
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        schedule.step()
        loss = out.loss.item()
        if step % 50 == 0:
            log(f"{name} step {step}/{steps}: loss {loss:.3f} ({(time.perf_counter() - started) / step:.2f} s/step)")
    model.save_pretrained(teacher_dir, safe_serialization=True)
    log(f"{name}: Llama {layers}x{hidden} ({count_params(model) / 1e6:.2f}M params) trained {steps} steps in "
        f"{time.perf_counter() - started:.0f}s, final loss {loss:.3f} -> {teacher_dir}")
    return teacher_dir


def heldout_batch(tokens: np.ndarray, seq_len: int, max_sequences: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out ids [n, T] (int64) and their next-token labels [n, T] (-100 at the last position)."""
    n = min(max_sequences, len(tokens) // seq_len)
    ids = torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    return ids, labels


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on held-out ``ids`` [n, T]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        logits = model(input_ids=ids[start : start + batch_size]).logits  # [b, T, V]
        target = labels[start : start + batch_size].flatten()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target, reduction="sum").item()
        count += int((target != -100).sum())
    model.train(was_training)
    return total / count
