"""One ``kdcache import`` run: open the source, scan it, plan the cache, write it through the crash-safe writer.

Flow::

    open the source (axolotl.py | distillkit.py | vllm.py | topk_parquet.py)
    → scan every row once: lengths, K, the largest id, the shift hit rates (alignment.py), the tail kind
    → plan: T (--seq-len, default the shortest row; shorter rows are dropped and counted), V (--vocab-size,
      the source's own, else the largest id + 1), K, chunking; the settings a rerun is compared on (the
      source files' sha256 and every option that changes the bytes)
    → the build lock of --out → CacheWriter (creates / resumes) → stream the rows again, one shard at a time:
      fill_row + sequence_stats (positions.py), write_shard (journaled) → finalize (manifest last)

A killed import resumes where it stopped (the shards already journaled are skipped) and gives the same bytes
as an uninterrupted one. ``lse`` is the source's when it has one, else 0: the stored log-probs are already
normalized over the full vocabulary (or over their k ids, ``provenance.tail = "none"``).

Shape notation::

    n  sequences of one shard    T  sequence length    K  entries per position
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cache_server import format as fmt
from cache_server.build.writer import CacheWriter, check_existing, read_dir_state
from cache_server.format.build_lock import acquire_build_lock
from cache_server.interop.alignment import ShiftHits, check_shift
from cache_server.interop.positions import FillCounts, fill_row, sequence_stats
from cache_server.interop.source import Source
from cache_server.interop.tables import InteropError, files_fingerprint

__all__ = ["IMPORT_SOURCES", "ImportOptions", "ImportResult", "open_source", "run_import"]

IMPORT_SOURCES = ("axolotl", "distillkit", "vllm-prompt-logprobs", "parquet")
RENORMALIZED_ATOL = 1e-3  # a source whose every position sums to 1 within this was renormalized over its k ids
Log = Callable[[str], None]


@dataclass
class ImportOptions:
    """Arguments of one import (see ``kdcache import --help``)."""

    src: str
    kind: str
    out: str
    vocab_size: int | None = None
    seq_len: int | None = None
    topk: int | None = None
    logprob_dtype: str = "float16"
    codec: str = fmt.DEFAULT_CODEC
    shard_seqs: int | None = None
    chunk_seqs: int | None = None
    alignment: str = "next"  # axolotl only
    tail: str | None = None  # override the detected tail kind: "implied" | "none"
    compression_config: str | None = None  # distillkit only
    check_alignment: bool = True
    overwrite: bool = False
    progress: bool = True


@dataclass
class ImportResult:
    """What one import did."""

    status: str  # "complete" | "already_complete"
    out_dir: str
    manifest: dict[str, Any]
    shards_written: int
    wall_s: float


@dataclass
class _Scan:
    rows: int = 0
    lengths: list[int] = field(default_factory=list)
    width: int | None = None
    max_id: int = -1
    positions: int = 0
    unnormalized: int = 0  # positions whose probabilities do not sum to 1 (a tail the source implies)
    hits: ShiftHits = field(default_factory=ShiftHits)


def open_source(opts: ImportOptions) -> Source:
    """The reader of ``opts.src`` for ``opts.kind`` (ValueError for an unknown kind)."""
    if opts.kind == "axolotl":
        from cache_server.interop.axolotl import open_axolotl

        return open_axolotl(opts.src, opts.alignment)
    if opts.kind == "distillkit":
        from cache_server.interop.distillkit import open_distillkit

        return open_distillkit(opts.src, opts.compression_config)
    if opts.kind == "vllm-prompt-logprobs":
        from cache_server.interop.vllm import open_vllm

        return open_vllm(opts.src, opts.topk)
    if opts.kind == "parquet":
        from cache_server.interop.topk_parquet import open_topk_parquet

        return open_topk_parquet(opts.src)
    raise ValueError(f"--from must be one of {IMPORT_SOURCES}, got {opts.kind!r}")


def _rows(source: Source):
    """The source's rows; a malformed row (ValueError from a reader) becomes an InteropError naming the source."""
    try:
        yield from source.rows()
    except ValueError as exc:
        raise InteropError(f"{source.path}: {exc}") from exc


def _scan(source: Source, progress: bool) -> _Scan:
    from tqdm.auto import tqdm

    scan = _Scan()
    for row in tqdm(_rows(source), unit="row", desc=f"kdcache import: reading {source.kind}", disable=not progress,
                    dynamic_ncols=True):
        width = row.ids.shape[1]
        if scan.width is not None and width != scan.width:
            raise InteropError(f"{source.path}: row {scan.rows} has {width} entries per position, the first row "
                               f"{scan.width}; an import needs one top-k for the whole source (pass --topk)")
        scan.width = width
        scan.lengths.append(row.input_ids.shape[0])
        valid_ids = row.ids[row.valid]
        scan.max_id = max(scan.max_id, int(row.input_ids.max(initial=-1)), int(valid_ids.max(initial=-1)))
        with np.errstate(over="ignore", invalid="ignore"):
            sums = np.exp(np.where(np.isfinite(row.logprobs), row.logprobs, -np.inf)).sum(axis=1)[row.valid]
        scan.positions += int(sums.size)
        scan.unnormalized += int((np.abs(sums - 1.0) > RENORMALIZED_ATOL).sum())
        scan.hits.add(row.input_ids, row.ids, row.valid)
        scan.rows += 1
    if not scan.rows:
        raise InteropError(f"{source.path} holds no rows")
    return scan


