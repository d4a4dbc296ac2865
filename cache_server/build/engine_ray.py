"""``kdcache build --engine ray``: a pool of Ray actors computes and writes whole shards; this process drives.

Flow (the driver is the ``kdcache build`` process, which holds the build lock)::

    connect to Ray (--ray-address; none: a Ray session of this process) → start --workers actors, each
    loading the teacher once on its GPU (or CPU) and opening the token data itself (shared filesystem)
    → a factory teacher's vocabulary comes from the first actor → the driver's CacheWriter creates or resumes
    the cache → the driver hands out the writer's pending_shards(), two in flight per actor → each actor
    computes a shard with pipeline.ShardComputer (batched exactly as the local engine: same --batch-size ⇒
    same bytes) and writes it through its own CacheWriter (the same whole-shard write + journal entry)
    → the driver finalizes the manifest once. With an object-store ``--out`` (``s3://...``) the actors get the
    driver's storage variables (``AWS_*``, ``$KDCACHE_STORAGE_OPTIONS``: :func:`storage_env`) in their runtime env.

Faults: an actor whose process dies is restarted by Ray (``max_restarts``, the teacher reloads); the calls
it had in flight fail with ``RayActorError`` and the driver re-queues their shards, which are rewritten
whole (a shard without a journal entry never counts). A shard that kills its actor ``_SHARD_ATTEMPTS`` times
stops the build with an error naming it. If the driver itself dies, Ray ends its actors; rerunning the
command resumes from the journal like the local build.

Shape notation::

    S  shards of the cache    W  actors (--workers)    T  sequence length
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from cache_server import format as fmt
from cache_server.build.mixture import check_positions, load_teachers
from cache_server.build.options import BuildInputError, BuildOptions, check_device
from cache_server.build.pipeline import PipelineStats, ShardComputer
from cache_server.build.sources import TokenizerInfo, open_token_data
from cache_server.build.writer import CacheWriter
from cache_server.format import storage

__all__ = ["RayEngineError", "ShardWorker", "WorkerPlan", "pool_shape", "run_ray_build", "storage_env"]

Log = Callable[[str], None]

_IN_FLIGHT_PER_WORKER = 2  # one computing, one queued: the actor never waits for the driver between shards
_MAX_RESTARTS = 3  # per actor (Ray restarts a dead actor's process, which reloads the teacher)
_SHARD_ATTEMPTS = 3  # a shard whose actor died this many times stops the build
# What an actor writing to an object-store --out needs from the driver's environment: the actors run in the
# Ray cluster's environment (the raylet's, started before and apart from this command), not the driver's.
_STORAGE_ENV_PREFIXES = ("AWS_", "AZURE_STORAGE_", "GOOGLE_APPLICATION_CREDENTIALS", storage.STORAGE_OPTIONS_ENV)


class RayEngineError(fmt.CacheError):
    """The Ray engine cannot go on (no cluster, no workers left, a shard that keeps killing its actor)."""


@dataclass(frozen=True)
class WorkerPlan:
    """What every actor needs to write shards of this cache (sent once through the object store)."""

    layout: fmt.CacheLayout
    settings: dict[str, Any]
    manifest_fields: dict[str, Any]


class ShardWorker:
    """One Ray actor: the teacher loaded once, the token data opened once, shards computed on request.

    A threaded actor (``max_concurrency`` > 1): while the writer thread of one shard compresses and journals
    it, the next call's forward already runs; the forwards themselves take turns (one model).

    Args:
        opts: the build's options (data path, dtype, batch size...).
        teacher: the driver's TeacherInfo / MixtureInfo (paths and identity; loaded here).
        tokenizer: the driver's tokenizer (text data is tokenized the same way here).
        device: the torch device inside this actor (``cuda`` is the GPU Ray assigned).
        threads: torch CPU threads (None: leave Ray's default).
        cwd: the driver's working directory: relative paths (and ``--model-factory`` modules) resolve from
            it, as in the driver (the nodes share the filesystem).
    """

    def __init__(self, opts: BuildOptions, teacher, tokenizer: TokenizerInfo | None, device: str,
                 threads: int | None, cwd: str) -> None:
        import threading

        self._forward_lock = threading.Lock()
        self._written = threading.Condition()
        self._done: set[int] = set()
        self._computer: ShardComputer | None = None
        self.opts, self.teacher, self.device = opts, teacher, device
        # An error here is kept and raised by the first call, so that the driver gets it as itself (an error
        # escaping __init__ reaches the driver only as "the actor died", and Ray would restart it in vain).
        self._init_error: BaseException | None = None
        try:
            self._load(tokenizer, threads, cwd)
        except Exception as exc:
            self._init_error = exc

    def _load(self, tokenizer: TokenizerInfo | None, threads: int | None, cwd: str) -> None:
        import sys

        import torch

        if os.path.isdir(cwd):
            os.chdir(cwd)
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
        if threads:
            torch.set_num_threads(threads)
        check_device(self.device)
        opts = self.opts
        self.model = load_teachers(self.teacher, opts.dtype, self.device)
        self.data = open_token_data(opts.data, opts.seq_len, data_dtype=opts.data_dtype, tokenizer=tokenizer,
                                    max_sequences=opts.max_sequences, text_documents=opts.text_documents,
                                    record_offsets=opts.record_offsets)

    def describe(self) -> dict[str, Any]:
        """This actor's process id and the loaded teacher (its vocabulary is known now)."""
        if self._init_error is not None:
            raise self._init_error
        return {"pid": os.getpid(), "teacher": self.teacher, "num_sequences": self.data.num_sequences}

    def _open(self, plan: WorkerPlan) -> ShardComputer:
        if self.data.num_sequences != plan.layout.num_sequences:
            raise RayEngineError(f"this Ray worker sees {self.data.num_sequences} sequences in {self.opts.data}, the "
                                 f"driver {plan.layout.num_sequences}: every node must see the same --data file")
        writer = CacheWriter(self.opts.out, plan.layout, plan.settings, plan.manifest_fields)  # resumes the driver's
        computer = ShardComputer(self.model, self.data.sequences, writer, device=self.device,
                                 batch_size=self.opts.batch_size, queue_batches=self.opts.queue_batches,
                                 extra_arrays=self.data.offsets)
        computer.assembler.on_shard = self._shard_written
        return computer

    def _shard_written(self, shard_index: int) -> None:
        with self._written:
            self._done.add(shard_index)
            self._written.notify_all()

    def build_shard(self, shard_index: int, plan: WorkerPlan) -> dict[str, Any]:
        """Compute shard ``shard_index`` and return once its files are written and journaled."""
        if self._init_error is not None:
            raise self._init_error
        with self._forward_lock:
            if self._computer is None:
                self._computer = self._open(plan)
            computer = self._computer
            f0 = computer.forward_s
            computer.forward_shard(shard_index)
            forward_s = computer.forward_s - f0
        with self._written:
            while shard_index not in self._done:
                if computer.assembler.error is not None:
                    raise computer.assembler.error
                self._written.wait(timeout=0.1)
            self._done.discard(shard_index)
        start, stop = plan.layout.shard_range(shard_index)
        return {"shard": shard_index, "tokens": (stop - start) * plan.layout.seq_len, "forward_s": forward_s,
                "pid": os.getpid()}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BuildInputError("--engine ray needs Ray: pip install 'kdcache[ray]' (or use --engine local, "
                              "or torchrun with --rank/--world-size)") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started the session (and must end it)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    except ConnectionError as exc:
        raise RayEngineError(f"cannot connect to the Ray cluster at --ray-address {address}: {exc}; start it with "
                             "`ray start --head` (or pass ray://HOST:10001 for a remote one)") from exc
    return True


def pool_shape(opts: BuildOptions, cluster: dict[str, float]) -> tuple[int, float, int | None]:
    """(actors, GPUs per actor, torch threads per CPU actor) for ``opts`` on a cluster with ``cluster`` resources.

    Raises:
        BuildInputError: a GPU device on a cluster without GPUs, or more GPUs per actor than there are.
    """
    on_gpu = opts.device.startswith("cuda")
    gpus = float(cluster.get("GPU", 0))
    per_worker = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if on_gpu else 0.0)
    if per_worker < 0 or (per_worker > 0 and not on_gpu):
        raise BuildInputError(f"--gpus-per-worker {per_worker} needs --device cuda (got --device {opts.device})")
    if on_gpu and per_worker == 0:
        raise BuildInputError("--device cuda with --gpus-per-worker 0 would put actors on no GPU; pass 1 (default)")
    if per_worker > gpus:
        raise BuildInputError(f"--device {opts.device}: the Ray cluster has {gpus:g} GPUs, fewer than "
                              f"--gpus-per-worker {per_worker:g}; check `ray status` or use --device cpu")
    workers = opts.workers if opts.workers is not None else (int(gpus // per_worker) if per_worker else 1)
    if workers < 1:
        raise BuildInputError(f"--workers must be at least 1, got {workers}")
    cpus = int(cluster.get("CPU", 0))
    # Ray would wait forever for resources the cluster does not have: refuse at once instead.
    if per_worker and workers * per_worker > gpus:
        raise BuildInputError(f"--workers {workers} x --gpus-per-worker {per_worker:g} needs {workers * per_worker:g} "
                              f"GPUs; the Ray cluster has {gpus:g} (`ray status`): pass --workers {int(gpus // per_worker)}")
    if workers > max(cpus, 1):
        raise BuildInputError(f"--workers {workers} needs a CPU each; the Ray cluster has {cpus} (`ray status`)")
    threads = None if per_worker else max(1, cpus // workers)
    return workers, per_worker, threads


def storage_env(out: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's object-store variables (``AWS_*``, ``$KDCACHE_STORAGE_OPTIONS``...) the actors get when ``out``
    is a URL (``s3://...``); ``{}`` for a local directory (nothing secret leaves the driver that is not needed).

    They travel as the actors' Ray ``runtime_env`` ``env_vars`` (held by the cluster's GCS for the job's life,
    as any actor argument): credentials best come from instance roles or ``~/.aws`` profiles on every node.

    Args:
        out: the build's ``--out`` (a directory or a URL).
        environ: the variables to pick from (default ``os.environ``).

    Returns:
        name → value of every ``AWS_*``, ``AZURE_STORAGE_*``, ``GOOGLE_APPLICATION_CREDENTIALS`` and
        ``$KDCACHE_STORAGE_OPTIONS`` variable, or ``{}``.
    """
    if not storage.is_url(out):
        return {}
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(_STORAGE_ENV_PREFIXES)}


def _start_pool(ray, prep, log: Log) -> list:
    opts = prep.options
    workers, gpus, threads = pool_shape(opts, ray.cluster_resources())
    device = "cuda" if gpus else opts.device  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU(s)
    env_vars = storage_env(str(opts.out))
    actor_class = ray.remote(ShardWorker).options(
        num_gpus=gpus, num_cpus=threads or 1, max_restarts=_MAX_RESTARTS, max_task_retries=0,
        max_concurrency=_IN_FLIGHT_PER_WORKER + 1, **({"runtime_env": {"env_vars": env_vars}} if env_vars else {}))
    actors = [actor_class.remote(opts, prep.teacher, prep.tokenizer, device, threads, os.getcwd())
              for _ in range(workers)]
    log(f"ray: starting {workers} workers ({f'{gpus:g} GPU' if gpus else f'{threads} CPU threads'} each)")
    return actors


def _plan(ray, prep, actors: list, log: Log) -> WorkerPlan:
    """The layout (a factory teacher's vocabulary comes from the first actor), as the actors get it."""
    from ray.exceptions import RayTaskError

    try:
        described = ray.get([actor.describe.remote() for actor in actors])  # every teacher loaded
    except RayTaskError as exc:  # the teacher or the data did not load there: the error as itself
        raise exc.as_instanceof_cause() from None
    first = described[0]
    log(f"ray: {len(actors)} workers ready (pids {', '.join(str(d['pid']) for d in described)})")
    if prep.layout is None:
        prep.teacher = first["teacher"]
        check_positions(prep.options.seq_len, prep.teacher)
        prep.plan(prep.teacher.vocab_size)
    return WorkerPlan(prep.layout, prep.settings(), prep.manifest_fields())


def run_ray_build(prep, log: Log = print) -> tuple[CacheWriter, PipelineStats | None, float]:
    """Build or resume ``prep``'s cache on Ray; the caller (build/job.py) holds the build lock and finalizes.

    Args:
        prep: the job's PreparedBuild (validated options, teacher, data, layout when known).
        log: where messages go.

    Returns:
        (the driver's writer, what the actors did (None when the cache turned out to be finished already),
        setup seconds: connecting, loading the teachers, planning).

    Raises:
        RayEngineError: no cluster, every actor dead, or a shard that keeps killing its actor.
    """
    ray = _import_ray()
    t0 = time.perf_counter()
    started = _connect(ray, prep.options.ray_address)
    actors: list = []
    try:
        actors = _start_pool(ray, prep, log)
        plan = _plan(ray, prep, actors, log)
        writer = CacheWriter(prep.out_dir, plan.layout, plan.settings, plan.manifest_fields,
                             overwrite=prep.options.overwrite)
        if writer.already_complete:
            return writer, None, time.perf_counter() - t0
        if writer.pending_shards() and writer.completed_shards():
            log(f"resuming: {len(writer.completed_shards())} of {plan.layout.num_shards} shards already written")
        setup_s = time.perf_counter() - t0
        stats = _drive(ray, actors, writer.pending_shards(), ray.put(plan), plan.layout, prep.options, log)
        return writer, stats, setup_s
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


class _Scheduler:
    """The driver's loop: hand out shards, collect results, re-queue the shards of actors that died.

    An actor whose call failed with ``RayActorError`` is set aside and probed (``describe``) until Ray has
    restarted it; a probe that keeps failing (restarts used up) drops it for good.
    """

    def __init__(self, ray, actors: list, pending: list[int], plan_ref, log: Log) -> None:
        self.ray, self.actors, self.plan_ref, self.log = ray, actors, plan_ref, log
        self.queue = collections.deque(pending)
        self.attempts: collections.Counter = collections.Counter()  # deaths of an actor computing the shard
        self.probe_failures: collections.Counter = collections.Counter()
        self.alive = set(range(len(actors)))
        self.in_flight: dict[Any, tuple[int, int | None]] = {}  # object ref → (actor, shard or None: a probe)
        self.load: collections.Counter = collections.Counter()

    def refill(self) -> None:
        for a in sorted(self.alive):
            while self.queue and self.load[a] < _IN_FLIGHT_PER_WORKER:
                shard = self.queue.popleft()
                self.in_flight[self.actors[a].build_shard.remote(shard, self.plan_ref)] = (a, shard)
                self.load[a] += 1

    def busy(self) -> bool:
        return bool(self.queue) or any(shard is not None for _, shard in self.in_flight.values())

    def next_result(self) -> dict[str, Any] | None:
        """Wait for one call; the result of a written shard, or None (a failure handled, a probe answered)."""
        from ray.exceptions import RayActorError, RayTaskError

        if not self.in_flight:
            raise RayEngineError("every Ray worker died; the shards written so far are kept, rerun the command "
                                 "to resume")
        (ref,), _ = self.ray.wait(list(self.in_flight), num_returns=1)
        a, shard = self.in_flight.pop(ref)
        try:
            result = self.ray.get(ref)
        except RayTaskError as exc:  # our own error inside the actor (bad logits, a full disk...)
            raise exc.as_instanceof_cause() from None
        except RayActorError:
            self._actor_failed(a, shard)
            return None
        if shard is None:  # a probe: the actor is back
            self.alive.add(a)
            self.probe_failures[a] = 0
            return None
        self.load[a] -= 1
        return result

    def _actor_failed(self, a: int, shard: int | None) -> None:
        if shard is not None:
            self.load[a] -= 1
            self.attempts[shard] += 1
            if self.attempts[shard] >= _SHARD_ATTEMPTS:
                raise RayEngineError(f"shard {shard}: its Ray worker died {self.attempts[shard]} times while computing "
                                     "it (out of memory? see the Ray logs); the shards written so far are kept, "
                                     "rerun the command to resume")
            self.queue.appendleft(shard)
            self.log(f"ray: worker {a} died while computing shard {shard}; re-queued it")
        else:
            self.probe_failures[a] += 1
            if self.probe_failures[a] > 10 * (_MAX_RESTARTS + 1):
                self.log(f"ray: worker {a} did not come back; going on without it")
                return
            time.sleep(0.2)  # Ray is restarting it
        if a in self.alive or shard is None:
            self.alive.discard(a)
            self.in_flight[self.actors[a].describe.remote()] = (a, None)


def _drive(ray, actors: list, pending: list[int], plan_ref, layout: fmt.CacheLayout, opts: BuildOptions,
           log: Log) -> PipelineStats:
    """Hand ``pending`` shards to the actors until every one is written, with one progress bar."""
    from tqdm.auto import tqdm

    stats = PipelineStats()
    total_tokens = sum(stop - start for start, stop in map(layout.shard_range, pending)) * layout.seq_len
    bar = tqdm(total=int(total_tokens), unit="tok", unit_scale=True, desc=f"kdcache build (ray, {len(actors)} workers)",
               disable=not opts.progress, dynamic_ncols=True)
    scheduler = _Scheduler(ray, actors, pending, plan_ref, log)
    try:
        scheduler.refill()
        while scheduler.busy():
            done = scheduler.next_result()
            if done is not None:
                stats.shards_written += 1
                stats.forward_s += done["forward_s"]
                bar.update(done["tokens"])
                bar.set_postfix_str(f"shards {stats.shards_written}/{len(pending)}")
            scheduler.refill()
    finally:
        bar.close()
    return stats
