"""Benchmark storage options for top-k targets (tracker issue 10): bytes/token and, for lossy ones, KL(q‖q̂).

Measured on REAL teacher output:

1. a Llama TRAINED for ``--train-s`` seconds (AdamW, CPU) on the Python stdlib corpus
   (``Path(os.__file__).parent`` *.py), with a byte-level BPE tokenizer of ``--vocab`` (default 8192) trained
   on the same files; its targets are computed on held-out files (the last ``--holdout`` fraction, sorted by
   name), at least ``--eval-positions`` positions. The trained teacher is cached under ``--work-dir`` and reused.
2. the random-init GPT-2-shaped teacher of ``bench_build.py`` (hidden 768, 12 layers, 12 heads, V=50,257),
   on ``--gpt2-positions`` held-out stdlib positions.

Targets come from ``cache_server.build.targets.compute_targets`` (top-K ids, fp32 log-probs rounded to fp16
as the cache stores them, lse fp32). Each option is encoded, compressed per inner chunk (the cache's
``plan_chunking``) with the ``CODEC_PRESETS`` blosc presets and with plain zstd (level 3), and its bytes
divided by the positions. Options:

* ids: ``raw`` uint16 (cache v1); ``sorted_delta_perm`` ids sorted ascending, delta-coded along K (uint16,
  first entry absolute) + the uint8 permutation back to descending-probability order; ``sorted_delta_idorder``
  the same deltas without a permutation: values are then stored in ascending-id order too (so they pair with
  value options ``*_idorder``); ``bitpack`` ceil(log2 V) bits per id (``numpy.packbits``).
* values (lossless): ``fp16`` raw; ``fp16_delta`` fp16 bit patterns delta-coded along K (mod 2^16).
* values (lossy, opt-in): ``u8_R{R}`` lp_0 as fp16 + uint8 codes of (lp_0 − lp_j) scaled over [0, R]
  (clipped at R); ``u8_R{R}_delta`` the same codes delta-coded along K (lossless on the codes);
  ``head4_u8_R{R}`` first 4 log-probs exact fp16 + the rest as uint8 codes relative to lp_0;
  ``u8_R{R}_idorder`` lp_0 fp16 + all K codes in ascending-id order (pairs with ``sorted_delta_idorder``).
* rest: ``input_ids``, ``lse`` (fp32), ``seq_nll``, ``seq_entropy`` as the cache stores them, so totals are
  bytes per token of a whole cache (one compressor for all arrays, as in format v1).

KL(q‖q̂) in nats per position, q = stored top-K probabilities exp(fp16 log-probs) plus the tail bucket
1 − Σ (clamped at 0, renormalised), q̂ the same after dequantisation (tail floored at 1e-12). Every lossless
option is decoded and asserted bit-exact; the KL routine is checked against a direct computation.

The format itself is then measured: the trained teacher's arrays are written through the real format v2
writer (``cache_server.format.write_shard``; ``v1``, ``v2`` exact and ``v2`` q8 layouts), every shard file's
bytes summed, every array decoded back with ``decode_shard_group`` and checked (lossless: bit-exact in
canonical order; q8: KL as above). Sampled targets: N ids per position drawn with numpy from the teacher's exact
full-vocabulary probabilities (inverse CDF), N chosen from ``SAMPLE_DRAWS`` as the one whose mean number of
distinct ids per position is closest to 12, stored as ``sample_ids``/``sample_counts`` (with and without
``sample_logprobs``) in W = max distinct slots through the same writer.

Last stdout line: one JSON object. Results: ``benchmarks/results/bench_codecs_quick.{csv,json}``
(``bench_codecs`` without ``--quick``).

Usage::

    python benchmarks/bench_codecs.py --quick
    python benchmarks/bench_codecs.py --train-s 600 --eval-positions 400000 --work-dir /tmp/kdcache_codecs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import train_for_seconds, write_results  # noqa: E402
from cache_server import format as fmt  # noqa: E402
from cache_server.build.targets import compute_targets  # noqa: E402

EOS = "<|endoftext|>"
TOPK = 32
SEQ_LEN = 128
RANGES = (8.0, 12.0, 16.0, 24.0)  # lossy: fixed log-prob ranges below the head mapped onto uint8 codes
KL_TARGET = 1e-3
SAMPLE_DRAWS = (8, 12, 16, 20, 24, 32, 48, 64)  # candidate N; the one giving ~12 distinct ids per position is kept
UNIQUE_TARGET = 12.0


# ----------------------------------------------------------------------------------------------- data / teacher
def stdlib_files() -> list[str]:
    """All top-level stdlib *.py sources, sorted by name (deterministic corpus)."""
    out = []
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        try:
            out.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def tokenize(work: Path, vocab: int, holdout: float) -> tuple[np.ndarray, np.ndarray, object]:
    """Train (or reuse) a byte-level BPE on the training files; return (train stream, held-out stream, tok)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = stdlib_files()
    split = int(len(docs) * (1 - holdout))
    path = work / f"tokenizer_v{vocab}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs[:split], trainer=trainer)
        tok.save(str(path))
    eos = tok.token_to_id(EOS)

    def stream(part: list[str]) -> np.ndarray:
        ids: list[int] = []
        for enc in tok.encode_batch(part, add_special_tokens=False):
            ids.extend(enc.ids + [eos])
        return np.asarray(ids, dtype=np.int64)

    return stream(docs[:split]), stream(docs[split:]), tok