def _plan(opts: ImportOptions, source: Source, scan: _Scan) -> tuple[fmt.CacheLayout, str]:
    """The cache's layout and its tail kind (InteropError for options the source cannot meet)."""
    T = opts.seq_len or min(scan.lengths)
    if T < 2:
        raise InteropError(f"--seq-len must be at least 2 (a position needs a next token), got {T}")
    N = sum(1 for L in scan.lengths if L >= T)
    if not N:
        raise InteropError(f"no row of {source.path} has {T} tokens (the longest has {max(scan.lengths)}); "
                           "pass a smaller --seq-len")
    K = opts.topk or scan.width
    if K > scan.width:
        raise InteropError(f"--topk {K} is more than the source holds per position ({scan.width})")
    V = opts.vocab_size or source.vocab_size or scan.max_id + 1
    if scan.max_id >= V:
        raise InteropError(f"the source holds token id {scan.max_id}, outside --vocab-size {V}; pass the teacher's "
                           "real vocabulary size")
    if source.has_lse:
        tail = "exact"
    elif opts.tail is not None:
        tail = opts.tail
    else:
        tail = "none" if scan.positions and not scan.unnormalized else "implied"
    shard, chunk = fmt.plan_chunking(T, K, V, num_sequences=N)
    if opts.shard_seqs is not None or opts.chunk_seqs is not None:  # as kdcache merge: a chunk that divides the shard
        shard = opts.shard_seqs or shard
        chunk = opts.chunk_seqs or max(d for d in range(1, min(chunk, shard) + 1) if shard % d == 0)
    try:
        layout = fmt.CacheLayout(num_sequences=N, seq_len=T, topk=K, vocab_size=V, temperatures=source.temperatures,
                                 logprob_dtype=opts.logprob_dtype, shard_seqs=shard, chunk_seqs=chunk,
                                 codec=opts.codec)
    except ValueError as exc:
        raise InteropError(str(exc)) from exc
    return layout, tail


def _shard_arrays(layout: fmt.CacheLayout, rows: list, counts: FillCounts, first_index: int) -> dict[str, np.ndarray]:
    T, K = layout.seq_len, layout.topk
    dtype = np.dtype(layout.logprob_dtype)
    n = len(rows)
    input_ids = np.stack([r.input_ids[:T] for r in rows]).astype(layout.ids_dtype)
    ids = np.empty((n, T, K), dtype=layout.ids_dtype)
    logprobs = np.empty((n, T, K), dtype=dtype)
    for i, row in enumerate(rows):
        try:
            ids[i], logprobs[i] = fill_row(row, T, K, dtype, counts, f"row {first_index + i}")
        except ValueError as exc:
            raise InteropError(str(exc)) from exc
    nll, entropy = sequence_stats(input_ids.astype(np.int64), ids.astype(np.int64), logprobs)
    arrays = {"input_ids": input_ids, "topk_ids": ids, "topk_logprobs": logprobs,
              "lse": np.stack([r.lse[:T] if r.lse is not None else np.zeros(T, np.float32)
                               for r in rows]).astype(np.float32),
              "seq_nll": nll, "seq_entropy": entropy}
    for tau in layout.temperatures:
        key = fmt.temperature_key(tau)
        arrays[key] = np.stack([r.lse_t[key][:T] for r in rows]).astype(np.float32)
    return arrays


def _settings(opts: ImportOptions, source: Source, layout: fmt.CacheLayout, tail: str) -> dict[str, Any]:
    return {"import": {"from": source.kind, "files": files_fingerprint(source.files), "alignment": opts.alignment
                       if source.kind == "axolotl" else None, "tail": tail},
            "seq_len": layout.seq_len, "topk": layout.topk, "vocab_size": layout.vocab_size,
            "logprob_dtype": layout.logprob_dtype, "codec": layout.codec, "shard_seqs": layout.shard_seqs,
            "chunk_seqs": layout.chunk_seqs}


