"""Bytes per token of one teacher output stored three ways: kdcache (the cache as built), axolotl-style Parquet
(zstd; what ``kdcache export --to axolotl`` writes) and DistillKit's codec (its compressed-logit Parquet, zstd),
twice: with the README's "budget" settings at k = the cache's K (exact_k 1 bfloat16, polynomial [0, 1, sqrt];
lossy), and lossless (``-exact``: exact_k = K in the cache's log-prob dtype, no polynomial), so the lossless
formats are compared with each other too (``bytes_vs_best_lossless_peer``).

``storage_rows(cache_dir, tmp_dir)`` is what benchmarks/compare_peers.py calls; ``python -m
benchmarks._peers_bytes [CACHE]`` prints one JSON line per format (without CACHE: a small synthetic cache).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["storage_rows"]


# DistillKit rows: format name -> whether its settings keep every bit of the cache's log-probs.
_DISTILLKIT_FORMATS = {"distillkit-parquet-zstd": False, "distillkit-parquet-zstd-exact": True}


def _distillkit_config(layout, exact: bool = False):
    """The budget settings (lossy), or ``exact``: every value in the cache's log-prob dtype (lossless)."""
    from cache_server.interop import distillkit_codec as codec

    if exact:
        return codec.CodecConfig(d=layout.vocab_size, k=layout.topk, exact_k=layout.topk,
                                 exact_dtype=np.dtype(layout.logprob_dtype).name, polynomial_terms=(),
                                 delta_encoding=False)
    return codec.CodecConfig(d=layout.vocab_size, k=layout.topk, exact_k=1, exact_dtype="bfloat16",
                             polynomial_terms=(0, 1, "sqrt"), delta_encoding=False)


