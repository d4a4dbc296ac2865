"""One ``kdcache build`` run: validate, lock the directory, then build, resume, or repair the cache.

Flow (one process = one ``rank`` of ``world_size``)::

    prepare_build: options, device, output directory state, teacher files and position limit, data, ids vs
                   vocabulary, layout, free space (cheap; nothing is created on failure)
    → take the build lock of DIR for this rank (a second build of the same DIR and rank refuses at once)
    → a finished cache with the same settings: verify this rank's shards against the manifest; nothing to
      do if they are intact, else rebuild exactly the damaged ones (a repair)
    → load the teacher → CacheWriter (creates / resumes DIR) → run_pipeline (pipeline.py) over the pending
      shards → CacheWriter.finalize (manifest.json; None while other ranks' shards are missing) → summary
    → release the lock (the kernel releases it too if the process dies)
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cache_server import format as fmt
from cache_server.build import space
from cache_server.build.mixture import MixtureInfo, check_positions, inspect_teachers, load_teachers
from cache_server.build.options import BuildOptions, check_options, plan_layout
from cache_server.build.pipeline import PipelineStats, run_pipeline
from cache_server.build.repair import find_damaged_shards, repair_metadata
from cache_server.build.sources import TokenData, TokenizerInfo, load_tokenizer, open_token_data
from cache_server.build.teacher import TeacherInfo
from cache_server.build.writer import STATE_DIR, BuildStateError, CacheWriter, check_existing, journal_entries, read_dir_state
from cache_server.format import storage
from cache_server.format.build_lock import BuildLockedError, acquire_build_lock

__all__ = ["BuildOptions", "BuildResult", "PreparedBuild", "prepare_build", "run_build", "hold_build_lock"]

Log = Callable[[str], None]


@dataclass
class BuildResult:
    status: str  # "complete" | "already_complete" | "repaired" (shards or metadata) | "waiting_for_ranks"
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
    repaired_shards: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return self.shard_bytes / self.tokens if self.tokens else float("nan")


@dataclass
class _Clock:
    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)

    def wall_s(self) -> float:
        return time.perf_counter() - self.wall0


# ------------------------------------------------------------------------------------------------- setup


@dataclass
class PreparedBuild:
    """Everything validated and derived before the teacher is loaded."""

    options: BuildOptions
    out_dir: Path
    teacher: TeacherInfo | MixtureInfo  # several --teacher: their mixture (build/mixture.py)
    tokenizer: TokenizerInfo | None
    data: TokenData
    temperatures: tuple[float, ...]
    layout: fmt.CacheLayout | None = None  # None until the vocabulary is known (factory teachers)
    existing: str = "new"  # what the output directory allows: see writer.check_existing

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
        if isinstance(self.teacher, MixtureInfo):  # only then: a single teacher's manifest keeps its fields
            fields["teachers"] = self.teacher.teachers_entry(self.options.dtype)
        return fields

    def plan(self, vocab_size: int) -> None:
        """With the vocabulary known: check the ids, plan the layout, decide what the directory allows."""
        opts = self.options
        # A mixture's ids must be real tokens of its narrowest teacher (the others may be padded wider).
        self.data.check_ids(self.teacher.narrowest_vocab_size if isinstance(self.teacher, MixtureInfo) else vocab_size)
        self.layout = plan_layout(opts, vocab_size, self.data.num_sequences, self.temperatures)
        self.existing = check_existing(read_dir_state(self.out_dir), self.layout, self.settings(),
                                       overwrite=opts.overwrite)
        if opts.space_check and self.existing != "complete":
            written = journal_entries(self.out_dir) if self.existing == "resume" else []
            reclaimable = _dir_bytes(self.out_dir) if self.existing == "restart" else 0
            space.check_free_space(self.out_dir, self.layout, written, reclaimable)


def _tokenizer_for(opts: BuildOptions, teacher: TeacherInfo | MixtureInfo) -> TokenizerInfo | None:
    """--tokenizer, else the teacher's own tokenizer.json (recorded in the manifest, used for text data)."""
    path = opts.tokenizer
    if path is None and Path(teacher.path).is_dir() and (Path(teacher.path) / "tokenizer.json").is_file():
        path = teacher.path
    return load_tokenizer(path) if path is not None else None


