"""Shared bits of the examples: a tiny GPT student and a small cache to try them on."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["REPO", "tiny_gpt_student", "example_cache"]


def tiny_gpt_student(vocab_size: int, seq_len: int, layers: int = 2, d_model: int = 64, seed: int = 0):
    """A small GPT-2 built from a config (nothing downloaded); its vocabulary must be the teacher's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=d_model, n_head=max(1, d_model // 32), vocab_size=vocab_size,
                        n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def example_cache(cache: str | None, workdir: Path, num_sequences: int = 96, seq_len: int = 64, topk: int = 8,
                  vocab_size: int = 512) -> str | Path:
    """``cache`` if given (a URL stays a string); else a small synthetic cache under ``workdir`` (written once)."""
    if cache:
        text = str(cache)
        # Path("http://host/...") would collapse the "//" and open_cache would look for a local directory.
        return text if text.startswith(("http://", "https://")) else Path(text)
    path = Path(workdir) / "example_cache"
    if not (path / "manifest.json").exists():
        from benchmarks._common import write_fast_synthetic_cache

        write_fast_synthetic_cache(path, num_sequences, seq_len, topk, vocab_size, temperatures=(2.0,))
        print(f"wrote a synthetic example cache to {path} (pass --cache DIR for a real one)", file=sys.stderr)
    return path