def _distillkit_parquet(cache_dir: Path, out: Path, exact: bool = False) -> tuple[int, int]:
    """DistillKit's layout of the cache's top-k (L-1 positions per row); returns (file bytes, codec bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cache_server import format as fmt
    from cache_server.build.merge import CacheRows
    from cache_server.interop import distillkit_codec as codec

    manifest = fmt.load_manifest(cache_dir)
    layout = fmt.layout_from_manifest(manifest)
    rows = CacheRows(cache_dir, manifest, layout)
    K, T = layout.topk, layout.seq_len
    config = _distillkit_config(layout, exact)
    bits = codec.index_bits(layout.vocab_size)
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.uint64())),
                        pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    raw = 0
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for index in range(layout.num_shards):
            start, stop = layout.shard_range(index)
            n = stop - start
            x = rows.read("input_ids", start, stop)
            ids = rows.read("topk_ids", start, stop)[:, :-1].reshape(-1, K)
            lp = rows.read("topk_logprobs", start, stop)[:, :-1].reshape(-1, K).astype(np.float32)
            values = codec.encode_logprobs(lp, config).reshape(n, T - 1, -1)
            packed = codec.pack_bits(ids, bits).reshape(n, T - 1, -1)
            raw += values.nbytes + packed.nbytes
            writer.write_table(pa.table({"input_ids": x.astype(np.uint64).tolist(),
                                         "compressed_logprobs": values.tolist(),
                                         "bytepacked_indices": packed.tolist()}, schema=schema))
    return out.stat().st_size, raw


def _value_checks(cache_dir: Path, axolotl: Path, distillkit: dict[str, Path]) -> dict[str, dict]:
    """Read the peers' files back and compare them with the cache's decoded top-k, so the bytes counted are
    the same teacher output: axolotl's Parquet exactly (ids, fp32 of the cached log-probs, tokens, the masked
    last row); DistillKit's ids exactly, its exact settings' log-probs exactly, its lossy ones as errors in nats
    (max, mean; ``ok`` needs a mean under 0.5 nats: this codec's is ~0.01 on synthetic and ~0.08 on a trained
    teacher's long tails, a misread file's is several nats). ``distillkit``: {format name: file}."""
    import pyarrow.parquet as pq

    from cache_server import format as fmt
    from cache_server.build.merge import CacheRows
    from cache_server.interop import distillkit_codec as codec

    manifest = fmt.load_manifest(cache_dir)
    layout = fmt.layout_from_manifest(manifest)
    rows = CacheRows(cache_dir, manifest, layout)
    N, K = layout.num_sequences, layout.topk
    x, ids, lp = (rows.read(name, 0, N) for name in ("input_ids", "topk_ids", "topk_logprobs"))
    got = pq.read_table(axolotl, columns=["input_ids", "target_token_ids", "target_logprobs", "target_mask"])
    got = {name: np.array(got.column(name).to_pylist()) for name in got.column_names}
    mask = np.ones(ids.shape, np.int8)
    mask[:, -1] = 0
    axolotl_ok = (np.array_equal(got["input_ids"], x.astype(np.int64)) and np.array_equal(got["target_token_ids"], ids)
                  and np.array_equal(got["target_logprobs"], lp.astype(np.float32))
                  and np.array_equal(got["target_mask"], mask))
    checks = {"axolotl-parquet-zstd": {"ok": bool(axolotl_ok), "exact": True}}
    want = lp[:, :-1].reshape(-1, K).astype(np.float32)
    for name, path in distillkit.items():
        exact = _DISTILLKIT_FORMATS[name]
        table = pq.read_table(path)
        packed = np.array(table.column("bytepacked_indices").to_pylist(), dtype=np.uint8)  # [N, T-1, bytes]
        raw = np.array(table.column("compressed_logprobs").to_pylist(), dtype=np.uint8)
        dk_ids = codec.unpack_bits(packed.reshape(-1, packed.shape[-1]), codec.index_bits(layout.vocab_size), K)
        dk_lp = codec.decode_logprobs(raw.reshape(-1, raw.shape[-1]), _distillkit_config(layout, exact))
        ids_ok = np.array_equal(dk_ids, ids[:, :-1].reshape(-1, K).astype(np.int64))
        if exact:  # bit for bit, non-finite values included
            values_ok = np.array_equal(dk_lp.astype(lp.dtype).view(np.uint8), want.astype(lp.dtype).view(np.uint8))
            checks[name] = {"ok": bool(ids_ok and values_ok), "exact": True}
            continue
        err = np.abs(dk_lp - want)[np.isfinite(want)]
        checks[name] = {"ok": bool(ids_ok and np.isfinite(err).all() and err.mean() < 0.5), "ids_exact": bool(ids_ok),
                        "logprob_max_abs_err_nats": round(float(err.max()), 4),
                        "logprob_mean_abs_err_nats": round(float(err.mean()), 4)}
    return checks


def storage_rows(cache_dir: str | Path, tmp_dir: str | Path) -> list[dict]:
    """One dict per format: ``format``, ``bytes``, ``tokens``, ``bytes_per_token`` (+ notes)."""
    from cache_server import format as fmt
    from cache_server.interop import ExportOptions, export_cache

    cache_dir, tmp_dir = Path(cache_dir), Path(tmp_dir)
    manifest = fmt.load_manifest(cache_dir)
    tokens = int(manifest["stats"]["tokens"])
    K = int(manifest["topk"])
    rows = [{"format": "kdcache", "bytes": int(manifest["stats"]["stored_bytes"]), "tokens": tokens,
             "lossless": manifest.get("logprob_codec", "exact") == "exact",
             "note": f"format v{manifest['format_version']}, {manifest.get('logprob_codec', 'exact')} log-probs, "
                     "incl. lse and per-sequence stats"}]
    axolotl = tmp_dir / "peers_axolotl.parquet"
    export_cache(ExportOptions(cache=str(cache_dir), to="axolotl", out=str(axolotl), overwrite=True, progress=False),
                 log=lambda _: None)
    rows.append({"format": "axolotl-parquet-zstd", "bytes": axolotl.stat().st_size, "tokens": tokens, "lossless": True,
                 "note": "input_ids, labels, attention_mask, target_token_ids, target_logprobs (fp32), target_mask"})
    distillkit = {}
    for name, exact in _DISTILLKIT_FORMATS.items():
        distillkit[name] = tmp_dir / f"peers_{name}.parquet"
        size, raw = _distillkit_parquet(cache_dir, distillkit[name], exact)
        settings = (f"exact_k {K} in {manifest.get('logprob_dtype', 'float16')} (lossless)" if exact else
                    "exact_k 1 bf16 + polynomial [0,1,sqrt] (lossy)")
        rows.append({"format": name, "bytes": size, "tokens": tokens, "lossless": exact,
                     "note": f"k={K}, {settings}; codec alone {raw / tokens:.1f} B/token"})
    checks = _value_checks(cache_dir, axolotl, distillkit)
    for row in rows:
        row["bytes_per_token"] = round(row["bytes"] / row["tokens"], 2)
        if row["format"] in checks:
            row["value_check"] = checks[row["format"]]
            if not checks[row["format"]]["ok"]:
                raise ValueError(f"{row['format']}: the file read back differs from the cache: {checks[row['format']]}")
    return rows


def real_caches(work: Path, *, steps: int = 200, vocab: int = 2048, seq_len: int = 128, topk: int = 32,
                sequences: int = 64) -> dict[str, Path]:
    """A real teacher output: a BPE tokenizer and a Llama 2x64 trained ``steps`` AdamW steps on the Python stdlib's
    source (examples/_demo_corpus.py, nothing downloaded), then ``kdcache build`` of the same ``sequences`` x
    ``seq_len`` tokens at top-``topk`` with each codec option; returns {option name: cache dir} (reused if built)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "examples"))
    from _demo_corpus import stdlib_files, tokenize, train_teacher, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    files = stdlib_files(600_000)
    tokenizer_dir = train_tokenizer(work, files, vocab)
    tokens = np.load(tokenize(work, tokenizer_dir, files))
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    teacher = train_teacher(work, tokens, vocab_size, seq_len, steps, hidden=64, layers=2, name=f"teacher_{steps}")
    n = min(sequences, len(tokens) // seq_len)
    data = work / f"train_{n}x{seq_len}.npy"
    np.save(data, tokens[: n * seq_len].reshape(n, seq_len))
    options = {"kdcache": [], "kdcache-q8": ["--logprob-codec", "q8"], "kdcache-lz4": ["--codec", "blosc-lz4"]}
    out = {}
    for name, extra in options.items():
        cache = work / f"cache_{name}"
        if not (cache / "manifest.json").exists():
            cmd = [sys.executable, "-m", "cache_server", "build", "--teacher", str(teacher), "--data", str(data),
                   "--seq-len", str(seq_len), "--out", str(cache), "--topk", str(topk), "--batch-size", "16", *extra]
            done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"kdcache build {name} failed: {done.stderr.strip()[-600:]}")
        out[name] = cache
    return out


