"""The ``kdcache build`` pipeline: teacher forward → top-k / logsumexp on the device → background shard writer.

Shape notation::

    N  sequences in the cache          B  sequences per forward batch (--batch-size)
    T  sequence length (--seq-len)     V  teacher vocabulary size
    K  top-k kept per position         S  sequences per shard

Flow (one process = one ``rank`` of ``world_size``)::

    validate args, output dir, teacher files, data (cheap; nothing is created on failure)
    → load teacher → CacheWriter (creates / resumes DIR) → for each pending shard, for each batch of B rows:
        main thread:   logits = teacher(ids)                      # [B, T, V] on the device
                       targets = compute_targets(logits, ids)     # top-k, lse, lse_t, nll, entropy in fp32
                       start device→host copies, enqueue           # bounded queue: at most a few batches ahead
        writer thread: wait for the copy, cast, fill the shard buffers, and when a shard is full
                       CacheWriter.write_shard (compress, fsync, journal)
    → CacheWriter.finalize (manifest.json; None while other ranks' shards are missing) → summary

Batches never cross shard boundaries, so a resumed build runs exactly the same batches as an uninterrupted
one (same batch size ⇒ bitwise-identical shard files).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cache_server import format as fmt
from cache_server.data_sources import TokenData, TokenizerInfo, load_tokenizer, open_token_data
from cache_server.teacher import COMPUTE_DTYPES, TeacherInfo, forward_logits, inspect_teacher, load_teacher
from cache_server.writer import STATE_DIR, CacheWriter

__all__ = [
    "BuildOptions",
    "BuildResult",
    "BuildInputError",
    "NonFiniteLogitsError",
    "compute_targets",
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
    process_cpu_s: float = 0.0
    remainder_tokens_dropped: int = 0
    missing_shards: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return self.shard_bytes / self.tokens if self.tokens else float("nan")


# ------------------------------------------------------------------------------------------------- math


def compute_targets(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    topk: int,
    temperatures: tuple[float, ...] = (),
    workspace: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Everything a cache stores for a batch, computed in fp32 where the logits live.

    Math (per position, over the full vocabulary)::

        logprobs = logits - lse,  lse = logsumexp(logits)          (one fused log_softmax)
        topk_logprobs, topk_ids = topk(logprobs)                    (same order as top-k of the logits)
        lse = logits[argmax] - logprobs[argmax]                     (= max + log sum exp(logits - max))
        lse_t{tau} = logsumexp(logits / tau) = logsumexp(logprobs / tau) + lse / tau
        entropy = -sum(exp(logprobs) * logprobs);  nll_t = -logprobs[t, token[t + 1]]

    Every [B, T, V] intermediate lives in ``workspace`` or in the (fp32) ``logits`` buffer itself: fresh
    100+ MB allocations per batch cost more in page faults than the arithmetic on a CPU.

    Args:
        logits: [B, T, V] teacher logits (any float dtype; upcast to fp32). An fp32 tensor is OVERWRITTEN
            (used as scratch space).
        input_ids: [B, T] the tokens the teacher saw.
        topk: K.
        temperatures: extra temperatures tau != 1.
        workspace: optional reusable fp32 buffer with at least B*T*V elements on the logits' device.

    Returns:
        dict with ``topk_ids`` [B, T, K] int64, ``topk_logprobs`` [B, T, K] fp32, ``lse`` [B, T],
        ``lse_t{tau}`` [B, T], ``seq_nll`` [B], ``seq_entropy`` [B] (fp32), and ``finite`` [B, T] bool (False
        where any logit of the position is NaN/inf). No returned tensor aliases the workspace or logits.
    """
    logits = logits.float()  # [B, T, V]
    B, T, V = logits.shape
    if workspace is None or workspace.numel() < logits.numel() or workspace.device != logits.device:
        workspace = torch.empty_like(logits)
    logprobs = workspace.view(-1)[: logits.numel()].view(B, T, V)  # [B, T, V]
    try:
        torch._log_softmax(logits, -1, False, out=logprobs)  # fused, into the reused buffer
    except (AttributeError, RuntimeError, TypeError):  # private op: fall back if a torch version lacks it
        logprobs.copy_(torch.log_softmax(logits, dim=-1))
    topk_logprobs, topk_ids = torch.topk(logprobs, topk, dim=-1, largest=True, sorted=True)  # [B, T, K]
    max_logprob = topk_logprobs[..., 0]  # [B, T]
    lse = logits.gather(-1, topk_ids[..., :1]).squeeze(-1) - max_logprob  # [B, T]
    # Position t predicts token t+1: NLL over positions 0..T-2.
    next_logprobs = logprobs[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    out = {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs, "lse": lse, "seq_nll": -next_logprobs.mean(dim=1)}
    scratch = logits  # the raw logits are no longer needed
    for tau in temperatures:
        shift = max_logprob / tau  # [B, T], the row max of logprobs / tau
        torch.div(logprobs, tau, out=scratch).sub_(shift.unsqueeze(-1)).exp_()
        out[fmt.temperature_key(tau)] = shift + scratch.sum(dim=-1).log() + lse / tau
    torch.exp(logprobs, out=scratch).mul_(logprobs)  # p * log p
    entropy = -scratch.sum(dim=-1)  # [B, T]
    out["seq_entropy"] = entropy.mean(dim=1)  # [B]
    # NaN or +inf anywhere in a row makes its lse/entropy non-finite; a -inf logit gives p·log p = 0·(-inf)
    # = NaN. So no separate full pass over the logits is needed to find bad positions.
    out["finite"] = torch.isfinite(lse) & torch.isfinite(entropy)
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
    """Background thread: collects batches into whole shards and writes them through CacheWriter."""

    def __init__(self, writer: CacheWriter, layout: fmt.CacheLayout, maxsize: int) -> None:
        super().__init__(name="kdcache-shard-writer", daemon=True)
        self.writer, self.layout = writer, layout
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.shards_written = 0
        self.shard_bytes = 0
        self.cpu_s = 0.0
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
            entry = self.writer.write_shard(shard_index, self._buffers)
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
    workspace: torch.Tensor | None = None  # reused [B, T, V] fp32 scratch (see compute_targets)
    try:
        with torch.inference_mode():
            for shard_index in pending:
                start, stop = layout.shard_range(shard_index)
                for b0 in range(start, stop, opts.batch_size):
                    b1 = min(b0 + opts.batch_size, stop)
                    f0 = time.perf_counter()
                    ids = torch.from_numpy(np.array(data.sequences[b0:b1], dtype=np.int64)).to(device)  # [B, T]
                    logits = forward_logits(model, ids)  # [B, T, V]
                    if workspace is None or workspace.numel() < logits.numel():
                        workspace = torch.empty(logits.shape, dtype=torch.float32, device=device)
                    targets = compute_targets(logits, ids, layout.topk, layout.temperatures, workspace)
                    targets["input_ids"] = ids
                    del logits
                    host, ready = _to_host(targets, layout, device)
                    forward_s += time.perf_counter() - f0
                    assembler.put((shard_index, b0 - start, host, ready))
                    bar.update((b1 - b0) * layout.seq_len)
        assembler.close()
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

    manifest = writer.finalize()
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