def llama(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def trained_teacher(work: Path, train: np.ndarray, args) -> tuple[object, dict]:
    """Train a small Llama for ``args.train_s`` seconds, or reuse the one saved under ``work`` with this config."""
    from transformers import LlamaForCausalLM

    key = f"v{args.vocab}_h{args.hidden}_L{args.layers}_s{int(args.train_s)}"
    out, meta_path = work / f"teacher_{key}", work / f"teacher_{key}" / "train_meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return LlamaForCausalLM.from_pretrained(out).eval(), {**meta, "reused": True}
    model = llama(args.vocab, args.hidden, args.layers, max(1, args.hidden // 64), 1, seed=1)
    t0 = time.perf_counter()
    losses = train_for_seconds(model, train, SEQ_LEN, args.train_s)
    steps = len(losses)
    model.eval().save_pretrained(out, safe_serialization=True)
    meta = {"steps": steps, "batch": [16, SEQ_LEN], "train_s": round(time.perf_counter() - t0, 1),
            "first_loss": round(losses[0], 3), "final_loss_mean_last20": round(float(np.mean(losses[-20:])), 3),
            "train_tokens": int(len(train))}
    meta_path.write_text(json.dumps(meta))
    return model, {**meta, "reused": False}


def shifted_cdf(logprobs: np.ndarray) -> np.ndarray:
    """Row r's CDF of exp(logprobs) [P, V] plus r, flattened: one searchsorted then draws for every row."""
    cdf = np.cumsum(np.exp(logprobs.astype(np.float64)), axis=-1)
    cdf /= cdf[:, -1:]
    cdf += np.arange(len(cdf), dtype=np.float64)[:, None]
    return cdf.reshape(-1)


def draw_samples(logprobs: np.ndarray, cdf: np.ndarray, draws: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """N draws per row from exp(logprobs) [P, V] (inverse CDF, numpy) -> slots [P, N]: distinct ids (any order,
    padding last with count 0 and id 0), their counts (uint8) and exact log-probs (fp16)."""
    P, V = logprobs.shape
    u = rng.random((P, draws)) + np.arange(P, dtype=np.float64)[:, None]
    drawn = np.searchsorted(cdf, u.reshape(-1), side="right").reshape(P, draws)
    ids = np.minimum(drawn - np.arange(P)[:, None] * V, V - 1)
    keys, counts = np.unique(ids + np.arange(P)[:, None] * V, return_counts=True)
    rows, uniq = keys // V, keys % V
    first = np.searchsorted(rows, np.arange(P))
    slot = np.arange(len(keys)) - first[rows]
    out = {"sample_ids": np.zeros((P, draws), np.int64), "sample_counts": np.zeros((P, draws), np.uint8),
           "sample_logprobs": np.zeros((P, draws), np.float16)}
    out["sample_ids"][rows, slot] = uniq
    out["sample_counts"][rows, slot] = counts
    out["sample_logprobs"][rows, slot] = logprobs[rows, uniq]
    assert (out["sample_counts"].sum(-1) == draws).all()
    return out


def teacher_targets(model, stream: np.ndarray, positions: int, batch: int = 16,
                    draws: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Cache arrays (v1 dtypes) for the first ``positions`` // T sequences of ``stream``, plus for each N in
    ``draws`` the sampled slots ``sample_ids@N`` / ``sample_counts@N`` / ``sample_logprobs@N`` [n, T, N]."""
    n = min(len(stream) // SEQ_LEN, -(-positions // SEQ_LEN))
    seqs = stream[: n * SEQ_LEN].reshape(n, SEQ_LEN)
    parts: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for b0 in range(0, n, batch):
            ids = torch.from_numpy(seqs[b0 : b0 + batch])
            logits = model(input_ids=ids, use_cache=False).logits
            out = compute_targets(logits, ids, TOPK)
            assert bool(out["finite"].all())
            for k in ("topk_ids", "topk_logprobs", "lse", "seq_nll", "seq_entropy"):
                parts.setdefault(k, []).append(out[k].numpy())
            if draws:
                full = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1]).numpy()
                cdf = shifted_cdf(full)
                for d in draws:
                    for k, v in draw_samples(full, cdf, d, rng).items():
                        parts.setdefault(f"{k}@{d}", []).append(v.reshape(len(ids), SEQ_LEN, d))
    v = model.config.vocab_size
    arr = {k: np.concatenate(p) for k, p in parts.items()}
    arr["topk_ids"] = arr["topk_ids"].astype(fmt.ids_dtype_for_vocab(v))
    arr["topk_logprobs"] = arr["topk_logprobs"].astype(np.float16)
    arr["input_ids"] = seqs.astype(fmt.ids_dtype_for_vocab(v))
    for key in [k for k in arr if k.startswith("sample_ids@")]:
        arr[key] = arr[key].astype(fmt.ids_dtype_for_vocab(v))
    return arr


# ----------------------------------------------------------------------------------------------- the format itself
def write_format(work: Path, layout: fmt.CacheLayout, arrays: dict[str, np.ndarray]) -> tuple[float, dict]:
    """Write ``arrays`` through the real writer (create_arrays + write_shard); (bytes/token, decoded arrays)."""
    import shutil

    out = work / "format_probe"
    shutil.rmtree(out, ignore_errors=True)
    fmt.create_arrays(out, layout, attributes=fmt.group_attributes(layout))
    total, decoded = 0, {spec.name: [] for spec in layout.arrays()}
    specs = {spec.name: spec for spec in layout.arrays()}
    for i in range(layout.num_shards):
        a, b = layout.shard_range(i)
        files = fmt.write_shard(out, layout, i, {spec.name: arrays[spec.name][a:b] for spec in layout.arrays()})
        total += sum(f["nbytes"] for f in files.values())
        raws = {name: (out / fmt.shard_relpath(name, i, 1 + len(spec.trailing_shape))).read_bytes()
                for name, spec in specs.items()}
        for name, spec in specs.items():
            inputs = fmt.decode_inputs(layout, name)
            decoded[name].append(fmt.decode_shard(raws[name], spec, layout, i,
                                                  companions={k: raws[k] for k in inputs}))
    shutil.rmtree(out, ignore_errors=True)
    return total / (layout.num_sequences * layout.seq_len), {k: np.concatenate(v) for k, v in decoded.items()}


def _layout(arr: dict[str, np.ndarray], vocab: int, **kw) -> fmt.CacheLayout:
    n, t = arr["input_ids"].shape
    width = kw.get("sample_slots") or arr["topk_ids"].shape[-1]
    shard, chunk = fmt.plan_chunking(t, width, vocab, num_sequences=n)
    return fmt.CacheLayout(num_sequences=n, seq_len=t, topk=kw.pop("topk", arr["topk_ids"].shape[-1]),
                           vocab_size=vocab, shard_seqs=shard, chunk_seqs=chunk, **kw)


def measure_format(work: Path, arr: dict[str, np.ndarray], vocab: int) -> dict:
    """bytes/token of the whole cache as the format writes it: v1, v2 exact, v2 q8 (+ KL), sampled v2."""
    from cache_server.format import slots

    base = {k: arr[k] for k in ("input_ids", "topk_ids", "topk_logprobs", "lse", "seq_nll", "seq_entropy")}
    result = {}
    for name, kw in (("v1", {"format_version": 1}), ("v2_exact", {}), ("v2_q8", {"logprob_codec": "q8"})):
        layout = _layout(base, vocab, **kw)
        bpt, decoded = write_format(work, layout, base)
        canonical = slots.canonicalize(_layout(base, vocab), base)  # exact canonical order
        row = {"bytes_per_token": round(bpt, 3)}
        if name == "v2_q8":
            kl = kl_with_tail(canonical["topk_logprobs"], decoded["topk_logprobs"].astype(np.float64))
            row.update(kl_nats_mean=float(kl.mean()), kl_nats_p99=float(np.quantile(kl, 0.99)),
                       kl_nats_max=float(kl.max()))
        else:
            want = base if name == "v1" else canonical
            for k in base:
                assert np.array_equal(decoded[k], want[k]), f"{name}: {k} did not round-trip bit-exactly"
        result[name] = row
    result["sampled"] = measure_sampled(work, arr, vocab)
    return result


def measure_sampled(work: Path, arr: dict[str, np.ndarray], vocab: int) -> dict:
    """The N of SAMPLE_DRAWS closest to UNIQUE_TARGET distinct ids per position, written as a sample cache."""
    unique = {d: float((arr[f"sample_counts@{d}"] > 0).sum(-1).mean()) for d in SAMPLE_DRAWS}
    d = min(unique, key=lambda k: abs(unique[k] - UNIQUE_TARGET))
    counts = arr[f"sample_counts@{d}"]
    width = int((counts > 0).sum(-1).max())
    sampled = {"sample_ids": arr[f"sample_ids@{d}"][..., :width], "sample_counts": counts[..., :width],
               "sample_logprobs": arr[f"sample_logprobs@{d}"][..., :width]}
    rest = {k: arr[k] for k in ("input_ids", "lse", "seq_nll", "seq_entropy")}
    out = {"draws": d, "slots": width, "unique_per_position": round(unique[d], 3),
           "unique_per_position_by_draws": {str(k): round(v, 3) for k, v in unique.items()}}
    for with_lp in (True, False):
        layout = _layout({**rest, "topk_ids": sampled["sample_ids"]}, vocab, topk=0, targets="sample", samples=d,
                         sample_slots=width, sample_logprobs=with_lp)
        arrays = {**rest, **sampled}
        bpt, decoded = write_format(work, layout, arrays)
        for k in ("sample_ids", "sample_counts", "sample_logprobs") if with_lp else ("sample_ids", "sample_counts"):
            # A set per position: compare as sorted (id, count) pairs (the writer is handed any slot order).
            key_want = np.sort(arrays["sample_ids"].astype(np.int64) * 1024 + arrays["sample_counts"], -1)
            key_have = np.sort(decoded["sample_ids"].astype(np.int64) * 1024 + decoded["sample_counts"], -1)
            assert np.array_equal(key_want, key_have), f"sampled {k} did not round-trip"
        out["bytes_per_token" if with_lp else "bytes_per_token_without_logprobs"] = round(bpt, 3)
    return out


# ----------------------------------------------------------------------------------------------- encoders
# Every encoder maps the whole [N, T, K] array(s) to a list of streams with leading axis N (sequences), so each
# stream is compressed per inner chunk of C sequences exactly like a cache array.
def delta_k(x: np.ndarray) -> np.ndarray:
    """Delta along the last axis in x's unsigned dtype (wraps; exactly inverted by cumsum in that dtype)."""
    d = x.copy()
    d[..., 1:] = np.diff(x, axis=-1)
    return d


def undelta_k(d: np.ndarray) -> np.ndarray:
    return np.cumsum(d, axis=-1, dtype=d.dtype)


def ids_options(ids: np.ndarray, vocab: int) -> dict[str, tuple[list[np.ndarray], str]]:
    """{name: (streams, value order)}; each decoded and asserted bit-exact here."""
    order = np.argsort(ids, axis=-1, kind="stable")
    srt = np.take_along_axis(ids, order, -1)
    d = delta_k(srt)
    rec = np.empty_like(ids)
    np.put_along_axis(rec, order, undelta_k(d), -1)
    assert np.array_equal(rec, ids) and order.max() < 256
    bits = max(1, int(np.ceil(np.log2(vocab))))
    n = ids.shape[0]
    unpacked = ((ids.astype(np.uint32)[..., None] >> np.arange(bits - 1, -1, -1, dtype=np.uint32)) & 1)
    packed = np.packbits(unpacked.astype(np.uint8).reshape(n, -1), axis=-1)  # [N, ceil(T*K*bits/8)]
    back = np.unpackbits(packed, axis=-1)[:, : ids[0].size * bits].reshape(*ids.shape, bits)
    assert np.array_equal((back.astype(np.uint32) << np.arange(bits - 1, -1, -1, dtype=np.uint32)).sum(-1), ids)
    return {
        "raw": ([ids], "topk"),
        "sorted_delta_perm": ([d, order.astype(np.uint8)], "topk"),
        "sorted_delta_idorder": ([d], "idorder"),
        f"bitpack{bits}": ([packed], "topk"),
    }


def lossless_value_options(lp: np.ndarray, order: np.ndarray) -> dict[str, tuple[list[np.ndarray], str]]:
    """fp16 raw and fp16 bit-delta, in top-k order and in ascending-id order; roundtrips asserted."""
    out = {}
    for suffix, arr, kind in (("", lp, "topk"), ("_idorder", np.take_along_axis(lp, order, -1), "idorder")):
        bits = arr.view(np.uint16)
        d = delta_k(bits)
        assert np.array_equal(undelta_k(d).view(np.float16), arr, equal_nan=True)
        assert np.array_equal(undelta_k(d), bits)
        out["fp16" + suffix] = ([arr], kind)
        out["fp16_delta" + suffix] = ([d], kind)
    return out


def quantize_rel(lp: np.ndarray, exact: int, rng: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact fp16 head [N,T,exact], uint8 codes of lp_0 − lp_j for j ≥ exact, dequantised log-probs fp64)."""
    lp64 = lp.astype(np.float64)
    rel = lp64[..., :1] - lp64[..., exact:]  # ≥ 0: log-probs are sorted descending
    codes = np.clip(np.rint(rel * (255.0 / rng)), 0, 255).astype(np.uint8)
    deq = lp64.copy()
    deq[..., exact:] = lp64[..., :1] - codes.astype(np.float64) * (rng / 255.0)
    return lp[..., :exact].copy(), codes, deq


def lossy_value_options(lp: np.ndarray, order: np.ndarray) -> dict[str, tuple[list[np.ndarray], np.ndarray, str]]:
    """{name: (streams, dequantised log-probs, value order)} for u8 relative-to-head codes per range in RANGES.

    ``u8_R{R}_idorder``: lp_0 fp16 + all K codes (the head's is 0) in ascending-id order, to pair with
    ``sorted_delta_idorder`` ids; the head is the entry with code 0, and the descending order is the codes'.
    """
    assert np.all(np.diff(lp.astype(np.float32), axis=-1) <= 0), "top-k log-probs must be sorted descending"
    out = {}
    for rng in RANGES:
        for exact, prefix in ((1, "u8"), (4, "head4_u8")):
            head, codes, deq = quantize_rel(lp, exact, rng)
            dc = delta_k(codes)
            assert np.array_equal(undelta_k(dc), codes)
            out[f"{prefix}_R{rng:g}"] = ([head, codes], deq, "topk")
            out[f"{prefix}_R{rng:g}_delta"] = ([head, dc], deq, "topk")
            if exact == 1:
                full = np.concatenate([np.zeros_like(codes[..., :1]), codes], -1)
                by_id = np.take_along_axis(full, order, -1)
                back = np.empty_like(by_id)
                np.put_along_axis(back, order, by_id, -1)
                assert np.array_equal(back, full)
                out[f"{prefix}_R{rng:g}_idorder"] = ([head, by_id], deq, "idorder")
    return out


def kl_with_tail(lp: np.ndarray, lp_hat: np.ndarray) -> np.ndarray:
    """KL(q‖q̂) per position in nats; q = (exp(lp), tail) renormalised, tail = max(1 − Σ, 0); q̂ tail ≥ 1e-12."""
    def dist(x: np.ndarray, floor: float) -> np.ndarray:
        p = np.exp(x.astype(np.float64))
        tail = np.maximum(1.0 - p.sum(-1, keepdims=True), floor)
        full = np.concatenate([p, tail], -1)
        return full / full.sum(-1, keepdims=True)

    q, qh = dist(lp, 0.0), dist(lp_hat, 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(q) - np.log(qh)), 0.0)
    return terms.sum(-1)


def check_kl() -> None:
    """kl_with_tail against torch's kl_div on random sorted log-probs, and KL(q‖q) = 0."""
    g = np.random.default_rng(0)
    x = np.sort(np.log(g.dirichlet(np.ones(40), size=64))[:, :TOPK], -1)[:, ::-1].astype(np.float16)
    y = (x.astype(np.float64) + g.normal(0, 0.05, x.shape)).clip(max=-1e-3)
    mine = kl_with_tail(x, y)
    p = np.exp(x.astype(np.float64)); tp = np.maximum(1 - p.sum(-1, keepdims=True), 0)  # noqa: E702
    r = np.exp(y); tr = np.maximum(1 - r.sum(-1, keepdims=True), 1e-12)  # noqa: E702
    q = np.concatenate([p, tp], -1); q /= q.sum(-1, keepdims=True)  # noqa: E702
    qh = np.concatenate([r, tr], -1); qh /= qh.sum(-1, keepdims=True)  # noqa: E702
    ref = torch.nn.functional.kl_div(torch.from_numpy(np.log(qh)), torch.from_numpy(q), reduction="none").sum(-1)
    assert np.allclose(mine, ref.numpy(), rtol=1e-9, atol=1e-12), "KL routine disagrees with torch"
    assert np.abs(kl_with_tail(x, x.astype(np.float64))).max() < 1e-12


# ----------------------------------------------------------------------------------------------- compression
def compressors() -> dict:
    import numcodecs

    presets = {}
    for name in ("blosc-zstd", "blosc-zstd-bitshuffle"):
        (c,) = fmt.CODEC_PRESETS[name]
        shuffle = {"shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[c["shuffle"]]
        presets[name] = numcodecs.Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=shuffle)
    presets["zstd"] = numcodecs.Zstd(level=fmt.CODEC_PRESETS["zstd"][0]["level"])
    return presets


def stream_bytes(streams: list[np.ndarray], chunk: int, codecs: dict) -> dict[str, int]:
    """Compressed bytes of the streams, per inner chunk of ``chunk`` sequences, for every compressor."""
    out = {}
    for name, codec in codecs.items():
        total = 0
        for s in streams:
            for c0 in range(0, len(s), chunk):
                part = np.ascontiguousarray(s[c0 : c0 + chunk])
                enc = codec.encode(part)
                total += len(enc)
        out[name] = total
    return out


def measure(arr: dict[str, np.ndarray], vocab: int) -> dict:
    """bytes/token of every option (per compressor) and KL of the lossy ones, for one teacher's arrays."""
    n, t, k = arr["topk_ids"].shape
    tokens = n * t
    _, chunk = fmt.plan_chunking(t, k, vocab, num_sequences=n)
    codecs = compressors()

    def bpt(streams):
        return {c: b / tokens for c, b in stream_bytes(streams, chunk, codecs).items()}

    # Round trip of the blosc codecs themselves on one stream (lossless by construction, checked anyway).
    probe = np.ascontiguousarray(arr["topk_logprobs"][:chunk])
    for codec in codecs.values():
        assert np.array_equal(np.frombuffer(codec.decode(codec.encode(probe)), np.float16).reshape(probe.shape),
                              probe, equal_nan=True)
    order = np.argsort(arr["topk_ids"], axis=-1, kind="stable")
    ids = {name: (bpt(s), kind) for name, (s, kind) in ids_options(arr["topk_ids"], vocab).items()}
    vals = {name: (bpt(s), kind) for name, (s, kind) in lossless_value_options(arr["topk_logprobs"], order).items()}
    lossy = {}
    for name, (s, deq, kind) in lossy_value_options(arr["topk_logprobs"], order).items():
        kl = kl_with_tail(arr["topk_logprobs"], deq)
        lossy[name] = (bpt(s), {"mean": float(kl.mean()), "p99": float(np.quantile(kl, 0.99)),
                                "max": float(kl.max()), "order": kind})
    rest_names = ("input_ids", "lse", "seq_nll", "seq_entropy")
    rest = {name: bpt([arr[name]]) for name in rest_names}
    v1 = {c: ids["raw"][0][c] + vals["fp16"][0][c] + sum(rest[r][c] for r in rest_names) for c in codecs}
    return {"tokens": tokens, "chunk_seqs": chunk, "codecs": list(codecs), "ids": ids, "values": vals,
            "lossy": lossy, "rest": rest, "v1_total": v1}


# ----------------------------------------------------------------------------------------------- tables
def combos(m: dict) -> tuple[list[dict], list[dict]]:
    """Whole-cache totals (one compressor for every array): lossless ids×values pairs and lossy ones."""
    lossless, lossy = [], []
    for c in m["codecs"]:
        rest = sum(v[c] for v in m["rest"].values())
        for iname, (ib, ikind) in m["ids"].items():
            for vname, (vb, vkind) in m["values"].items():
                if ikind == vkind:
                    lossless.append({"codec": c, "ids": iname, "values": vname,
                                     "bytes_per_token": ib[c] + vb[c] + rest})
            for vname, (vb, kl) in m["lossy"].items():
                if kl["order"] != ikind:
                    continue
                lossy.append({"codec": c, "ids": iname, "values": vname, "bytes_per_token": ib[c] + vb[c] + rest,
                              "kl_nats_mean": kl["mean"], "kl_nats_p99": kl["p99"], "kl_nats_max": kl["max"]})
    return sorted(lossless, key=lambda r: r["bytes_per_token"]), sorted(lossy, key=lambda r: r["bytes_per_token"])


def rows_for(teacher: str, m: dict, lossless: list[dict], lossy: list[dict]) -> list[dict]:
    """Flat CSV rows: every part option per compressor, then every whole-cache combination."""
    rows = []
    for c in m["codecs"]:
        for part in ("ids", "values"):
            for name, (b, kind) in m[part].items():
                rows.append({"teacher": teacher, "kind": part, "option": name, "value_order": kind, "codec": c,
                             "bytes_per_token": round(b[c], 3), "lossless": True})
        for name, (b, kl) in m["lossy"].items():
            rows.append({"teacher": teacher, "kind": "values_lossy", "option": name, "value_order": kl["order"],
                         "codec": c,
                         "bytes_per_token": round(b[c], 3), "lossless": False,
                         "kl_nats_mean": kl["mean"], "kl_nats_p99": kl["p99"], "kl_nats_max": kl["max"]})
        for name, b in m["rest"].items():
            rows.append({"teacher": teacher, "kind": "rest", "option": name, "codec": c,
                         "bytes_per_token": round(b[c], 3), "lossless": True})
        rows.append({"teacher": teacher, "kind": "total_v1", "option": "raw+fp16", "codec": c,
                     "bytes_per_token": round(m["v1_total"][c], 3), "lossless": True})
    for r in lossless:
        rows.append({"teacher": teacher, "kind": "total_lossless", "option": f"{r['ids']}+{r['values']}",
                     "codec": r["codec"], "bytes_per_token": round(r["bytes_per_token"], 3), "lossless": True})
    for r in lossy:
        rows.append({"teacher": teacher, "kind": "total_lossy", "option": f"{r['ids']}+{r['values']}",
                     "codec": r["codec"], "bytes_per_token": round(r["bytes_per_token"], 3), "lossless": False,
                     **{k: r[k] for k in ("kl_nats_mean", "kl_nats_p99", "kl_nats_max")}})
    return rows


def summarize(m: dict, lossless: list[dict], lossy: list[dict]) -> dict:
    """Best lossless, best lossy with mean KL ≤ KL_TARGET, and per-part bests for one teacher."""
    ok = [r for r in lossy if r["kl_nats_mean"] <= KL_TARGET]
    r3 = lambda x: round(x, 3)  # noqa: E731
    return {
        "tokens": m["tokens"], "chunk_seqs": m["chunk_seqs"],
        "v1_bytes_per_token": {c: r3(v) for c, v in m["v1_total"].items()},
        "best_lossless": {**lossless[0], "bytes_per_token": r3(lossless[0]["bytes_per_token"])},
        "best_lossy_within_kl": ({**ok[0], "bytes_per_token": r3(ok[0]["bytes_per_token"])} if ok else None),
        "ids_bytes_per_token": {n: {c: r3(b[c]) for c in b} for n, (b, _) in m["ids"].items()},
        "values_bytes_per_token": {n: {c: r3(b[c]) for c in b} for n, (b, _) in m["values"].items()},
        "lossy_values": {n: {"bytes_per_token": {c: r3(b[c]) for c in b}, "kl_nats_mean": kl["mean"],
                             "kl_nats_p99": kl["p99"]} for n, (b, kl) in m["lossy"].items()},
        "rest_bytes_per_token": {n: {c: r3(b[c]) for c in b} for n, b in m["rest"].items()},
    }


# ----------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="≤ 4 min training on 2 threads, ≥ 100k eval positions")
    ap.add_argument("--train-s", type=float, default=None, help="training seconds (default: 200 quick, 900 full)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary of the trained teacher")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--eval-positions", type=int, default=None, help="default: 102,400 quick, 409,600 full")
    ap.add_argument("--gpt2-positions", type=int, default=4096, help="0 skips the random-init GPT-2 teacher")
    ap.add_argument("--holdout", type=float, default=0.15, help="fraction of stdlib files held out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/kdcache_bench_codecs"))
    args = ap.parse_args()
    args.train_s = args.train_s or (200.0 if args.quick else 900.0)
    args.eval_positions = args.eval_positions or (102_400 if args.quick else 409_600)
    return args


def run_teacher(name: str, model, stream: np.ndarray, positions: int,
                work: Path | None = None) -> tuple[dict, list[dict], dict]:
    t0 = time.perf_counter()
    arr = teacher_targets(model, stream, positions, draws=SAMPLE_DRAWS if work else ())
    t1 = time.perf_counter()
    m = measure(arr, model.config.vocab_size)
    lossless, lossy = combos(m)
    s = summarize(m, lossless, lossy)
    tail = 1 - np.exp(arr["topk_logprobs"].astype(np.float64)).sum(-1)
    stats = {"positions": int(arr["lse"].size), "vocab": model.config.vocab_size, "targets_s": round(t1 - t0, 1),
             "measure_s": round(time.perf_counter() - t1, 1), "mean_nll": round(float(arr["seq_nll"].mean()), 3),
             "mean_entropy": round(float(arr["seq_entropy"].mean()), 3),
             "tail_mass_mean": round(float(tail.mean()), 4), "tail_mass_p10": round(float(np.quantile(tail, .1)), 4)}
    if work is not None:
        s["format"] = measure_format(work, arr, model.config.vocab_size)
        print(f"[{name}] format writer: {s['format']}", flush=True)
    print(f"[{name}] {stats}  best lossless {s['best_lossless']}  best lossy {s['best_lossy_within_kl']}",
          flush=True)
    return s, rows_for(name, m, lossless, lossy), stats


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    check_kl()
    train, held, _ = tokenize(args.work_dir, args.vocab, args.holdout)
    if len(held) < args.eval_positions + SEQ_LEN:
        raise SystemExit(f"held-out stream has {len(held)} tokens < {args.eval_positions}: raise --holdout")
    model, train_info = trained_teacher(args.work_dir, train, args)
    desc = (f"Llama h{args.hidden} L{args.layers} trained {train_info['train_s']} s ({train_info['steps']} AdamW "
            f"steps, batch 16x{SEQ_LEN}) on stdlib *.py, byte-level BPE vocab {args.vocab}; held-out files")
    summaries, rows, teachers = {}, [], {}
    s, r, st = run_teacher("trained", model, held, args.eval_positions, work=args.work_dir)
    summaries["trained"], teachers["trained"] = s, {"desc": desc, **train_info, **st}
    rows += r
    if args.gpt2_positions:
        gpt2 = llama(50_257, 768, 12, 12, 12, seed=0).eval()
        s, r, st = run_teacher("random_gpt2", gpt2, held, args.gpt2_positions)
        summaries["random_gpt2"] = s
        teachers["random_gpt2"] = {"desc": "random-init Llama h768 L12 12 heads (GPT-2-small shape), V=50,257, "
                                           "stdlib held-out tokens", **st}
        rows += r
    best = summaries["trained"]
    lossy = best["best_lossy_within_kl"]
    written = best["format"]  # the format's own writer: these are the figures of record
    sampled = written["sampled"]
    result = {
        "topk_lossless_bytes_per_token": written["v2_exact"]["bytes_per_token"],
        "lossy_bytes_per_token": written["v2_q8"]["bytes_per_token"],
        "lossy_kl_nats": written["v2_q8"]["kl_nats_mean"],
        "lossy_kl_nats_p99": written["v2_q8"]["kl_nats_p99"],
        "v1_bytes_per_token": written["v1"]["bytes_per_token"],
        "sampled_bytes_per_token": sampled["bytes_per_token"],
        "sampled_bytes_per_token_without_logprobs": sampled["bytes_per_token_without_logprobs"],
        "sampled_unique_per_position": sampled["unique_per_position"],
        "sampled_draws": sampled["draws"],
        "format_writer": written,
        "stream_model": {"topk_lossless_bytes_per_token": best["best_lossless"]["bytes_per_token"],
                         "topk_lossless_option": best["best_lossless"],
                         "lossy_bytes_per_token": lossy["bytes_per_token"] if lossy else None,
                         "lossy_kl_nats": lossy["kl_nats_mean"] if lossy else None, "lossy_option": lossy,
                         "v1_bytes_per_token": best["v1_bytes_per_token"]["blosc-zstd"]},
        "targets": {"lossless_bytes_per_token": 72, "lossless_aim": 64, "lossy_bytes_per_token": 40,
                    "lossy_kl_nats": KL_TARGET, "sampled_bytes_per_token": 36},
        "meets": {"lossless": written["v2_exact"]["bytes_per_token"] <= 72,
                  "lossy": written["v2_q8"]["bytes_per_token"] <= 40 and written["v2_q8"]["kl_nats_mean"] <= KL_TARGET,
                  "sampled": sampled["bytes_per_token"] <= 36},
        "topk": TOPK, "seq_len": SEQ_LEN, "teacher": teachers,
        "per_teacher": summaries,
    }
    name = "bench_codecs_quick" if args.quick else "bench_codecs"
    write_results(name, result, rows)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
