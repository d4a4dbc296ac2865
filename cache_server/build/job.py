"""The ``kdcache build`` pipeline: teacher forward → top-k / logsumexp on the device → background shard writer.

Shape notation::

    N  sequences in the cache          B  sequences per forward batch (--batch-size)
    T  sequence length (--seq-len)     V  teacher vocabulary size
    K  top-k kept per position         S  sequences per shard

Flow (one process = one ``rank`` of ``world_size``)::

    validate args, output dir, teacher files, data (cheap; nothing is created on failure)
    → load teacher → CacheWriter (creates / resumes DIR) → for each pending shard, for each batch of B rows:
        main thread:   logits = teacher(ids)                      # [B, T, V] on the device
                       targets = compute_targets(logits, ids)     # top-k, lse, lse_t, nll, entropy in fp32,
                                                                   # in cache-sized row chunks (see there)
                       start device→host copies, enqueue           # bounded queue: at most a few batches ahead
        writer thread: wait for the copy, cast, fill the shard buffers, and when a shard is full
                       CacheWriter.write_shard (compress, fsync, journal)
    → CacheWriter.finalize (manifest.json; None while other ranks' shards are missing) → summary

Batches never cross shard boundaries, so a resumed build runs exactly the same batches as an uninterrupted
one (same batch size ⇒ bitwise-identical shard files).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cache_server import format as fmt
from cache_server.build.sources import TokenData, TokenizerInfo, load_tokenizer, open_token_data
from cache_server.build.teacher import COMPUTE_DTYPES, TeacherInfo, forward_logits, inspect_teacher, load_teacher
from cache_server.build.writer import STATE_DIR, CacheWriter

__all__ = [
    "BuildOptions",
    "BuildResult",
    "BuildInputError",
    "NonFiniteLogitsError",
    "compute_targets",
    "workspace_numel",
    "prepare_build",
    "run_build",
]


class BuildInputError(ValueError):
    """Bad arguments for a build; the message says what is wrong and how to fix it."""


class NonFiniteLogitsError(BuildInputError):
    """The teacher produced NaN/inf logits; shards finished before it stay on disk and resumable."""


@dataclass
class BuildOptions:
    """Arguments of one build (see ``kdcache build --help``)."""

    teacher: str
    data: str
    out: str
    topk: int
    seq_len: int
    model_factory: str | None = None
    tokenizer: str | None = None
    data_dtype: str | None = None
    temperatures: tuple[float, ...] = ()
    dtype: str = "float32"
    device: str = "cpu"
    logprob_dtype: str = "float16"
    codec: str = fmt.DEFAULT_CODEC
    batch_size: int = 8
    shard_seqs: int | None = None
    chunk_seqs: int | None = None
    overwrite: bool = False
    rank: int = 0
    world_size: int = 1
    max_sequences: int | None = None
    progress: bool = True
    queue_batches: int = 4


@dataclass
class BuildResult:
    status: str  # "complete" | "already_complete" | "waiting_for_ranks"
    out_dir: str
    sequences: int
    tokens: int
    shards_written: int
    wall_s: float
    manifest: dict[str, Any] | None = None
    bytes_on_disk: int = 0
    shard_bytes: int = 0
    setup_s: float = 0.0  # validation, hashing, teacher load, writer setup (before the first forward)
    forward_s: float = 0.0  # main thread: forward + targets + starting the host copies
    writer_thread_cpu_s: float = 0.0  # CPU time of the writer thread itself (zarr's own pool not included)
    writer_write_s: float = 0.0  # writer thread wall time inside CacheWriter.write_shard (compress, write, fsync)
    drain_s: float = 0.0  # main thread waiting for the writer after the last batch (the last shard's write)
    finalize_s: float = 0.0  # manifest (after the writer is done)
    process_cpu_s: float = 0.0
    remainder_tokens_dropped: int = 0
    missing_shards: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return self.shard_bytes / self.tokens if self.tokens else float("nan")


# ------------------------------------------------------------------------------------------------- math

# Rows of V per chunk: compute_targets walks the [B*T, V] logits in row chunks so its fp32 scratch (the
# upcast chunk, z - max, exp) stays in the CPU's last-level cache between passes instead of streaming
# 100+ MB buffers through DRAM once per pass. ~4 MiB per fp32 buffer and core measured best on a 2-core
# EPYC (L2 1 MiB/core, L3 32 MiB). On accelerators a pass is a kernel launch, so chunks are only as small
# as needed to bound the scratch memory (256 MiB per buffer).
_CPU_CHUNK_ELEMS = 1 << 20
_DEVICE_CHUNK_ELEMS = 1 << 26

# On CPU the chunks are spread over torch.get_num_threads() worker threads, each running single-threaded
# torch ops on its own chunks, instead of every op of every chunk being split over an OpenMP team. A
# chunk is ~20 small ops; with OpenMP each one ends in a barrier, and when anything else wants a core
# (the shard writer, another process) the barrier waits for a descheduled thread. Measured on
# [4, 256, 50257] with 2 cores (medians): 43 vs 42 ms quiet (the ops release the GIL), but 209 vs 70 ms
# next to one busy single-threaded process. The calling thread works as one of the workers.
_workers: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)
_workers_lock = threading.Lock()


def _worker_pool(n: int) -> ThreadPoolExecutor:
    """n threads whose torch ops run single-threaded (torch.set_num_threads is per thread)."""
    global _workers
    with _workers_lock:
        if _workers is None or _workers[0] != n:
            if _workers is not None:
                _workers[1].shutdown(wait=False)
            caller_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="kdcache-targets", initializer=torch.set_num_threads,
                                      initargs=(1,))
            started = threading.Barrier(n)
            for future in [pool.submit(started.wait) for _ in range(n)]:
                future.result()  # all n threads exist and have run their initializer
            # set_num_threads(1) also lowered the count torch gives threads started later (a process-wide
            # default); put back the caller's.
            torch.set_num_threads(caller_threads)
            _workers = (n, pool)
        return _workers[1]


def _forget_worker_pool() -> None:
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_pool)


def _chunk_plan(logits: torch.Tensor, chunk_rows: int | None) -> tuple[int, int]:
    """(rows per chunk, worker threads) for ``logits`` [B, T, V]."""
    V = logits.shape[-1]
    N = max(1, logits.numel() // V)
    on_cpu = logits.device.type == "cpu"
    rows = min(chunk_rows or max(1, (_CPU_CHUNK_ELEMS if on_cpu else _DEVICE_CHUNK_ELEMS) // V), N)
    workers = min(torch.get_num_threads(), -(-N // rows)) if on_cpu else 1
    return rows, max(1, workers)


def workspace_numel(logits: torch.Tensor, chunk_rows: int | None = None) -> int:
    """fp32 elements of the scratch buffer ``compute_targets`` needs for ``logits`` [B, T, V]."""
    rows, workers = _chunk_plan(logits, chunk_rows)
    buffers = 2 if logits.dtype == torch.float32 else 3  # (upcast chunk,) z - max, exp
    return workers * buffers * rows * logits.shape[-1]


def _topk_group_size(vocab_size: int, k: int) -> int:
    """Group size S for ``_grouped_topk``, or 0 where a plain ``torch.topk`` is as fast (small V, k near V).

    G = V // S groups of >= 512 (and >= 16 k): fewer groups leave too many candidates (k * S), more make
    the top-k over the group maxima the expensive step (CPU topk costs ~1 ns per element of rows this
    short, and more below ~2k elements per row, where it switches from partial sort to nth_element), and
    groups shorter than ~64 make the group-max pass slow. S = 98 for V = 50,257 measured best.
    """
    groups = max(512, 1 << (16 * k - 1).bit_length())
    size = vocab_size // groups
    return size if size >= 8 else 0


def _grouped_topk(z: torch.Tensor, k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``torch.topk(z, k, -1)`` (values; ids up to the order of ties) at a fraction of its CPU cost.

    CPU ``torch.topk`` copies each row into a (value, index) queue before selecting, which costs more than
    every other pass of ``compute_targets`` together. Instead: split the row into G = V // S contiguous
    groups of S, take each group's max (one vectorized pass), keep the k groups with the largest maxima,
    and select among their k*S members plus the < S tail elements (61 -> 25 ms single-threaded for
    1040 rows of V = 50,257, k = 32).

    Why exact: let t be the k-th largest group max. The k kept groups hold k elements >= t, so the k-th
    largest element of the row is >= t, while every element of a dropped group is <= its max <= t. So
    the dropped elements can only tie with the k-th value, never beat it. NaN/inf propagate through max
    (topk ranks NaN first, as torch.topk does), so non-finite rows are still caught by the caller.

    Args:
        z: [R, V] rows (contiguous along V).
        k: K.
        group_size: S from ``_topk_group_size``.

    Returns:
        values [R, K] sorted descending, ids [R, K] int64.
    """
    R, V = z.shape
    S = group_size
    G = V // S
    body = z[:, : G * S].view(R, G, S)  # [R, G, S], body[r, g, j] = z[r, g*S + j]
    groups = body.amax(dim=-1).topk(k, dim=-1, sorted=False).indices  # [R, K]
    rows = torch.arange(R, device=z.device).unsqueeze(1)  # [R, 1]
    cand = body[rows, groups].view(R, k * S)  # [R, K*S], column i*S + j = z[r, groups[r, i]*S + j]
    if G * S < V:  # the < S tail elements belong to no group: always candidates
        cand = torch.cat([cand, z[:, G * S :]], dim=1)  # [R, K*S + tail]
    values, pos = cand.topk(k, dim=-1, largest=True, sorted=True)  # [R, K]
    # Candidate column -> vocabulary id: i*S + j -> groups[i]*S + j; tail column c -> c - K*S + G*S.
    i, j = pos.div(S, rounding_mode="floor"), pos.remainder(S)
    ids = groups.gather(1, i.clamp_(max=k - 1)) * S + j
    return values, torch.where(pos < S * k, ids, pos + (G * S - S * k))


