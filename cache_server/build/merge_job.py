"""One ``kdcache merge`` run: validate the inputs, lock the output, write the merged shards, then the manifest.

Flow::

    open_inputs + check_compatible (merge.py; nothing is created on failure)
    → the merged layout (K = --topk or the largest input K; no extra temperatures) and the settings a rerun
      is compared on (each input's manifest sha256 and weight, K, dtype, codec)
    → the build lock of --out → CacheWriter (creates / resumes) → per pending shard: read the inputs' rows,
      merge_positions + merged_sequence_stats, write_shard (journaled) → finalize (manifest last)

Shape notation::

    M  input caches    n  sequences of one output shard    T  sequence length    K  merged top-k
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cache_server import format as fmt
from cache_server.build import space
from cache_server.build.job import hold_build_lock
from cache_server.build.merge import (
    MergeInput,
    check_compatible,
    merge_positions,
    merged_sequence_stats,
    open_inputs,
)
from cache_server.build.mixture import normalize_weights
from cache_server.build.options import BuildInputError
from cache_server.build.writer import CacheWriter, check_existing, journal_entries, read_dir_state

__all__ = ["MergeOptions", "MergeResult", "merge_shard", "run_merge"]

Log = Callable[[str], None]


@dataclass
class MergeOptions:
    """Arguments of one merge (see ``kdcache merge --help``)."""

    caches: Sequence[str]
    out: str
    weights: tuple[float, ...] | None = None
    topk: int | None = None  # default: the largest K of the inputs
    logprob_dtype: str | None = None  # default: float32 if any input stores float32, else float16
    codec: str | None = None  # default: the first input's
    shard_seqs: int | None = None  # default: planned like a build's (fmt.plan_chunking)
    chunk_seqs: int | None = None
    overwrite: bool = False
    progress: bool = True
    space_check: bool = True


@dataclass
class MergeResult:
    """What one merge did."""

    status: str  # "complete" | "already_complete"
    out_dir: str
    manifest: dict[str, Any]
    shards_written: int  # by this run
    wall_s: float

    @property
    def tokens(self) -> int:
        return int(self.manifest["stats"]["tokens"])


def _plan(opts: MergeOptions, inputs: Sequence[MergeInput]) -> tuple[fmt.CacheLayout, tuple[float, ...]]:
    """The merged layout and the normalised weights (BuildInputError on bad options)."""
    weights = normalize_weights(opts.weights, len(inputs), option="--weights", per="CACHE")
    first = inputs[0].layout
    largest = max(i.layout.topk for i in inputs)
    topk = largest if opts.topk is None else opts.topk
    if not 1 <= topk <= largest:
        raise BuildInputError(f"--topk {topk} must be between 1 and {largest}, the largest top-k of the inputs "
                              "(positions where the teachers agree have no more distinct ids than that)")
    dtypes = {i.layout.logprob_dtype for i in inputs}
    logprob_dtype = opts.logprob_dtype or ("float32" if "float32" in dtypes else "float16")
    codec = opts.codec or first.codec
    if codec not in fmt.CODEC_PRESETS:
        raise BuildInputError(f"unknown --codec {codec!r}; choose one of {sorted(fmt.CODEC_PRESETS)}")
    if logprob_dtype not in ("float16", "float32"):
        raise BuildInputError(f"--logprob-dtype must be float16 or float32, got {logprob_dtype!r}")
    shard, chunk = fmt.plan_chunking(first.seq_len, topk, first.vocab_size, num_sequences=first.num_sequences)
    if opts.shard_seqs is not None or opts.chunk_seqs is not None:
        shard = opts.shard_seqs or shard
        chunk = opts.chunk_seqs or max(d for d in range(1, min(chunk, shard) + 1) if shard % d == 0)
    try:
        layout = fmt.CacheLayout(num_sequences=first.num_sequences, seq_len=first.seq_len, topk=topk,
                                 vocab_size=first.vocab_size, logprob_dtype=logprob_dtype, shard_seqs=shard,
                                 chunk_seqs=chunk, codec=codec)
    except ValueError as exc:
        raise BuildInputError(str(exc)) from exc
    return layout, weights


def _settings(inputs: Sequence[MergeInput], weights: Sequence[float], layout: fmt.CacheLayout) -> dict[str, Any]:
    """What determines the merged bytes: the inputs (by their manifests' bytes) and weights, K, dtype, codec."""
    return {"merge": {"inputs": [{"manifest_sha256": i.manifest_sha256, "weight": w} for i, w in zip(inputs, weights)],
                      "method": "known-part-v1"},
            "topk": layout.topk, "logprob_dtype": layout.logprob_dtype, "codec": layout.codec,
            "shard_seqs": layout.shard_seqs, "chunk_seqs": layout.chunk_seqs,
            "data_fingerprint": inputs[0].manifest.get("dataset_fingerprint")}


def _manifest_fields(inputs: Sequence[MergeInput], weights: Sequence[float], layout: fmt.CacheLayout) -> dict:
    names = ", ".join(i.path.name for i in inputs)
    fields: dict[str, Any] = {
        "teacher": {"name": f"merge of {len(inputs)} caches ({names})", "kind": "merge", "architecture": "merge",
                    "vocab_size": layout.vocab_size, "weights": list(weights)},
        "teachers": [i.teacher_entry(w) for i, w in zip(inputs, weights)],
    }
    for key in ("dataset", "tokenizer"):
        if key in inputs[0].manifest:
            fields[key] = inputs[0].manifest[key]
    return fields


def merge_shard(inputs: Sequence[MergeInput], weights: Sequence[float], layout: fmt.CacheLayout,
                shard_index: int) -> dict[str, np.ndarray]:
    """Every array of merged shard ``shard_index``, in the layout's dtypes."""
    start, stop = layout.shard_range(shard_index)
    n, T = stop - start, layout.seq_len
    ids = [i.rows.read("topk_ids", start, stop) for i in inputs]  # [n, T, K_m] each
    logprobs = [i.rows.read("topk_logprobs", start, stop) for i in inputs]
    stats = [{name: i.rows.read(name, start, stop) for name in ("seq_nll", "seq_entropy")} for i in inputs]
    input_ids = inputs[0].rows.read("input_ids", start, stop)
    merged = merge_positions([a.reshape(n * T, -1) for a in ids], [a.reshape(n * T, -1) for a in logprobs],
                             weights, layout.topk)
    lp_dtype = np.dtype(layout.logprob_dtype)
    # log p_hat >= the largest single log(w_m p_m) >= a stored value + log w_m: finite, clipped into the dtype.
    values = np.maximum(merged.logprobs, np.finfo(lp_dtype).min).reshape(n, T, layout.topk)
    arrays = {
        "input_ids": input_ids.astype(layout.ids_dtype),
        "topk_ids": merged.ids.reshape(n, T, layout.topk).astype(layout.ids_dtype),
        "topk_logprobs": values.astype(lp_dtype),
        "lse": np.zeros((n, T), dtype=np.float32),  # log of the total probability, 1
    }
    arrays.update(merged_sequence_stats(ids, logprobs, weights, stats, input_ids, merged.jsd))
    return arrays


def run_merge(opts: MergeOptions, log: Log = print) -> MergeResult:
    """Merge ``opts.caches`` into ``opts.out`` (or resume an interrupted merge with the same arguments).

    Raises:
        BuildInputError: bad options or inputs that cannot be merged (before anything is written).
        fmt.CacheError: an input that cannot be read, the output directory's state, a full disk.
    """
    from tqdm.auto import tqdm

    wall0 = time.perf_counter()
    out = Path(opts.out).resolve()
    inputs = open_inputs(opts.caches)
    if any(i.path == out for i in inputs):
        raise BuildInputError(f"--out {out} is one of the input caches; write the merge to a new directory")
    layout, weights = _plan(opts, inputs)
    settings = _settings(inputs, weights, layout)
    existing = check_existing(read_dir_state(out), layout, settings, overwrite=opts.overwrite)
    if any(i.layout.temperatures for i in inputs):
        log("note: the merged cache stores no extra temperatures: logsumexp(log p_mix / tau) needs the whole "
            "mixture, which the top-k caches do not hold (build with --teacher A --teacher B --temperatures for it)")
    with tqdm(total=layout.num_sequences, unit="seq", desc="kdcache merge: checking tokens", disable=not opts.progress,
              dynamic_ncols=True) as bar:
        check_compatible(inputs, progress=bar.update)
    if opts.space_check and existing != "complete":
        space.check_free_space(out, layout, journal_entries(out) if existing == "resume" else [])
    with hold_build_lock(out, 0, 1):
        writer = CacheWriter(out, layout, settings, _manifest_fields(inputs, weights, layout), overwrite=opts.overwrite)
        if writer.already_complete:
            log(f"{out}: merged cache already complete with these inputs and settings; nothing to do")
            return MergeResult("already_complete", str(out), fmt.load_manifest(out, during_build=True), 0,
                               time.perf_counter() - wall0)
        pending = writer.pending_shards()
        if len(pending) < layout.num_shards:
            log(f"resuming: {layout.num_shards - len(pending)} of {layout.num_shards} shards already written")
        pending_tokens = sum(b - a for a, b in map(layout.shard_range, pending)) * layout.seq_len
        with tqdm(total=pending_tokens, unit="tok", unit_scale=True, desc="kdcache merge", disable=not opts.progress,
                  dynamic_ncols=True) as bar:
            for index in pending:
                writer.write_shard(index, merge_shard(inputs, weights, layout, index))
                a, b = layout.shard_range(index)
                bar.update((b - a) * layout.seq_len)
        manifest = writer.finalize()
    result = MergeResult("complete", str(out), manifest, len(pending), time.perf_counter() - wall0)
    _print_summary(result, inputs, weights, layout, log)
    return result


def _print_summary(result: MergeResult, inputs: Sequence[MergeInput], weights: Sequence[float],
                   layout: fmt.CacheLayout, log: Log) -> None:
    stats = result.manifest["stats"]
    lines = [f"kdcache merge: wrote {result.out_dir}"]
    lines += [f"  input            {i.path} (top-{i.layout.topk}, weight {w:.4g})" for i, w in zip(inputs, weights)]
    lines += [
        f"  sequences        {layout.num_sequences} x {layout.seq_len} tokens (shards: {layout.num_shards}, "
        f"{result.shards_written} written by this run)",
        f"  merged top-k     {layout.topk} of vocab {layout.vocab_size} ({layout.logprob_dtype} log-probs; tail "
        f"mass {stats['mean_tail_mass']:.4f}, an upper bound: see docs/MERGE.md)",
        f"  bytes on disk    {space.human_bytes(stats['stored_bytes'])}",
        f"  wall time        {result.wall_s:.2f} s ({result.tokens / max(result.wall_s, 1e-9):,.0f} tokens/s)",
    ]
    log("\n".join(lines))