def prepare_build(opts: BuildOptions) -> PreparedBuild:
    """Validate everything cheap (args, output dir, teacher files, data, ids vs vocab) without side effects."""
    temperatures = check_options(opts)
    out = opts.out if storage.is_url(opts.out) else Path(opts.out)  # an object-store URL stays a string
    existing = check_existing(read_dir_state(out))  # a file or a foreign directory is refused here
    teacher = inspect_teachers(opts.teacher, opts.model_factory, opts.teacher_weights)
    check_positions(opts.seq_len, teacher)
    tokenizer = _tokenizer_for(opts, teacher)
    if isinstance(teacher, MixtureInfo) and tokenizer is not None:
        teacher.tokenizer_vocab = tokenizer.tokenizer.get_vocab_size()  # decides whether widths are padding
    data = open_token_data(opts.data, opts.seq_len, data_dtype=opts.data_dtype, tokenizer=tokenizer,
                           max_sequences=opts.max_sequences, text_documents=opts.text_documents,
                           record_offsets=opts.record_offsets)
    prep = PreparedBuild(opts, out, teacher, tokenizer, data, temperatures, existing=existing)
    if teacher.vocab_size is not None:
        prep.plan(teacher.vocab_size)
    return prep


# ------------------------------------------------------------------------------------------------- run


def run_build(opts: BuildOptions, log: Log = print) -> BuildResult:
    """Run, resume or repair a build.

    Raises:
        BuildInputError, DataError, TeacherError: bad input (before anything is written).
        BuildLockedError: another build of this directory is running (ranks of one build share it).
        fmt.CacheError: the output directory's state (BuildStateError), a full disk (OutOfSpaceError).
    """
    clock = _Clock()
    prep = prepare_build(opts)
    for note in prep.data.notes:
        log(f"note: {note}")
    with _build_lock(prep.out_dir, opts.rank, opts.world_size):
        return _run_locked(prep, clock, log)


def _run_locked(prep: PreparedBuild, clock: _Clock, log: Log) -> BuildResult:
    opts = prep.options
    damaged, rewritten = None, []
    if prep.layout is not None and prep.existing == "complete":
        damaged, rewritten = _check_finished(prep, log)  # before the teacher loads: an intact cache needs none
        if not damaged:
            return _already_complete(prep, clock, log, rewritten)
    if opts.engine == "ray" and damaged is None:  # build/engine_ray.py: Ray actors load the teacher, write shards
        from cache_server.build.engine_ray import run_ray_build

        writer, stats, setup_s = run_ray_build(prep, log)
        if stats is not None:
            return _finish(prep, writer, stats, clock, setup_s, log)
        damaged, rewritten = _check_finished(prep, log)  # a factory teacher's finished cache, known only now
        if not damaged:
            return _already_complete(prep, clock, log, rewritten)
    model = load_teachers(prep.teacher, opts.dtype, opts.device)  # a repair always runs here (local engine)
    if prep.layout is None:  # a factory teacher: its vocabulary and position limit are known only now
        check_positions(opts.seq_len, prep.teacher)
        prep.plan(prep.teacher.vocab_size)
    writer = CacheWriter(prep.out_dir, prep.layout, prep.settings(), prep.manifest_fields(), overwrite=opts.overwrite,
                         rank=opts.rank, world_size=opts.world_size)
    if writer.already_complete:
        if damaged is None:
            damaged, rewritten = _check_finished(prep, log)
        if not damaged:
            return _already_complete(prep, clock, log, rewritten)
        writer.begin_repair(sorted(damaged))
    elif writer.pending_shards() and writer.completed_shards():
        log(f"resuming: {len(writer.completed_shards())} of {prep.layout.num_shards} shards already written")
    setup_s = clock.wall_s()
    rank_label = f" rank {opts.rank}/{opts.world_size}" if opts.world_size > 1 else ""
    stats = run_pipeline(model, prep.data.sequences, writer, device=opts.device, batch_size=opts.batch_size,
                         queue_batches=opts.queue_batches, progress=opts.progress, desc=f"kdcache build{rank_label}",
                         extra_arrays=prep.data.offsets)
    return _finish(prep, writer, stats, clock, setup_s, log)