def compute_targets(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    topk: int,
    temperatures: tuple[float, ...] = (),
    workspace: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Everything a cache stores for a batch, computed in fp32 where the logits live.

    Math (per position, over the full vocabulary z = logits[b, t], in fp32)::

        topk_logits, topk_ids = topk(z)                     (same order as the top-k of the log-probs)
        m = topk_logits[0] = max(z);   d = z - m <= 0;   w = exp(d);   s = sum(w)
        lse = m + log s;               topk_logprobs = topk_logits - lse
        entropy = -sum(p log p) = log s - sum(w * d) / s      (p = w / s; two non-negative terms, no
                                                               cancellation, unlike lse - sum(p * z))
        lse_t{tau} = logsumexp(z / tau) = m / tau + log sum(exp(d / tau))
        nll_t = lse - z[token[t + 1]]                          (position t predicts token t + 1)

    So the vocabulary is read once for top-k (grouped on CPU, see ``_grouped_topk``) and the exp is taken
    once per temperature; lse and entropy share one. The work runs in row chunks whose scratch lives in
    ``workspace`` (fresh 100+ MB allocations per batch cost more in page faults than the arithmetic on a
    CPU; chunks small enough to stay in cache make the later passes cheap); on CPU the chunks are shared
    by ``torch.get_num_threads()`` single-threaded workers (see ``_CPU_CHUNK_ELEMS``). Each chunk's result
    does not depend on which worker ran it. ``logits`` are not modified.

    Args:
        logits: [B, T, V] teacher logits (any float dtype; bf16/fp16 are upcast exactly, chunk by chunk).
        input_ids: [B, T] the tokens the teacher saw.
        topk: K.
        temperatures: extra temperatures tau != 1.
        workspace: optional reusable fp32 buffer on the logits' device with at least
            ``workspace_numel(logits, chunk_rows)`` elements (a larger one, e.g. [B, T, V], is fine).
        chunk_rows: positions per chunk (default: ~4 MiB of fp32 per chunk on CPU, 256 MiB elsewhere).

    Returns:
        dict with ``topk_ids`` [B, T, K] int64, ``topk_logprobs`` [B, T, K] fp32, ``lse`` [B, T],
        ``lse_t{tau}`` [B, T], ``seq_nll`` [B], ``seq_entropy`` [B] (fp32), and ``finite`` [B, T] bool (False
        where any logit of the position is NaN/inf). No returned tensor aliases the workspace or logits.
    """
    B, T, V = logits.shape
    N = B * T
    device = logits.device
    rows, workers = _chunk_plan(logits, chunk_rows)
    buffers = 2 if logits.dtype == torch.float32 else 3
    need = workspace_numel(logits, chunk_rows)
    if workspace is None or workspace.numel() < need or workspace.device != device or workspace.dtype != torch.float32:
        workspace = torch.empty(need, dtype=torch.float32, device=device)
    scratch = workspace.view(-1)[:need].view(workers, buffers, rows, V)
    group_size = _topk_group_size(V, topk) if device.type == "cpu" else 0  # CUDA's radix top-k is fast

    flat = logits.reshape(N, V)  # [N, V] (a view for the contiguous output of an LM head)
    topk_logprobs = torch.empty(N, topk, dtype=torch.float32, device=device)  # [N, K]
    topk_ids = torch.empty(N, topk, dtype=torch.int64, device=device)  # [N, K]
    lse = torch.empty(N, dtype=torch.float32, device=device)  # [N]
    entropy = torch.empty(N, dtype=torch.float32, device=device)  # [N]
    lse_t = {tau: torch.empty(N, dtype=torch.float32, device=device) for tau in temperatures}
    next_chunk = itertools.count()  # shared by the workers (next() is atomic under the GIL)

    def run_chunks(worker: int) -> None:
        with torch.inference_mode():  # thread-local: workers must enter it themselves
            while (r0 := next(next_chunk) * rows) < N:
                r1 = min(r0 + rows, N)
                n = r1 - r0
                z = flat[r0:r1]  # [n, V]
                if z.dtype != torch.float32:
                    z = scratch[worker, 2, :n].copy_(z)  # exact upcast
                d, w = scratch[worker, 0, :n], scratch[worker, 1, :n]  # [n, V] each
                if group_size:
                    values, ids = _grouped_topk(z, topk, group_size)  # [n, K]
                else:
                    values, ids = torch.topk(z, topk, dim=-1, largest=True, sorted=True)  # [n, K]
                row_max = values[:, :1]  # [n, 1]; NaN if the row has a NaN (topk ranks NaN first)
                torch.sub(z, row_max, out=d)
                sum_w = torch.exp(d, out=w).sum(dim=-1)  # [n]
                log_sum_w = sum_w.log()
                chunk_lse = row_max.squeeze(1) + log_sum_w  # [n]
                # A -inf logit gives w * d = 0 * (-inf) = NaN, +inf gives d = inf - inf = NaN: bad positions
                # show up as non-finite lse/entropy without a separate pass over the logits.
                entropy[r0:r1] = log_sum_w - w.mul_(d).sum(dim=-1) / sum_w
                lse[r0:r1] = chunk_lse
                torch.sub(values, chunk_lse.unsqueeze(1), out=topk_logprobs[r0:r1])
                topk_ids[r0:r1] = ids
                for tau in temperatures:
                    sum_w_tau = torch.div(d, tau, out=w).exp_().sum(dim=-1)  # [n]
                    lse_t[tau][r0:r1] = row_max.squeeze(1) / tau + sum_w_tau.log()

    if workers == 1:
        run_chunks(0)
    else:
        # The calling thread is worker 0, single-threaded like the pool's, and gets its thread count back.
        futures = [_worker_pool(workers - 1).submit(run_chunks, i) for i in range(1, workers)]
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_chunks(0)
        finally:
            torch.set_num_threads(caller_threads)
            for future in futures:
                future.result()

    lse_bt = lse.view(B, T)
    # Position t predicts token t+1: NLL over positions 0..T-2.
    next_logits = logits[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()  # [B, T-1]
    out = {
        "topk_ids": topk_ids.view(B, T, topk),
        "topk_logprobs": topk_logprobs.view(B, T, topk),
        "lse": lse_bt,
        "seq_nll": (lse_bt[:, :-1] - next_logits).mean(dim=1),
    }
    for tau in temperatures:
        out[fmt.temperature_key(tau)] = lse_t[tau].view(B, T)
    entropy_bt = entropy.view(B, T)
    out["seq_entropy"] = entropy_bt.mean(dim=1)  # [B]
    out["finite"] = torch.isfinite(lse_bt) & torch.isfinite(entropy_bt)
    return out


# ------------------------------------------------------------------------------------------------- setup


@dataclass
class PreparedBuild:
    """Everything validated and derived before the teacher is loaded."""

    options: BuildOptions
    out_dir: Path
    teacher: TeacherInfo
    tokenizer: TokenizerInfo | None
    data: TokenData
    layout: fmt.CacheLayout | None  # None until the vocabulary is known (factory teachers)
    temperatures: tuple[float, ...]

    def settings(self) -> dict[str, Any]:
        """What determines the cache's bytes (NOT batch size, device, progress options)."""
        layout = self.layout
        return {
            "teacher": self.teacher.identity(),
            "data_fingerprint": self.data.fingerprint,
            "num_sequences": layout.num_sequences,
            "seq_len": layout.seq_len,
            "topk": layout.topk,
            "vocab_size": layout.vocab_size,
            "temperatures": list(layout.temperatures),
            "compute_dtype": self.options.dtype,
            "logprob_dtype": layout.logprob_dtype,
            "codec": layout.codec,
            "shard_seqs": layout.shard_seqs,
            "chunk_seqs": layout.chunk_seqs,
        }

    def manifest_fields(self) -> dict[str, Any]:
        fields = {
            "teacher": self.teacher.manifest_entry(self.options.dtype),
            "dataset": self.data.manifest_entry(),
        }
        if self.tokenizer is not None:
            fields["tokenizer"] = self.tokenizer.manifest_entry()
        return fields


def _plan_layout(opts: BuildOptions, vocab_size: int, num_sequences: int, temperatures) -> fmt.CacheLayout:
    if opts.topk > vocab_size:
        raise BuildInputError(
            f"--topk {opts.topk} is larger than the teacher vocabulary ({vocab_size}); use --topk {vocab_size} or less"
        )
    shard, chunk = fmt.plan_chunking(opts.seq_len, opts.topk, vocab_size, num_sequences=num_sequences)
    if opts.shard_seqs is not None and opts.chunk_seqs is not None:
        shard, chunk = opts.shard_seqs, opts.chunk_seqs
    elif opts.shard_seqs is not None:
        shard = opts.shard_seqs
        chunk = max(d for d in range(1, min(chunk, shard) + 1) if shard % d == 0)
    elif opts.chunk_seqs is not None:
        chunk = opts.chunk_seqs
        shard = max(chunk, shard // chunk * chunk)
    try:
        return fmt.CacheLayout(
            num_sequences=num_sequences,
            seq_len=opts.seq_len,
            topk=opts.topk,
            vocab_size=vocab_size,
            temperatures=temperatures,
            logprob_dtype=opts.logprob_dtype,
            shard_seqs=shard,
            chunk_seqs=chunk,
            codec=opts.codec,
        )
    except ValueError as exc:
        raise BuildInputError(str(exc)) from exc


def _check_options(opts: BuildOptions) -> tuple[float, ...]:
    if opts.topk <= 0:
        raise BuildInputError(f"--topk must be a positive integer, got {opts.topk}")
    if opts.seq_len < 2:
        raise BuildInputError(f"--seq-len must be at least 2 (position t predicts token t+1), got {opts.seq_len}")
    if opts.batch_size <= 0:
        raise BuildInputError(f"--batch-size must be positive, got {opts.batch_size}")
    if opts.dtype not in COMPUTE_DTYPES:
        raise BuildInputError(f"--dtype must be one of {sorted(COMPUTE_DTYPES)}, got {opts.dtype!r}")
    if opts.logprob_dtype not in ("float16", "float32"):
        raise BuildInputError(f"--logprob-dtype must be float16 or float32, got {opts.logprob_dtype!r}")
    if opts.codec not in fmt.CODEC_PRESETS:
        raise BuildInputError(f"unknown --codec {opts.codec!r}; choose one of {sorted(fmt.CODEC_PRESETS)}")
    if not 0 <= opts.rank < opts.world_size:
        raise BuildInputError(f"--rank {opts.rank} must be in [0, --world-size {opts.world_size})")
    for name in ("shard_seqs", "chunk_seqs"):
        value = getattr(opts, name)
        if value is not None and value <= 0:
            raise BuildInputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    temps = set()
    for tau in opts.temperatures:
        if not (math.isfinite(tau) and tau > 0):
            raise BuildInputError(f"--temperatures must be positive finite numbers, got {tau!r}")
        if float(tau) != 1.0:  # temperature 1 is always stored, as `lse`
            temps.add(float(tau))
    return tuple(sorted(temps))


def _check_output_dir(out: Path) -> None:
    """Refuse a file or a foreign non-empty directory before doing anything expensive."""
    if out.exists() and not out.is_dir():
        raise BuildInputError(f"output path {out} is a file; pass a directory path to --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / fmt.MANIFEST_NAME).exists() and not (out / STATE_DIR / "settings.json").exists():
            raise BuildInputError(
                f"{out} exists, is not empty and is not a kdcache cache; refusing to write into it "
                "(nothing was changed). Choose an empty or new --out directory"
            )


def _existing_build_args(out: Path) -> tuple[str, dict[str, Any] | None]:
    manifest = out / fmt.MANIFEST_NAME
    if manifest.exists():
        return "complete", json.loads(manifest.read_text()).get("build_args")
    settings = out / STATE_DIR / "settings.json"
    if settings.exists():
        return "unfinished", json.loads(settings.read_text()).get("settings")
    return "none", None


def prepare_build(opts: BuildOptions) -> PreparedBuild:
    """Validate everything cheap (args, output dir, teacher files, data, ids vs vocab) without side effects."""
    temperatures = _check_options(opts)
    out = Path(opts.out)
    _check_output_dir(out)
    teacher = inspect_teacher(opts.teacher, opts.model_factory)

    tokenizer = None
    tok_path = opts.tokenizer
    if tok_path is None and Path(teacher.path).is_dir() and (Path(teacher.path) / "tokenizer.json").is_file():
        tok_path = teacher.path  # the teacher's own tokenizer: recorded in the manifest, used for text data
    if tok_path is not None:
        tokenizer = load_tokenizer(tok_path)

    data = open_token_data(
        opts.data, opts.seq_len, data_dtype=opts.data_dtype, tokenizer=tokenizer, max_sequences=opts.max_sequences
    )
    if data.format not in ("txt", "jsonl") and opts.tokenizer is None and tok_path is None:
        tokenizer = None
    layout = None
    if teacher.vocab_size is not None:
        data.check_ids(teacher.vocab_size)
        layout = _plan_layout(opts, teacher.vocab_size, data.num_sequences, temperatures)
    return PreparedBuild(opts, out, teacher, tokenizer, data, layout, temperatures)


# ------------------------------------------------------------------------------------------------- writer


class _ShardAssembler(threading.Thread):
    """Background thread: collects batches into whole shards and writes them through CacheWriter.

    Threads: compression is left at the libraries' defaults on purpose. zarr sets
    ``numcodecs.blosc.use_threads = False`` at import, so Blosc's own thread pool (``set_nthreads``) is never
    used; each inner chunk is compressed single-threaded in zarr's asyncio worker pool. On a 2-core CPU box
    (forward on both cores) we measured the alternatives with benchmarks/bench_build.py-style interleaved
    runs: capping zarr's pool at one worker, or renicing the writer and zarr threads to nice 10, both left
    the build at 1.03-1.06x the forward+targets time of a small teacher with 8-sequence shards, the same as
    the defaults within noise. That cost is mostly per-shard fixed work (zarr metadata, fsyncs, checksums),
    not compression, so it shrinks with real shard sizes; on a GPU box the writer has idle cores anyway.
    """

    def __init__(self, writer: CacheWriter, layout: fmt.CacheLayout, maxsize: int) -> None:
        super().__init__(name="kdcache-shard-writer", daemon=True)
        self.writer, self.layout = writer, layout
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.shards_written = 0
        self.shard_bytes = 0
        self.cpu_s = 0.0
        self.write_s = 0.0
        self.on_shard: Callable[[int], None] | None = None
        self._specs = {spec.name: spec for spec in layout.arrays()}
        self._buffers: dict[str, np.ndarray] = {}
        self._shard = -1
        self._rows_filled = 0

    def put(self, item) -> None:
        """Enqueue (blocks while the queue is full); re-raises the writer's error in the caller."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Finish every queued shard, stop the thread, re-raise its error."""
        if self.is_alive():
            self.put(None)
            self.join()
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        start_cpu = time.thread_time()
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                self._add_batch(*item)
        except BaseException as exc:  # surfaced to the main thread by put()/close()
            self.error = exc
        finally:
            self.cpu_s = time.thread_time() - start_cpu

    def _add_batch(self, shard_index: int, row0: int, tensors: dict[str, torch.Tensor], ready) -> None:
        if ready is not None:
            ready.synchronize()  # the device→host copies of this batch have landed
        start, stop = self.layout.shard_range(shard_index)
        if shard_index != self._shard:
            self._shard, self._rows_filled = shard_index, 0
            self._buffers = {n: np.empty(s.shape(stop - start), dtype=s.dtype) for n, s in self._specs.items()}
        finite = tensors["finite"].numpy()  # [b, T]
        if not finite.all():
            row, pos = (int(v) for v in np.argwhere(~finite)[0])
            raise NonFiniteLogitsError(
                f"the teacher produced NaN/inf logits at sequence {start + row0 + row}, position {pos} "
                f"(shard {shard_index}); the build stopped and nothing from this shard on was written "
                "(earlier shards are kept). Check the teacher weights / --dtype (float16 overflows easily; "
                "try --dtype bfloat16 or float32)"
            )
        rows = finite.shape[0]
        for name, spec in self._specs.items():
            # Casts here are exact for ids (< vocab ≤ dtype max) and round-to-nearest for fp16 logprobs.
            self._buffers[name][row0 : row0 + rows] = tensors[name].numpy().astype(spec.dtype, copy=False)
        self._rows_filled += rows
        if self._rows_filled == stop - start:
            t0 = time.perf_counter()
            entry = self.writer.write_shard(shard_index, self._buffers)
            self.write_s += time.perf_counter() - t0
            self.shards_written += 1
            self.shard_bytes += sum(f["nbytes"] for f in entry["files"].values())
            self._buffers = {}
            if self.on_shard is not None:
                self.on_shard(shard_index)


def _to_host(targets: dict[str, torch.Tensor], layout: fmt.CacheLayout, device: torch.device):
    """Shrink on the device (ids→int32, logprobs→fp16 if stored so), then start async copies to the host."""
    targets = dict(targets)
    targets["topk_ids"] = targets["topk_ids"].to(torch.int32)
    targets["input_ids"] = targets["input_ids"].to(torch.int32)
    if layout.logprob_dtype == "float16":
        targets["topk_logprobs"] = targets["topk_logprobs"].to(torch.float16)
    if device.type == "cpu":
        return targets, None
    if device.type != "cuda":
        return {k: v.to("cpu") for k, v in targets.items()}, None
    # Async copies into pinned memory; the writer thread waits on the event, the main thread goes on to
    # queue the next forward.
    host = {k: v.to("cpu", non_blocking=True) for k, v in targets.items()}
    event = torch.cuda.Event()
    event.record()
    return host, event


# ------------------------------------------------------------------------------------------------- run


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_build(opts: BuildOptions, log: Callable[[str], None] = print) -> BuildResult:
    """Run (or resume) a build. Raises BuildInputError / DataError / TeacherError / CacheError on bad input."""
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    prep = prepare_build(opts)
    data = prep.data
    for note in data.notes:
        log(f"note: {note}")

    if prep.layout is not None and not opts.overwrite and opts.rank == 0:
        state, previous = _existing_build_args(prep.out_dir)
        settings = json.loads(json.dumps(prep.settings(), sort_keys=True))
        if state == "complete" and previous == settings:
            return _already_complete(prep, t0, log)
        if state != "none" and previous != settings:
            _refuse_different(prep.out_dir, state, previous or {}, settings)

    device = torch.device(opts.device)
    model = load_teacher(prep.teacher, opts.dtype, opts.device)
    vocab = prep.teacher.vocab_size
    if prep.layout is None or prep.layout.vocab_size != vocab:
        data.check_ids(vocab)
        prep.layout = _plan_layout(opts, vocab, data.num_sequences, prep.temperatures)
    layout = prep.layout

    writer = CacheWriter(
        prep.out_dir,
        layout,
        prep.settings(),
        prep.manifest_fields(),
        overwrite=opts.overwrite,
        rank=opts.rank,
        world_size=opts.world_size,
    )
    if writer.already_complete:
        return _already_complete(prep, t0, log)

    pending = writer.pending_shards()
    done_before = layout.num_shards - len(pending)
    if done_before and pending:
        log(f"resuming: {len(writer.completed_shards())} of {layout.num_shards} shards already written")
    assembler = _ShardAssembler(writer, layout, maxsize=max(1, opts.queue_batches))
    pending_tokens = sum(stop - start for start, stop in map(layout.shard_range, pending)) * layout.seq_len
    from tqdm.auto import tqdm

    bar = tqdm(
        total=int(pending_tokens),
        unit="tok",
        unit_scale=True,
        desc=f"kdcache build{f' rank {opts.rank}/{opts.world_size}' if opts.world_size > 1 else ''}",
        disable=not opts.progress,
        dynamic_ncols=True,
    )
    assembler.on_shard = lambda i: bar.set_postfix_str(f"shards {assembler.shards_written}/{len(pending)}")
    setup_s = time.perf_counter() - t0
    assembler.start()
    forward_s = 0.0
    workspace: torch.Tensor | None = None  # reused fp32 scratch of compute_targets (a few row chunks of V)
    try:
        with torch.inference_mode():
            for shard_index in pending:
                start, stop = layout.shard_range(shard_index)
                for b0 in range(start, stop, opts.batch_size):
                    b1 = min(b0 + opts.batch_size, stop)
                    f0 = time.perf_counter()
                    ids = torch.from_numpy(np.array(data.sequences[b0:b1], dtype=np.int64)).to(device)  # [B, T]
                    logits = forward_logits(model, ids)  # [B, T, V]
                    if workspace is None or workspace.numel() < workspace_numel(logits):
                        workspace = torch.empty(workspace_numel(logits), dtype=torch.float32, device=device)
                    targets = compute_targets(logits, ids, layout.topk, layout.temperatures, workspace)
                    targets["input_ids"] = ids
                    del logits
                    host, ready = _to_host(targets, layout, device)
                    forward_s += time.perf_counter() - f0
                    assembler.put((shard_index, b0 - start, host, ready))
                    bar.update((b1 - b0) * layout.seq_len)
        drain0 = time.perf_counter()
        assembler.close()
        drain_s = time.perf_counter() - drain0
    except BaseException:
        # Stop without writing anything after the failure point; finished shards stay journaled.
        if assembler.is_alive():
            with assembler.queue.mutex:
                assembler.queue.queue.clear()
            try:
                assembler.queue.put_nowait(None)
            except queue.Full:
                pass
            assembler.join()
        bar.close()
        raise
    bar.close()

    finalize0 = time.perf_counter()
    manifest = writer.finalize()
    finalize_s = time.perf_counter() - finalize0
    wall_s = time.perf_counter() - t0
    result = BuildResult(
        status="complete" if manifest is not None else "waiting_for_ranks",
        out_dir=str(prep.out_dir),
        sequences=layout.num_sequences,
        tokens=layout.num_sequences * layout.seq_len,
        shards_written=assembler.shards_written,
        wall_s=wall_s,
        manifest=manifest,
        setup_s=setup_s,
        forward_s=forward_s,
        writer_thread_cpu_s=assembler.cpu_s,
        writer_write_s=assembler.write_s,
        drain_s=drain_s,
        finalize_s=finalize_s,
        process_cpu_s=time.process_time() - cpu0,
        remainder_tokens_dropped=data.remainder_tokens_dropped,
        notes=list(data.notes),
    )
    if manifest is None:
        result.missing_shards = sorted(set(range(layout.num_shards)) - writer.completed_shards())
        log(
            f"rank {opts.rank}/{opts.world_size}: wrote {assembler.shards_written} shards; "
            f"{len(result.missing_shards)} shards of other ranks are still missing, so the manifest will be "
            "written by the last rank to finish"
        )
        return result
    result.shard_bytes = int(manifest["stats"]["stored_bytes"])
    result.bytes_on_disk = _dir_bytes(prep.out_dir)
    _print_summary(result, prep, log)
    return result


def _refuse_different(out: Path, state: str, previous: dict[str, Any], settings: dict[str, Any]) -> None:
    keys = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
    diff = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in keys[:5])
    what = "a finished cache built" if state == "complete" else "an unfinished build"
    raise BuildInputError(
        f"{out} already holds {what} with different settings ({diff}); pass --overwrite to replace it, "
        "rerun with the original arguments" + (" to resume it" if state != "complete" else "") + ", or choose another --out"
    )


def _already_complete(prep: PreparedBuild, t0: float, log) -> BuildResult:
    manifest = fmt.load_manifest(prep.out_dir)
    tokens = int(manifest["stats"]["tokens"])
    result = BuildResult(
        status="already_complete",
        out_dir=str(prep.out_dir),
        sequences=int(manifest["num_sequences"]),
        tokens=tokens,
        shards_written=0,
        wall_s=time.perf_counter() - t0,
        manifest=manifest,
        shard_bytes=int(manifest["stats"]["stored_bytes"]),
        bytes_on_disk=_dir_bytes(prep.out_dir),
        remainder_tokens_dropped=prep.data.remainder_tokens_dropped,
    )
    log(f"{prep.out_dir}: cache already complete with these settings ({result.sequences} sequences, {tokens} tokens); nothing to do")
    return result


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def _print_summary(result: BuildResult, prep: PreparedBuild, log) -> None:
    layout = prep.layout
    tokens_per_s = result.tokens / result.wall_s if result.wall_s > 0 else float("nan")
    lines = [
        f"kdcache build: wrote {result.out_dir}",
        f"  sequences        {result.sequences} x {layout.seq_len} tokens (shards: {layout.num_shards}, "
        f"{result.shards_written} written by this run)",
        f"  tokens           {result.tokens}",
        f"  dropped          {result.remainder_tokens_dropped} remainder tokens of the stream (< seq-len)"
        + (
            f"; {prep.data.sequences_available - result.sequences} sequences skipped by --max-sequences"
            if prep.data.sequences_available > result.sequences
            else ""
        ),
        f"  bytes on disk    {result.bytes_on_disk} ({_human_bytes(result.bytes_on_disk)}; shards {result.shard_bytes})",
        f"  bytes/token      {result.bytes_per_token:.2f} (top-{layout.topk}, {layout.logprob_dtype} logprobs, {layout.codec})",
        f"  wall time        {result.wall_s:.2f} s ({tokens_per_s:,.0f} tokens/s; forward {result.forward_s:.2f} s)",
        f"  output           {os.path.abspath(result.out_dir)}",
    ]
    log("\n".join(lines))