def _manifest_fields(source: Source, scan: _Scan, layout: fmt.CacheLayout, tail: str,
                     rates: dict[str, float]) -> dict[str, Any]:
    T = layout.seq_len
    return {
        "teacher": {"name": f"imported from {source.kind}", "kind": "import", "architecture": "unknown (imported)",
                    "dtype": "as the source stored it", "vocab_size": layout.vocab_size},
        "dataset": {"source": str(source.path.resolve()), "format": source.kind, "rows": scan.rows,
                    "rows_used": layout.num_sequences, "rows_too_short": sum(1 for L in scan.lengths if L < T),
                    "tokens_dropped_past_seq_len": sum(L - T for L in scan.lengths if L > T)},
        "provenance": {"imported_from": source.kind, "tail": tail, **source.provenance, "alignment_check": rates,
                       "seq_stats": "from the stored top-k (no full logits): seq_nll takes min(p_K, tail) for a "
                                    "next token outside the top-k (a lower bound of the NLL), seq_entropy counts "
                                    "the tail as one bucket (a lower bound)"},
    }


def _kept_rows(source: Source, T: int):
    for row in _rows(source):
        if row.input_ids.shape[0] >= T:
            yield row


# long: one linear flow (scan, plan, lock, write, finish) reads best in one place
def run_import(opts: ImportOptions, log: Log = print) -> ImportResult:
    """Import ``opts.src`` into ``opts.out`` (or resume an interrupted import with the same arguments).

    Raises:
        InteropError: a source or options that cannot make a cache (before anything is written).
        fmt.CacheError: the output directory's state, a full disk.
    """
    from tqdm.auto import tqdm

    wall0 = time.perf_counter()
    source = open_source(opts)
    out = Path(opts.out).resolve()
    if any(out == f.resolve() or out in f.resolve().parents for f in source.files):
        raise InteropError(f"--out {out} holds the source's files; import into a new directory")
    scan = _scan(source, opts.progress)
    try:
        rates = check_shift(scan.hits, str(source.path), source.shift_fix) if opts.check_alignment else {}
    except ValueError as exc:
        raise InteropError(f"{exc} (--no-alignment-check skips this check)") from exc
    layout, tail = _plan(opts, source, scan)
    settings = _settings(opts, source, layout, tail)
    check_existing(read_dir_state(out), layout, settings, overwrite=opts.overwrite)
    counts = FillCounts()
    fields = _manifest_fields(source, scan, layout, tail, rates)
    out.mkdir(parents=True, exist_ok=True)
    with acquire_build_lock(out, 0, 1):
        writer = CacheWriter(out, layout, settings, fields, overwrite=opts.overwrite)
        if writer.already_complete:
            log(f"{out}: already imported from this source with these settings; nothing to do")
            return ImportResult("already_complete", str(out), fmt.load_manifest(out, during_build=True), 0,
                                time.perf_counter() - wall0)
        pending = set(writer.pending_shards())
        if len(pending) < layout.num_shards:
            log(f"resuming: {layout.num_shards - len(pending)} of {layout.num_shards} shards already written")
        buffer: list = []
        shard = 0
        with tqdm(total=layout.num_sequences, unit="seq", desc="kdcache import: writing", disable=not opts.progress,
                  dynamic_ncols=True) as bar:
            for row in _kept_rows(source, layout.seq_len):
                start, stop = layout.shard_range(shard)
                buffer.append(row if shard in pending else None)
                if len(buffer) == stop - start:
                    if shard in pending:
                        writer.write_shard(shard, _shard_arrays(layout, buffer, counts, start))
                    bar.update(len(buffer))
                    buffer, shard = [], shard + 1
                    if shard == layout.num_shards:
                        break
        writer.manifest_fields["provenance"].update(counts.as_dict() if len(pending) == layout.num_shards else
                                                    {"filled_positions": "not counted (a resumed import)"})
        manifest = writer.finalize()
    result = ImportResult("complete", str(out), manifest, len(pending), time.perf_counter() - wall0)
    _print_summary(result, source, layout, tail, log)
    return result


def _print_summary(result: ImportResult, source: Source, layout: fmt.CacheLayout, tail: str, log: Log) -> None:
    stats, prov, data = result.manifest["stats"], result.manifest["provenance"], result.manifest["dataset"]
    lines = [f"kdcache import: wrote {result.out_dir}",
             f"  source           {source.path} ({source.kind}, {len(source.files)} file(s), {data['rows']} rows)",
             f"  sequences        {layout.num_sequences} x {layout.seq_len} tokens ({data['rows_too_short']} rows "
             f"shorter than --seq-len dropped; {data['tokens_dropped_past_seq_len']} tokens past it cut)",
             f"  top-k            {layout.topk} of vocab {layout.vocab_size} ({layout.logprob_dtype} log-probs)",
             f"  tail             {tail} (mean stored tail mass {stats['mean_tail_mass']:.4f}): {prov['lacks']}",
             f"  filled           {prov.get('filled_positions')} positions without teacher data (one-hot on "
             "the next token)",
             f"  bytes on disk    {stats['stored_bytes']:,} ({stats['bytes_per_token']:.1f} B/token)",
             f"  wall time        {result.wall_s:.2f} s"]
    if tail == "none":
        lines.append("  note             no tail: the losses refuse tail='bucket' on this cache; use "
                     "tail='renormalize' or tail='none'")
    log("\n".join(lines))