@contextlib.contextmanager
def _build_lock(out: Path, rank: int, world_size: int) -> Iterator[None]:
    """Hold this rank's build lock of ``out``; afterwards (or when refused) leave no lock file or directory
    created for nothing."""
    if storage.is_url(out):  # a lock object (format/build_lock.py): object stores have no flock
        with acquire_build_lock(out, rank, world_size):
            yield
        return
    out_existed = out.exists()
    try:
        lock = acquire_build_lock(out, rank, world_size)
    except BuildLockedError:
        _remove_empty_dirs(out, out_existed)
        raise
    except OSError as exc:
        _remove_empty_dirs(out, out_existed)
        if space.is_out_of_space(exc):
            raise space.OutOfSpaceError(f"no space left on the filesystem of {str(out)!r} even for the build lock "
                                        "file; free some space there or choose another --out") from exc
        raise BuildStateError(f"cannot create the build lock in {str(out)!r} ({exc.strerror or exc}); check that "
                              "--out is a writable directory path") from exc
    lock_inode = os.stat(lock.path).st_ino
    try:
        yield
    finally:
        # Our lock file only: a finishing rank may have cleared the state directory and another build of
        # this rank may have created a new lock file since.
        with contextlib.suppress(OSError):
            if os.stat(lock.path).st_ino == lock_inode:
                os.unlink(lock.path)
        lock.release()
        _remove_empty_dirs(out, out_existed)


hold_build_lock = _build_lock  # `kdcache merge` writes through the same lock


def _remove_empty_dirs(out: Path, out_existed: bool) -> None:
    """Remove the build-state directory if empty, and ``out`` if this build created it and left it empty."""
    for directory, keep in ((out / STATE_DIR, False), (out, out_existed)):
        if not keep:
            with contextlib.suppress(OSError):
                directory.rmdir()


def _check_finished(prep: PreparedBuild, log: Log) -> tuple[dict[int, list[str]], list[str]]:
    """A finished cache: rewrite its damaged Zarr metadata files (rank 0), then find the damaged shards.

    Returns:
        (the damaged shards of this rank with what is wrong, the metadata files rewritten).
    """
    rewritten = repair_metadata(prep.out_dir, prep.layout, log) if prep.options.rank == 0 else []
    return _damaged_shards(prep, log), rewritten


def _damaged_shards(prep: PreparedBuild, log: Log) -> dict[int, list[str]]:
    """Verify this rank's shards of a finished cache; log what is damaged."""
    opts = prep.options
    manifest = fmt.load_manifest(prep.out_dir, during_build=True)
    mine = [i for i in range(prep.layout.num_shards) if i % opts.world_size == opts.rank]
    damaged = find_damaged_shards(prep.out_dir, manifest, mine, progress=opts.progress)
    if damaged:
        details = "; ".join(f"shard {i}: {', '.join(problems)}" for i, problems in sorted(damaged.items())[:5])
        more = f"; and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        log(f"{prep.out_dir}: {len(damaged)} of {len(mine)} shards are damaged or missing ({details}{more}); "
            "rebuilding them")
    return damaged


def _finish(prep: PreparedBuild, writer: CacheWriter, stats: PipelineStats, clock: _Clock, setup_s: float,
            log: Log) -> BuildResult:
    """Finalize (manifest), then the result and the summary."""
    layout, opts = prep.layout, prep.options
    finalize0 = time.perf_counter()
    manifest = writer.finalize()
    result = BuildResult(
        status="waiting_for_ranks" if manifest is None else "repaired" if writer.repairing else "complete",
        out_dir=str(prep.out_dir),
        sequences=layout.num_sequences,
        tokens=layout.num_sequences * layout.seq_len,
        shards_written=stats.shards_written,
        wall_s=clock.wall_s(),
        manifest=manifest,
        setup_s=setup_s,
        forward_s=stats.forward_s,
        writer_thread_cpu_s=stats.writer_thread_cpu_s,
        writer_write_s=stats.writer_write_s,
        drain_s=stats.drain_s,
        finalize_s=time.perf_counter() - finalize0,
        process_cpu_s=time.process_time() - clock.cpu0,
        remainder_tokens_dropped=prep.data.remainder_tokens_dropped,
        notes=list(prep.data.notes),
        repaired_shards=writer.repaired_shards,
    )
    if manifest is None:
        result.missing_shards = sorted(set(range(layout.num_shards)) - writer.completed_shards())
        log(f"rank {opts.rank}/{opts.world_size}: wrote {stats.shards_written} shards; {len(result.missing_shards)} "
            "shards of other ranks are still missing, so the manifest will be written by the last rank to finish")
        return result
    result.shard_bytes = int(manifest["stats"]["stored_bytes"])
    result.bytes_on_disk = _dir_bytes(prep.out_dir)
    _print_summary(result, prep, writer, log)
    return result


