"""``kdcache export``: a top-k cache as an axolotl KD dataset or a plain top-k Parquet, shard by shard.

Both are one Parquet file (zstd), one row group per cache shard, written with ``pyarrow.parquet.ParquetWriter``
while the shards are read one at a time (checked against the manifest's sha256, ``build.merge.CacheRows``),
so the whole cache is never in memory.

``--to axolotl`` writes the columns axolotl's KD trainer reads (``axolotl.py`` has the sources)::

    input_ids [T] int32, attention_mask [T] int8 (1), labels [T] int64 (= input_ids; the trainer shifts them)
    target_token_ids [T, K] int32, target_logprobs [T, K] float32, target_mask [T, K] int8

With ``alignment="next"`` (default) target row t is cache position t (the distribution over token t+1, what
axolotl's current trainer pairs with hidden state t) and the last row is masked (its label is ignored, as
kdcache's loaders do); with ``"current"`` (axolotl's dataset-strategy convention) row t is position t-1, row 0
is padding (ids 0..K-1, log-prob -inf, mask 0) and position T-1 is not written. The log-probs are the
cache's (full-vocabulary, temperature 1); ``renormalize_topk`` renormalizes them over the k ids, as axolotl's
preprocessing does.

``--to parquet`` writes ``topk_parquet.py``'s layout with ``teacher_lse`` (and ``teacher_lse_t{tau}``), so a
re-import is exact, and the schema metadata ``kdcache`` = {"vocab_size", "temperatures", "alignment"}.

Shape notation::

    n  sequences of one shard    T  sequence length    K  top-k
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cache_server import format as fmt
from cache_server.build.merge import CacheRows
from cache_server.interop.tables import InteropError
from cache_server.interop.topk_parquet import METADATA_KEY

__all__ = ["EXPORT_TARGETS", "ExportOptions", "export_cache"]

EXPORT_TARGETS = ("axolotl", "parquet")
Log = Callable[[str], None]


@dataclass
class ExportOptions:
    """Arguments of one export (see ``kdcache export --help``)."""

    cache: str
    to: str
    out: str
    alignment: str = "next"  # axolotl only: "next" | "current"
    renormalize_topk: bool = False  # axolotl only
    compression: str = "zstd"
    overwrite: bool = False
    progress: bool = True


def _lists(values: np.ndarray):
    """[n, T] -> list<T> column; [n, T, K] -> list<list<K>> column (int32 offsets, one copy of the values)."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    for width, count in ((values.shape[2], values.shape[0] * values.shape[1]),) if values.ndim == 3 else ():
        flat = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * width), flat)
    n, T = values.shape[:2]
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * T), flat)


def _axolotl_columns(rows: dict[str, np.ndarray], opts: ExportOptions) -> dict[str, Any]:
    x, ids, lp = rows["input_ids"].astype(np.int32), rows["topk_ids"].astype(np.int32), rows["topk_logprobs"]
    lp = lp.astype(np.float32)
    if opts.renormalize_topk:
        top = lp.max(axis=-1, keepdims=True)
        lp = lp - (top + np.log(np.exp(lp - top).sum(axis=-1, keepdims=True)))
    n, T, K = ids.shape
    mask = np.ones((n, T, K), dtype=np.int8)
    if opts.alignment == "current":
        ids = np.concatenate([np.broadcast_to(np.arange(K, dtype=np.int32), (n, 1, K)), ids[:, :-1]], axis=1)
        lp = np.concatenate([np.full((n, 1, K), -np.inf, np.float32), lp[:, :-1]], axis=1)
        mask[:, 0] = 0
    else:
        mask[:, -1] = 0
    return {"input_ids": _lists(x), "attention_mask": _lists(np.ones((n, T), np.int8)),
            "labels": _lists(x.astype(np.int64)), "target_token_ids": _lists(ids), "target_logprobs": _lists(lp),
            "target_mask": _lists(mask)}


def _parquet_columns(rows: dict[str, np.ndarray], layout: fmt.CacheLayout) -> dict[str, Any]:
    columns = {"input_ids": _lists(rows["input_ids"].astype(np.int32)), "topk_ids": _lists(rows["topk_ids"].astype(
        np.int32)), "topk_logprobs": _lists(rows["topk_logprobs"].astype(np.float32)),
        "teacher_lse": _lists(rows["lse"].astype(np.float32))}
    for tau in layout.temperatures:
        key = fmt.temperature_key(tau)
        columns[f"teacher_{key}"] = _lists(rows[key].astype(np.float32))
    return columns


def _check(opts: ExportOptions, manifest: dict[str, Any], layout: fmt.CacheLayout) -> Path:
    if opts.to not in EXPORT_TARGETS:
        raise InteropError(f"--to must be one of {EXPORT_TARGETS}, got {opts.to!r}")
    if opts.alignment not in ("next", "current"):
        raise InteropError(f"--alignment must be 'next' or 'current', got {opts.alignment!r}")
    if not layout.has_topk or layout.has_samples:
        raise InteropError(f"{opts.cache} is a {layout.targets} cache; export writes top-k targets only (peers have "
                           "no sampled-target layout)")
    out = Path(opts.out)
    if out.is_dir():
        raise InteropError(f"--out {out} is a directory; give a .parquet file path")
    if out.exists() and not opts.overwrite:
        raise InteropError(f"--out {out} exists; pass --overwrite to replace it")
    return out


def export_cache(opts: ExportOptions, log: Log = print) -> dict[str, Any]:
    """Write ``opts.cache`` to ``opts.out``; return a summary dict (rows, bytes, wall time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    wall0 = time.perf_counter()
    path = Path(opts.cache).resolve()
    manifest = fmt.load_manifest(path)
    layout = fmt.layout_from_manifest(manifest)
    out = _check(opts, manifest, layout)
    reader = CacheRows(path, manifest, layout)
    names = [spec.name for spec in layout.arrays() if spec.name not in ("seq_nll", "seq_entropy")]
    tmp = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for index in tqdm(range(layout.num_shards), unit="shard", desc=f"kdcache export: {opts.to}",
                          disable=not opts.progress, dynamic_ncols=True):
            start, stop = layout.shard_range(index)
            rows = {name: reader.read(name, start, stop) for name in names}
            columns = _axolotl_columns(rows, opts) if opts.to == "axolotl" else _parquet_columns(rows, layout)
            table = pa.table(columns)
            if writer is None:
                meta = {"vocab_size": layout.vocab_size, "temperatures": list(layout.temperatures),
                        "alignment": opts.alignment if opts.to == "axolotl" else fmt.ALIGNMENT_CONVENTION,
                        "source_cache": str(path), "tail": fmt.teacher_tail(manifest)}
                schema = table.schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
                writer = pq.ParquetWriter(tmp, schema, compression=opts.compression)
            writer.write_table(table.cast(writer.schema))
        writer.close()
        writer = None
        tmp.replace(out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    summary = {"out": str(out), "rows": layout.num_sequences, "tokens": layout.num_sequences * layout.seq_len,
               "bytes": out.stat().st_size, "wall_s": time.perf_counter() - wall0}
    log(f"kdcache export: wrote {out} ({opts.to}: {summary['rows']} rows x {layout.seq_len} tokens, top-{layout.topk}, "
        f"{summary['bytes']:,} bytes, {summary['bytes'] / summary['tokens']:.1f} B/token) in {summary['wall_s']:.2f} s")
    return summary