def _synthetic_cache(tmp: Path) -> Path:
    """A 64 x 256 top-32 cache of a Zipf-like teacher over V = 32000, imported from a plain Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cache_server.interop import ImportOptions, run_import

    rng = np.random.default_rng(0)
    n, T, K, V = 64, 256, 32, 32000
    x = rng.zipf(1.3, (n, T)) % V
    nxt = np.concatenate([x[:, 1:], x[:, :1]], axis=1)  # the next token first, then K-1 distinct others
    ids = (nxt[:, :, None] + np.arange(K)[None, None, :] * 7) % V
    logits = -np.sort(rng.exponential(1.0, (n, T, K + 200)), axis=-1)[..., :K] * 2
    lp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.1)).astype(np.float32)
    pq.write_table(pa.table({"input_ids": x.tolist(), "topk_ids": ids.tolist(), "topk_logprobs": lp.tolist()}),
                   tmp / "synthetic.parquet")
    out = tmp / "synthetic_cache"
    run_import(ImportOptions(src=str(tmp / "synthetic.parquet"), kind="parquet", out=str(out), vocab_size=V,
                             progress=False, check_alignment=False), log=lambda _: None)
    return out


def main() -> None:
    """``python -m benchmarks._peers_bytes [CACHE | --real WORK_DIR [--out FILE]]``: one JSON line per format; with
    ``--real``, per codec option of a trained teacher's caches (``real_caches``), the last line a summary."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", nargs="?", default=None, help="a cache directory (default: a synthetic cache)")
    parser.add_argument("--real", default=None, help="work directory for real_caches (built there, reused)")
    parser.add_argument("--out", default=None, help="JSON file for the rows and the summary")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.real:
            caches = real_caches(Path(args.real))
        else:
            caches = {"kdcache": Path(args.cache) if args.cache else _synthetic_cache(Path(tmp))}
        rows = []
        for option, cache in caches.items():
            for result in storage_rows(cache, tmp):
                row = {"benchmark": "peers_bytes", "cache_option": option,
                       "cache": "real" if args.real else (str(cache) if args.cache else "synthetic"), **result}
                rows.append(row)
                print(json.dumps(row))
    lossless = next(r["bytes_per_token"] for r in rows if r["cache_option"] == "kdcache" and r["format"] == "kdcache")
    peers = {r["format"]: r["bytes_per_token"] for r in rows if r["cache_option"] == "kdcache" and r["format"] != "kdcache"}
    exact_peers = [r["format"] for r in rows
                   if r["cache_option"] == "kdcache" and r["format"] != "kdcache" and r.get("lossless")]
    summary = {"benchmark": "peers_bytes", "bytes_cache": "real" if args.real else "given" if args.cache else "synthetic",
               "bytes_vs_best_peer": lossless / min(peers.values()), "best_peer": min(peers, key=peers.get),
               "bytes_vs_best_lossless_peer": lossless / min(v for k, v in peers.items() if k in exact_peers),
               "best_lossless_peer": min(exact_peers, key=peers.get),
               "kdcache_bytes_per_token": {r["cache_option"]: r["bytes_per_token"] for r in rows if r["format"] == "kdcache"},
               "peers_bytes_per_token": peers, "command": " ".join(["python"] + sys.argv)}
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
