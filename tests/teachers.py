"""Test helpers: tiny teachers, tokenizers and token corpora built locally (nothing downloaded).

Import from other tests as ``from tests.teachers import make_llama_teacher, train_tokenizer, ...``.

Shape notation::

    N  sequences    T  sequence length    V  vocabulary size    K  top-k
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "stdlib_text",
    "stdlib_documents",
    "train_tokenizer",
    "make_llama_teacher",
    "load_llama_teacher",
    "TinyLM",
    "tiny_lm_factory",
    "nan_lm_factory",
    "batch_dependent_lm_factory",
    "failing_factory",
    "wrong_output_lm_factory",
    "NAN_TOKEN",
    "save_factory_teacher",
    "write_token_file",
    "reference_targets",
]

EOS_TOKEN = "<|endoftext|>"
NAN_TOKEN = 7  # NanLM makes every logit NaN at positions whose input token is this id
TINY_VOCAB = 50


def stdlib_documents(max_files: int = 40, max_chars: int = 400_000) -> list[str]:
    """Source files of the Python standard library (sorted, so the corpus is deterministic)."""
    root = Path(os.__file__).parent
    docs, total = [], 0
    for path in sorted(root.glob("*.py"))[:max_files]:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


def stdlib_text(max_chars: int = 200_000) -> str:
    return "".join(stdlib_documents(max_chars=max_chars))[:max_chars]


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 300, max_chars: int = 300_000) -> Path:
    """Train a byte-level BPE tokenizer on stdlib source; writes tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = stdlib_documents(max_chars=max_chars)
    tokenizer.train_from_iterator(docs, trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": EOS_TOKEN, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return out_dir


def make_llama_teacher(
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    logit_scale: float = 1.0,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """A random-init tiny Llama saved with safetensors. ``logit_scale`` > 1 makes the distribution peakier."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = Path(tokenizer_dir) / name
            if src.exists():
                (out_dir / name).write_bytes(src.read_bytes())
    return out_dir


def load_llama_teacher(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype).eval()


class TinyLM(torch.nn.Module):
    """A custom (non-transformers) causal LM: embedding → causal running mean → linear head."""

    def __init__(self, vocab_size: int = TINY_VOCAB, hidden: int = 16) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = torch.nn.Embedding(vocab_size, hidden)
        self.head = torch.nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # [B, T, H]
        counts = torch.arange(1, input_ids.shape[1] + 1, device=h.device, dtype=h.dtype)
        h = h.cumsum(dim=1) / counts[None, :, None]
        return self.head(torch.tanh(h))  # [B, T, V]


class NanLM(TinyLM):
    """TinyLM whose logits are NaN at every position holding NAN_TOKEN (a known bad position for tests)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = super().forward(input_ids)
        return torch.where((input_ids == NAN_TOKEN)[..., None], torch.full_like(logits, float("nan")), logits)


class BatchDependentLM(TinyLM):
    """TinyLM whose logits depend on the batch size (like a GPU kernel choosing its algorithm by shape), so
    that rebuilding a shard with another --batch-size gives other bytes."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = super().forward(input_ids)
        tilt = torch.linspace(0.0, 1.0, logits.shape[-1], dtype=logits.dtype, device=logits.device)
        return logits + 0.05 * input_ids.shape[0] * tilt


def tiny_lm_factory() -> TinyLM:
    return TinyLM()


def nan_lm_factory() -> NanLM:
    return NanLM()


def batch_dependent_lm_factory() -> BatchDependentLM:
    return BatchDependentLM()


def failing_factory() -> TinyLM:
    """A --model-factory that fails the way a real one can (its own error, not ours)."""
    raise RuntimeError("this factory needs a GPU with 80 GB")


class _WrongOutputLM(TinyLM):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).sum(dim=-1)  # [B, T]: not logits


def wrong_output_lm_factory() -> TinyLM:
    """A model whose forward returns [B, T] instead of logits [B, T, V]."""
    return _WrongOutputLM()


def save_factory_teacher(path: str | os.PathLike, seed: int = 0) -> Path:
    """Random TinyLM weights as a bare safetensors state dict (use with tiny_lm_factory / nan_lm_factory)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = TinyLM()
    path = Path(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_token_file(path: str | os.PathLike, ids: np.ndarray, kind: str) -> Path:
    """Write token ids in one of the build's input formats.

    Args:
        ids: 1-D stream or 2-D [N, T] ids.
        kind: npy | bin-uint16 | bin-uint32 | parquet | arrow | hf-dataset (rows for 2-D, ints for 1-D).
    """
    import pyarrow as pa

    path = Path(path)
    ids = np.asarray(ids)
    if kind == "npy":
        np.save(path, ids)
        return path
    if kind.startswith("bin-"):
        ids.astype(kind.split("-")[1]).tofile(path)
        return path
    if ids.ndim == 2:
        column = pa.array(list(ids.astype(np.int64)), type=pa.list_(pa.int32()))
    else:
        column = pa.array(ids.astype(np.int64), type=pa.int64())
    table = pa.table({"input_ids": column, "n": pa.array(np.arange(len(column)))})
    if kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif kind == "arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "hf-dataset":
        import datasets

        datasets.Dataset(table).save_to_disk(str(path))
    else:
        raise ValueError(f"unknown kind {kind}")
    return path


@torch.inference_mode()
def reference_targets(logits: torch.Tensor, input_ids: torch.Tensor, topk: int, temperatures=()) -> dict[str, np.ndarray]:
    """The naive torch computation of everything a cache stores, from logits [N, T, V] (fp32)."""
    logits = logits.double()
    logprobs = torch.log_softmax(logits, dim=-1)  # [N, T, V]
    values, ids = torch.topk(logprobs, topk, dim=-1)  # [N, T, K]
    out = {
        "logprobs": logprobs.float().numpy(),
        "topk_ids": ids.numpy(),
        "topk_logprobs": values.float().numpy(),
        "lse": torch.logsumexp(logits, dim=-1).float().numpy(),
        "seq_nll": (-logprobs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1).mean(1)).float().numpy(),
        "seq_entropy": (-(logprobs.exp() * logprobs).sum(-1).mean(1)).float().numpy(),
    }
    for tau in temperatures:
        out[f"lse_t{float(tau):g}"] = torch.logsumexp(logits / tau, dim=-1).float().numpy()
    return out
