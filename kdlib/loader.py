"""Streaming training loader over a teacher-logit cache: partitioned, shard-aware shuffled, resumable.

Shape notation::

    B  sequences per batch (per rank)   T  positions per sequence
    K  top-k entries per position       N  sequences in the cache
    W  world size (ranks)               S  sequences per shard

A batch is a ``dict`` of CPU tensors (compact until they reach the device; the loss widens them). Every cached
top-k id is checked against the teacher's vocabulary on the CPU when the batch is made, so the alignment check
of a training step needs no device sync (``kdlib.alignment``)::

    input_ids           [B, T]     int32    the tokens the teacher saw (feed these to the student)
    labels              [B, T]     int64    input_ids shifted left; labels[:, T-1] = ignore_index
    topk_ids            [B, T, K]  int32
    topk_logprobs       [B, T, K]  float16 (as stored)
    lse                 [B, T]     float32  teacher full-vocab logsumexp
    lse_t{tau:g}        [B, T]     float32  one per build temperature
    sample_indices      [B]        int64    the cache sequence of each row (-1 for a padding row)
    teacher_vocab_size  []         int64    for ``check_alignment(..., student_vocab_size=...)`` (stays on the CPU)

Order, partition and resume (one definition, used by every rank and worker):

1. The epoch's global order is a function of ``(seed, epoch)`` only: shards are permuted, consecutive runs of
   ``shuffle_window_shards`` permuted shards form windows, and sequences are permuted inside each window. Reads
   stay inside a few shards at a time (each decoded once, then memory-mapped), yet every epoch differs.
2. ``cursor`` counts global samples consumed in the epoch. A global step takes the next ``W * B`` samples of
   the remaining order; rank r takes the r-th block of B (node → rank is implicit in the global rank).
3. Worker w of a rank's ``num_workers`` builds that rank's batches j with ``j % num_workers == w``; the loader
   re-orders worker output by j, so the batch sequence is identical for any number of workers.
4. ``state_dict()`` is ``{seed, epoch, cursor, cache identity, ...}``; it does not mention ranks or workers, so a
   run resumed with another ``num_workers``, world size or batch size continues exactly at the cursor: no sample
   is repeated or skipped. Resuming on another cache (other sequences, or the same ones sharded differently,
   which changes the order) is refused.
5. Because the order is known in advance, the shards of the next ``prefetch_windows`` shuffle window(s) this
   rank will read are fetched (remote) and decoded in the background while the current window is consumed
   (``DecodedShardStore.prefetch``; split among the workers, which share the decoded-shard directory), so a
   cold or remote cache does not stall at window boundaries.

Remainder of an epoch (``R = remaining % (W * B)`` samples after the last full global step):
``drop_last=True`` (default) skips them for this epoch (the shuffle puts other samples there next epoch);
``drop_last=False`` splits them over the ranks as evenly as possible (sizes differ by at most one), so every
rank takes the same number of steps; a rank left with no sample (R < W) gets one padding row (a copy of a
real sequence with every label = ignore_index and ``sample_indices = -1``), which the loss ignores.

Workers: prefer ``num_workers=0`` (the default) for a local cache whose shards are decoded (after the first
epoch, or ``cache.prepare()``): a batch is then a few memory-map slices, cheaper to make than to send from a
worker process (pickled into shared memory, through a queue), and the background thread already overlaps it with
the step. Workers pay when making a batch is heavy CPU work: a cold cache whose shards are decoded during the
epoch, a remote cache (whose shards are fetched, hashed and decoded the same way), or transforms of your own.
``benchmarks/loader_throughput.py --quick [--cold]`` on 2 cores (B=8, T=512, K=32): decoded cache 1.9M tokens/s
with 0 workers vs 1.1M with 2; cold cache 0.5M vs 1.2M.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .alignment import DEFAULT_IGNORE_INDEX, check_topk_ids_in_vocab, shift_labels

__all__ = ["make_loader", "CacheLoader", "epoch_order", "RankPlan", "move_batch", "resolve_rank_world"]

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2 added the cache identity; version-1 states still load (without that check)
_TEACHER_KEYS_WIDEN_ON_DEVICE = ("input_ids",)
# Bookkeeping entries that stay on the CPU in move_batch: reading them (int(), .tolist()) then never waits for
# the device, and nothing on the device needs them.
KEEP_ON_CPU = ("sample_indices", "teacher_vocab_size")
_U64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------- order


def epoch_order(
    num_sequences: int, shard_seqs: int, *, shuffle: bool, seed: int, epoch: int, shuffle_window_shards: int = 4,
) -> np.ndarray:
    """The epoch's global order of sequence indices [N] int64; a function of its arguments only.

    Args:
        num_sequences: N.
        shard_seqs: S, sequences per shard (the last shard may be shorter).
        shuffle: False gives ``0..N-1``.
        seed: base seed, any integer in [-2**63, 2**64); the same (seed, epoch) gives the same order on every
            machine. A negative seed is taken as its 64-bit two's complement.
        epoch: epoch number >= 0 (each epoch has its own permutation).
        shuffle_window_shards: shards whose sequences are mixed together; 1 only permutes shards and
            sequences within a shard; larger mixes more at the cost of more shards open at once.
    """
    if not shuffle:
        return np.arange(num_sequences, dtype=np.int64)
    if shuffle_window_shards < 1:
        raise ValueError(f"shuffle_window_shards must be >= 1, got {shuffle_window_shards}")
    seed64 = _seed64(seed)
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    rng = np.random.default_rng([seed64 & 0xFFFFFFFF, seed64 >> 32, int(epoch)])
    num_shards = -(-num_sequences // shard_seqs)
    shard_perm = rng.permutation(num_shards)
    order = np.empty(num_sequences, dtype=np.int64)
    filled = 0
    for w in range(0, num_shards, shuffle_window_shards):
        window = [np.arange(s * shard_seqs, min((s + 1) * shard_seqs, num_sequences)) for s in
                  shard_perm[w: w + shuffle_window_shards]]
        members = np.concatenate(window)
        order[filled: filled + members.size] = rng.permutation(members)
        filled += members.size
    return order


def _seed64(seed: int) -> int:
    """The seed as an unsigned 64-bit integer (the same words as before for seeds in [0, 2**64))."""
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be an integer, got {seed!r}") from None
    if not -(1 << 63) <= value <= _U64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64) (a 64-bit seed), got {value}")
    return value & _U64


@dataclass(frozen=True)
class RankPlan:
    """Which part of the remaining epoch order one rank reads, batch by batch.

    Offsets are into ``order[cursor:]`` (the remaining order). Batch j of the rank covers
    ``[start, stop)`` of it; after the global step of batch j, ``consumed_after(j)`` samples are consumed
    globally (all ranks together).
    """

    remaining: int
    batch_size: int
    world_size: int
    rank: int
    drop_last: bool

    @property
    def global_step(self) -> int:
        return self.batch_size * self.world_size

    @property
    def full_steps(self) -> int:
        return self.remaining // self.global_step

    @property
    def remainder(self) -> int:
        return self.remaining - self.full_steps * self.global_step

    @property
    def num_batches(self) -> int:
        return self.full_steps + (1 if self.remainder and not self.drop_last else 0)

    @property
    def consumable(self) -> int:
        """Samples all ranks consume until the epoch ends (the dropped remainder excluded)."""
        return self.remaining if not self.drop_last else self.full_steps * self.global_step

    def batch_range(self, j: int) -> tuple[int, int]:
        if not 0 <= j < self.num_batches:
            raise IndexError(f"batch {j} outside [0, {self.num_batches})")
        if j < self.full_steps:
            start = j * self.global_step + self.rank * self.batch_size
            return start, start + self.batch_size
        base = self.full_steps * self.global_step
        q, r = divmod(self.remainder, self.world_size)
        start = base + self.rank * q + min(self.rank, r)
        return start, start + q + (1 if self.rank < r else 0)

    def consumed_after(self, j: int) -> int:
        return (j + 1) * self.global_step if j < self.full_steps else self.remaining


def resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments, else an initialized ``torch.distributed`` group, else ``RANK``/``WORLD_SIZE``."""
    if world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        else:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        else:
            rank = int(os.environ.get("RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size} (from "
                         "arguments, torch.distributed, or the RANK/WORLD_SIZE environment variables)")
    return int(rank), int(world_size)


# ----------------------------------------------------------------------------------------------- cache handle


class _CacheRef:
    """A cache that each process opens for itself (fork- and spawn-safe).

    A path or URL is opened lazily in the process that reads. A ``LocalCache`` survives fork (the reader
    re-opens its maps) and is re-created from its path under spawn. A ``RemoteCache`` re-creates its HTTP client
    in each process and pickles without its connections, so it is passed as is.
    """

    def __init__(self, cache: Any, open_kwargs: Mapping[str, Any] | None = None) -> None:
        self._spec: tuple[str, dict[str, Any]] | None = None
        self._cache = None
        if isinstance(cache, (str, os.PathLike)):
            self._spec = (os.fspath(cache), dict(open_kwargs or {}))
        else:
            self._cache = cache
            self._spec = _local_spec(cache)

    def get(self):
        if self._cache is None:
            from .data.cache import open_cache

            path, kwargs = self._spec
            self._cache = open_cache(path, **kwargs)
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        if self._spec is not None:
            return {"_spec": self._spec, "_cache": None}  # reopened lazily in the new process
        return {"_spec": None, "_cache": self._cache}  # must pickle itself (RemoteCache does)


def _local_spec(cache: Any) -> tuple[str, dict[str, Any]] | None:
    from .data.cache import LocalCache

    if isinstance(cache, LocalCache):
        return os.fspath(cache.path), {"decode_dir": cache.decode_dir.parent, "widen": cache.widen,
                                       "readahead": cache.readahead, "max_decoded_bytes": cache.store.max_bytes,
                                       "prefetch_workers": cache.store.prefetch_workers}
    return None


# ----------------------------------------------------------------------------------------------- batches


def _read_batch(cache, indices: np.ndarray, arrays: Sequence[str] | None, ignore_index: int) -> dict:
    contiguous = indices[-1] - indices[0] == indices.size - 1 and bool(
        (np.diff(indices) == 1).all())
    if contiguous:
        batch = cache.read(int(indices[0]), int(indices[-1]) + 1, arrays=arrays)
    else:
        batch = cache.lookup(indices, arrays=arrays)
    if "input_ids" not in batch:
        raise ValueError("the loader needs 'input_ids' among arrays= (labels and alignment checks use them)")
    if "topk_ids" in batch:
        # Here, on the CPU and off the training thread, so the step's alignment check needs no device sync.
        check_topk_ids_in_vocab(batch["topk_ids"], cache.vocab_size)  # [B, T, K]
    batch["labels"] = shift_labels(batch["input_ids"], ignore_index)  # [B, T]
    batch["sample_indices"] = torch.from_numpy(np.array(indices, dtype=np.int64))  # [B]
    batch["teacher_vocab_size"] = torch.tensor(cache.vocab_size, dtype=torch.int64)
    return batch


def _padding_batch(cache, any_index: int, arrays, ignore_index: int) -> dict:
    batch = _read_batch(cache, np.array([any_index], dtype=np.int64), arrays, ignore_index)
    batch["labels"].fill_(ignore_index)
    batch["sample_indices"].fill_(-1)
    return batch


class _ShardLookahead:
    """Fetch and decode, in the background, the shards this rank reads next.

    Before batch j is read, every shard of the rank's batches that start less than ``lookahead_seqs`` positions
    after batch j's end goes to the cache's ``DecodedShardStore.prefetch`` (asynchronous, de-duplicated), each
    shard once per pass. With ``lookahead_seqs`` = one shuffle window, the whole next window is requested while
    the current one is read. Worker w of n requests only the shards with ``shard % n == w``: the workers share
    the decoded-shard directory, so each upcoming shard is fetched and decoded once, not once per worker.
    Caches without a decoded-shard store are left alone.
    """

    def __init__(self, cache, arrays: Sequence[str] | None, remaining: np.ndarray, plan: RankPlan, worker: int,
                 num_workers: int, lookahead_seqs: int) -> None:
        store = getattr(cache, "store", None)
        self.store = store if lookahead_seqs > 0 and hasattr(store, "prefetch") else None
        if self.store is not None:
            self.names = list(arrays) if arrays is not None else list(cache.position_arrays())
            self.shard_seqs = int(cache.shard_seqs)
        self.remaining = remaining
        self.plan = plan
        self.worker = worker
        self.num_workers = num_workers
        self.lookahead_seqs = lookahead_seqs
        self.next_j = 0  # the rank's first batch not looked at yet
        self.requested: set[int] = set()

    def before(self, j: int, stop: int) -> None:
        if self.store is None:
            return
        self.next_j = max(self.next_j, j + 1)
        horizon = stop + self.lookahead_seqs
        while self.next_j < self.plan.num_batches:
            start, end = self.plan.batch_range(self.next_j)
            if start >= horizon:
                break
            for shard in np.unique(self.remaining[start:end] // self.shard_seqs).tolist():
                if shard % self.num_workers == self.worker and shard not in self.requested:
                    self.requested.add(shard)
                    for name in self.names:
                        self.store.prefetch(name, shard)
            self.next_j += 1


@dataclass
class _EpochPlan:
    """Everything a worker needs to produce its batches of one pass (picklable)."""

    num_sequences: int
    shard_seqs: int
    shuffle: bool
    seed: int
    epoch: int
    window: int
    cursor: int
    plan: RankPlan
    arrays: tuple[str, ...] | None
    ignore_index: int
    lookahead_seqs: int = 0

    def order(self) -> np.ndarray:
        full = epoch_order(self.num_sequences, self.shard_seqs, shuffle=self.shuffle, seed=self.seed,
                           epoch=self.epoch, shuffle_window_shards=self.window)
        return full[self.cursor:]

    def batches(self, cache, worker: int, num_workers: int) -> Iterator[tuple[int, dict]]:
        remaining = self.order()
        lookahead = _ShardLookahead(cache, self.arrays, remaining, self.plan, worker, num_workers,
                                    self.lookahead_seqs)
        for j in range(worker, self.plan.num_batches, num_workers):
            start, stop = self.plan.batch_range(j)
            lookahead.before(j, stop)
            if stop > start:
                yield j, _read_batch(cache, remaining[start:stop], self.arrays, self.ignore_index)
            else:
                yield j, _padding_batch(cache, int(remaining[0]), self.arrays, self.ignore_index)


class _WorkerTraceback(Exception):
    """The traceback of an exception raised in a loader worker process (chained as its cause)."""


class _BatchFailure:
    """An exception raised while a worker made batch j, carried to the training process with its type intact.

    DataLoader rebuilds a worker's exception by calling ``type(message)``, which turns exceptions with other
    constructors (``CorruptShardError(array, shard, detail)``) into a RuntimeError. This keeps the original type,
    ``args`` and attributes (rebuilt without calling the constructor) and chains the worker's traceback.
    """

    def __init__(self, exc: BaseException, worker: int) -> None:
        self.exc_type: type[BaseException] = type(exc) if _picklable(type(exc)) else RuntimeError
        self.args = exc.args if _picklable(exc.args) else (str(exc),)
        self.attrs = {k: v for k, v in getattr(exc, "__dict__", {}).items() if _picklable(v)}
        self.where = f"loader worker {worker} (pid {os.getpid()})"
        self.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def rebuild(self) -> BaseException:
        try:
            exc = self.exc_type.__new__(self.exc_type)
            exc.args = self.args
            exc.__dict__.update(self.attrs)
        except Exception:  # an exotic exception type: keep its text
            exc = RuntimeError(f"{self.exc_type.__name__}: {self.args}")
        exc.__cause__ = _WorkerTraceback(f"raised in {self.where}:\n{self.traceback}")
        return exc


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


class _WorkerStream(torch.utils.data.IterableDataset):
    def __init__(self, cache_ref: _CacheRef, epoch_plan: _EpochPlan) -> None:
        self.cache_ref = cache_ref
        self.epoch_plan = epoch_plan

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        next_j = worker
        try:
            for j, batch in self.epoch_plan.batches(self.cache_ref.get(), worker, num_workers):
                yield j, batch
                next_j = j + num_workers
        except Exception as exc:
            # Delivered as batch next_j, so the training loop gets every earlier batch, then this error.
            yield next_j, _BatchFailure(exc, worker)


def _pin(batch: dict) -> dict:
    return {k: v.pin_memory() for k, v in batch.items()}


def move_batch(batch: Mapping[str, torch.Tensor], device: torch.device | str, *, non_blocking: bool = True,
               long_input_ids: bool = True, keep_on_cpu: Sequence[str] = KEEP_ON_CPU) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device`` (asynchronously from pinned memory); widen ``input_ids`` there if asked.

    The top-k arrays stay compact (int32 ids, fp16 log-probs): the loss widens them on the device, where it is cheap.
    ``keep_on_cpu`` entries (bookkeeping: ``sample_indices``, ``teacher_vocab_size``) are not copied, so reading
    them (``int()``, ``.tolist()``) never waits for the device.
    """
    device = torch.device(device)
    out = {}
    for key, value in batch.items():
        if key in keep_on_cpu or not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        value = value.to(device, non_blocking=non_blocking)
        if long_input_ids and key in _TEACHER_KEYS_WIDEN_ON_DEVICE:
            value = value.to(torch.int64)
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- producers

_SUPERSEDED = ("this iteration over the CacheLoader was stopped because iter(loader) started another one; a loader "
               "has one position (its state_dict), so iterate it with one loop at a time")


class _PrefetchThread:
    """Reads batches ahead in one daemon thread, ``depth`` batches at most.

    Stopping is deterministic: the stop flag is checked between batches (and while waiting for queue space), and
    :meth:`close` returns only after the thread has exited; at most the read under way when it was called is
    finished (and discarded). The source generator runs, and is closed, in the thread.
    """

    _DONE = object()

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="kdcache-loader-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = next(self._source)
                except StopIteration:
                    self._put(self._DONE)
                    return
                if not self._put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer with its traceback
            self._put(exc)
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError(_SUPERSEDED) from None
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the loader's prefetch thread exited without a result; this is a bug")
                continue
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop reading ahead and wait until the thread has exited."""
        self._stop.set()
        if self._thread is threading.current_thread():
            return
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            log.warning("kdcache loader: waiting for the prefetch thread to finish the batch it is reading")
            self._thread.join()


class _Iteration:
    """One pass of ``iter(loader)``: closing it stops its producer (thread or worker processes)."""

    def __init__(self) -> None:
        self.closed = False
        self._closers: list[Any] = []

    def on_close(self, fn: Any) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        self.closed = True
        while self._closers:
            self._closers.pop()()


# ----------------------------------------------------------------------------------------------- loader


class CacheLoader:
    """Iterable of cache batches for one rank; see the module docstring for order, partition and resume.

    For a decoded local cache keep ``num_workers=0`` (the default): batches are memory-map slices read by a
    background thread, and worker processes only add inter-process copies. Workers pay for a cold or remote cache,
    whose shards are decoded (fetched) while the epoch runs, or for heavy transforms of your own (module
    docstring, "Workers", with measurements).

    One loop at a time: a new ``iter(loader)`` stops the previous iteration's producer (waiting for it), and the
    previous iterator raises if used again. Breaking out of a loop stops the producer before the next statement.

    Args:
        cache: a reader from ``kdlib.open_cache`` or a cache path/URL (then each process opens its own).
        batch_size: B, sequences per batch on this rank.
        shuffle: shard-aware shuffle (False reads 0..N-1 in order).
        seed: shuffle seed, any integer in [-2**63, 2**64); the epoch's order depends on (seed, epoch) only.
        rank, world_size: this process's place; default from torch.distributed, else RANK/WORLD_SIZE.
        num_workers: DataLoader worker processes (0 reads in a background thread of this process; see above).
        drop_last: what happens to an epoch's remainder (module docstring).
        prefetch: batches read ahead per worker (or by the background thread when num_workers=0; 0 = none).
        pin_memory: page-locked batches for asynchronous host→GPU copies (default: when CUDA is available;
            requesting it without CUDA warns and reads unpinned batches).
        device: move every batch there (``non_blocking`` from pinned memory) and widen ``input_ids`` to
            int64; None leaves batches on the CPU. ``"cuda"`` picks ``cuda:$LOCAL_RANK``. ``sample_indices`` and
            ``teacher_vocab_size`` stay on the CPU (``move_batch``).
        shuffle_window_shards: shards whose sequences are mixed together per window.
        prefetch_windows: shuffle windows of upcoming shards fetched and decoded in the background ahead of the
            reads (0 disables). The decoded-shard size limit (``max_decoded_bytes`` / ``shard_cache_bytes``)
            should hold ``1 + prefetch_windows`` windows of shards, or prefetched shards are evicted before use.
        arrays: per-position arrays to read (default all; ``input_ids`` is required).
        ignore_index: label of positions without a next token.
        multiprocessing_context: e.g. ``"spawn"``/``"forkserver"`` for workers (default: the platform's).
        open_kwargs: keyword arguments for ``open_cache`` when ``cache`` is a path/URL.
    """

    def __init__(
        self,
        cache: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        drop_last: bool = True,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        device: torch.device | str | None = None,
        shuffle_window_shards: int = 4,
        prefetch_windows: int = 1,
        arrays: Sequence[str] | None = None,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        multiprocessing_context: str | None = None,
        open_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_workers < 0 or prefetch < 0 or prefetch_windows < 0:
            raise ValueError(f"num_workers, prefetch and prefetch_windows must be >= 0, got {num_workers}, "
                             f"{prefetch}, {prefetch_windows}")
        if shuffle_window_shards < 1:
            raise ValueError(f"shuffle_window_shards must be >= 1, got {shuffle_window_shards}")
        _seed64(seed)  # a clear error now rather than at the first iter()
        self._cache_ref = _CacheRef(cache, open_kwargs)
        self.cache = self._cache_ref.get()
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        cuda = torch.cuda.is_available()
        if pin_memory and not cuda:
            warnings.warn("CacheLoader(pin_memory=True) needs CUDA, which is not available here: batches are not "
                          "pinned", UserWarning, stacklevel=2)
        self.pin_memory = cuda if pin_memory is None else bool(pin_memory) and cuda
        self.device = _resolve_device(device)
        self.shuffle_window_shards = int(shuffle_window_shards)
        self.prefetch_windows = int(prefetch_windows)
        self.arrays = tuple(arrays) if arrays is not None else None
        self.ignore_index = int(ignore_index)
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.cursor = 0  # global samples consumed in self.epoch (all ranks together)
        self._active: _Iteration | None = None
        if self._rank_plan().num_batches == 0:
            raise ValueError(
                f"the cache has {self.num_sequences} sequences, fewer than one global batch of "
                f"{self.world_size} ranks x {batch_size}, so drop_last=True leaves nothing to train on; use a "
                "smaller batch_size or drop_last=False")

    # -------------------------------------------------------------- state

    @property
    def num_sequences(self) -> int:
        return self.cache.num_sequences

    def cache_identity(self) -> dict[str, Any]:
        """What the saved position means: the cache's sequences (dataset fingerprint) and their sharding.

        The order is a function of (seed, epoch, N, shard_seqs), so a cursor is only meaningful on a cache with
        the same sequences (``dataset_fingerprint``, a hash of every shard's tokens), the same N and the same
        ``shard_seqs``. A cache rebuilt from the same data with the same layout (another teacher, another
        build date) has the same identity, and resuming on it is allowed.
        """
        manifest = getattr(self.cache, "manifest", None) or {}
        return {
            "dataset_fingerprint": manifest.get("dataset_fingerprint"),
            "num_sequences": int(self.num_sequences),
            "shard_seqs": int(self.cache.shard_seqs),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position in the global order; identical on every rank, independent of workers/world size."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "shuffle": self.shuffle,
            "shuffle_window_shards": self.shuffle_window_shards,
            "num_sequences": self.num_sequences,
            "cache": self.cache_identity(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at a saved position. The state's seed/shuffle settings win: they define the order.

        Raises:
            ValueError: the state is from another kdlib version, or was saved on another cache.
        """
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {version!r} is not {STATE_VERSION}; it was "
                             "written by another kdlib version")
        if int(state["num_sequences"]) != self.num_sequences:
            raise ValueError(
                f"the loader state is for a cache of {state['num_sequences']} sequences but this cache has "
                f"{self.num_sequences}: resume with the same cache (or start a fresh loader)")
        if state.get("cache") is None:
            warnings.warn("this loader state predates cache identities (version 1): only the number of sequences "
                          "could be checked against this cache", UserWarning, stacklevel=2)
        else:
            saved, mine = dict(state["cache"]), self.cache_identity()
            differs = [f"{key} {saved.get(key)!r} (saved) vs {mine[key]!r} (this cache)" for key in mine
                       if saved.get(key) != mine[key]]
            if differs:
                raise ValueError(
                    "the loader state was saved on another cache: " + "; ".join(differs) + ". The saved cursor "
                    "indexes that cache's order (its sequences and sharding), so it would repeat or skip samples "
                    "here: resume with the cache the state was saved on, or start a fresh loader")
        cursor = int(state["cursor"])
        if not 0 <= cursor <= self.num_sequences:
            raise ValueError(f"loader state cursor {cursor} outside [0, {self.num_sequences}]")
        _seed64(state["seed"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.shuffle_window_shards = int(state["shuffle_window_shards"])
        self.epoch = int(state["epoch"])
        self.cursor = cursor

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (like ``DistributedSampler.set_epoch``)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.cursor = 0

    def _rank_plan(self) -> RankPlan:
        return RankPlan(self.num_sequences - self.cursor, self.batch_size, self.world_size, self.rank,
                        self.drop_last)

    def _roll_epoch_if_done(self) -> None:
        if self.cursor > 0 and self._rank_plan().num_batches == 0:
            self.epoch += 1
            self.cursor = 0

    def __len__(self) -> int:
        """Batches the next ``iter()`` yields on this rank (the rest of the current epoch)."""
        self._roll_epoch_if_done()
        return self._rank_plan().num_batches

    # -------------------------------------------------------------- iteration

    def _epoch_plan(self) -> _EpochPlan:
        lookahead_seqs = self.prefetch_windows * self.shuffle_window_shards * self.cache.shard_seqs
        return _EpochPlan(self.num_sequences, self.cache.shard_seqs, self.shuffle, self.seed, self.epoch,
                          self.shuffle_window_shards, self.cursor, self._rank_plan(), self.arrays,
                          self.ignore_index, lookahead_seqs)

    def close(self) -> None:
        """Stop the current iteration's producer (thread or workers) and wait for it; iterating again restarts."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.close()  # one producer per loader: a previous loop's is stopped (and waited for) first
        iteration = _Iteration()
        self._active = iteration
        self._roll_epoch_if_done()
        epoch_plan = self._epoch_plan()
        start_epoch, start_cursor = self.epoch, self.cursor
        if self.num_workers > 0:
            source = self._worker_batches(epoch_plan, iteration)
        elif self.prefetch > 0:
            source = self._threaded_batches(epoch_plan, iteration)
        else:
            source = self._inline_batches(epoch_plan)
        try:
            for j, batch in _in_order(source):
                if self.device is not None:
                    batch = move_batch(batch, self.device, non_blocking=self.pin_memory)
                # Counted as consumed when handed over: a checkpoint taken after training on it resumes after it.
                self.epoch, self.cursor = start_epoch, start_cursor + epoch_plan.plan.consumed_after(j)
                yield batch
                if iteration.closed:
                    raise RuntimeError(_SUPERSEDED)
        finally:
            iteration.close()
            if self._active is iteration:
                self._active = None
            source.close()
        self._roll_epoch_if_done()

    def _inline_batches(self, epoch_plan: _EpochPlan) -> Iterator[tuple[int, dict]]:
        for j, batch in epoch_plan.batches(self._cache_ref.get(), 0, 1):
            yield j, (_pin(batch) if self.pin_memory else batch)

    def _threaded_batches(self, epoch_plan: _EpochPlan, iteration: _Iteration) -> Iterator[tuple[int, dict]]:
        """Read ``prefetch`` batches ahead in a daemon thread (decoding and page faults overlap the step)."""
        producer = _PrefetchThread(self._inline_batches(epoch_plan), self.prefetch)
        iteration.on_close(producer.close)
        try:
            yield from producer
        finally:
            producer.close()

    def _worker_batches(self, epoch_plan: _EpochPlan, iteration: _Iteration) -> Iterator[tuple[int, dict]]:
        workers = min(self.num_workers, max(epoch_plan.plan.num_batches, 1))
        loader = torch.utils.data.DataLoader(
            _WorkerStream(self._cache_ref, epoch_plan),
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=max(self.prefetch, 1),
            multiprocessing_context=self.multiprocessing_context,
        )
        it = iter(loader)

        def shutdown() -> None:
            stop_workers = getattr(it, "_shutdown_workers", None)  # joins the worker processes
            if stop_workers is not None:
                stop_workers()

        iteration.on_close(shutdown)
        try:
            while not iteration.closed:
                try:
                    item = next(it)
                except StopIteration:
                    return
                yield item
            raise RuntimeError(_SUPERSEDED)
        finally:
            shutdown()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(cache={self.cache!r}, batch_size={self.batch_size}, rank={self.rank}/"
                f"{self.world_size}, num_workers={self.num_workers}, shuffle={self.shuffle}, seed={self.seed}, "
                f"epoch={self.epoch}, cursor={self.cursor})")


def _in_order(source: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, dict]]:
    """Yield items by consecutive batch number whatever order workers deliver them in; re-raise worker errors."""
    pending: dict[int, Any] = {}
    expected = 0
    for j, batch in source:
        pending[j] = batch
        while expected in pending:
            item = pending.pop(expected)
            if isinstance(item, _BatchFailure):
                raise item.rebuild()
            yield expected, item
            expected += 1
    failures = [pending[j] for j in sorted(pending) if isinstance(pending[j], _BatchFailure)]
    if failures:
        raise failures[0].rebuild()
    if pending:
        raise RuntimeError(f"loader workers skipped batch {expected} (got {sorted(pending)}); this is a bug")


def _resolve_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def make_loader(cache: Any, batch_size: int, **kwargs: Any) -> CacheLoader:
    """A :class:`CacheLoader` over ``cache`` (a reader, or a path/URL); keyword arguments as documented there.

    Example::

        loader = kdlib.make_loader("cache_dir", batch_size=8, seed=0, device="cuda")
        for batch in loader:
            logits = student(batch["input_ids"]).logits          # [B, T, V]
            loss = kdlib.kd_loss_from_batch(logits, batch, ce_weight=0.1)
    """
    return CacheLoader(cache, batch_size, **kwargs)