def _shown(out: str) -> str:
    """The output location for messages: an absolute path, or an object-store URL without secrets."""
    return storage.redact_url(out) if storage.is_url(out) else os.path.abspath(out)


def _dir_bytes(path: Path) -> int:
    if storage.is_url(path):
        return sum(storage.open_store(str(path)).sizes().values())
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _already_complete(prep: PreparedBuild, clock: _Clock, log: Log, rewritten_metadata: list[str]) -> BuildResult:
    manifest = fmt.load_manifest(prep.out_dir, during_build=True)
    tokens = int(manifest["stats"]["tokens"])
    result = BuildResult(
        status="repaired" if rewritten_metadata else "already_complete",
        out_dir=str(prep.out_dir),
        sequences=int(manifest["num_sequences"]),
        tokens=tokens,
        shards_written=0,
        wall_s=clock.wall_s(),
        manifest=manifest,
        shard_bytes=int(manifest["stats"]["stored_bytes"]),
        bytes_on_disk=_dir_bytes(prep.out_dir),
        remainder_tokens_dropped=prep.data.remainder_tokens_dropped,
    )
    checked = "every shard" if prep.options.world_size == 1 else f"rank {prep.options.rank}'s shards"
    if rewritten_metadata:
        log(f"kdcache build: repaired {prep.out_dir}: rewrote the Zarr metadata {', '.join(rewritten_metadata)}; "
            f"{checked} verified against the manifest, which is unchanged")
        return result
    log(f"{prep.out_dir}: cache already complete with these settings ({result.sequences} sequences, {tokens} "
        f"tokens; {checked} verified against the manifest); nothing to do")
    return result


def _print_summary(result: BuildResult, prep: PreparedBuild, writer: CacheWriter, log: Log) -> None:
    layout = prep.layout
    tokens_per_s = result.tokens / result.wall_s if result.wall_s > 0 else float("nan")
    if writer.repairing:
        rewritten = (f"; their new bytes differ from the old manifest (shards {writer.changed_shards}), so the "
                     "manifest was rewritten" if writer.changed_shards else "; the manifest is unchanged")
        log(f"kdcache build: repaired {result.out_dir}: rebuilt shards {result.repaired_shards}{rewritten}\n"
            f"  output           {_shown(result.out_dir)}")
        return
    skipped = prep.data.sequences_available - result.sequences
    lines = [
        f"kdcache build: wrote {result.out_dir}",
        f"  sequences        {result.sequences} x {layout.seq_len} tokens (shards: {layout.num_shards}, "
        f"{result.shards_written} written by this run)",
        f"  tokens           {result.tokens}",
        f"  dropped          {result.remainder_tokens_dropped} remainder tokens of the stream (< seq-len)"
        + (f"; {skipped} sequences skipped by --max-sequences" if skipped > 0 else ""),
        f"  bytes on disk    {result.bytes_on_disk} ({space.human_bytes(result.bytes_on_disk)}; shards {result.shard_bytes})",
        f"  bytes/token      {result.bytes_per_token:.2f} ({_targets_label(layout)}, {layout.logprob_dtype} logprobs, "
        f"{layout.codec})",
        f"  wall time        {result.wall_s:.2f} s ({tokens_per_s:,.0f} tokens/s; forward {result.forward_s:.2f} s)",
        f"  output           {_shown(result.out_dir)}",
    ]
    if prep.data.documents is not None:
        lines.insert(3, f"  documents        {prep.data.documents} (EOS between documents)")
    log("\n".join(lines))


def _targets_label(layout: fmt.CacheLayout) -> str:
    """What a cache's targets are, for the build summary: ``top-32``, ``32 draws``, ``top-8 + 32 draws``."""
    draws = f"{layout.samples} draws in {layout.sample_slots} slots"
    if layout.targets == "sample":
        return draws
    if layout.targets == "hybrid":
        return f"top-{layout.topk} + {draws}"
    return f"top-{layout.topk}"
