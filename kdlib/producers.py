"""Who makes a :class:`kdlib.CacheLoader`'s batches: this thread, a background thread, or worker processes.

Shape notation::

    B  sequences per batch (per rank)   T  positions per sequence   K  top-k entries per position

Every producer yields ``(j, batch)`` pairs, j being the rank's batch number; :func:`in_order` puts them back in
order of j (workers deliver them interleaved) and re-raises a producer's exception at the batch where it
happened. The batches themselves come from :func:`epoch_batches` (one definition for every producer): the rank
plan of ``kdlib.order`` says which sequences, ``kdlib.batch`` reads them, and the cache's ``prefetch_shards``
decodes the shards due next in the background.

* inline (``prefetch=0``): :func:`epoch_batches` in the training thread;
* thread (``num_workers=0``, ``prefetch>0``): :class:`PrefetchThread` reads ``prefetch`` batches ahead;
* workers (``num_workers>0``): :func:`worker_batches`, a ``torch.utils.data.DataLoader`` over
  :class:`WorkerStream`; each worker gets the cache by pickling (it reopens the same cache with the same
  options), and errors come back as :class:`BatchFailure` with their type intact.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Sequence

import torch

from .batch import padding_batch, pin_batch, read_batch
from .order import EpochPlan, ShardLookahead

__all__ = ["SUPERSEDED", "epoch_batches", "pinned", "PrefetchThread", "threaded_batches", "WorkerStream",
           "BatchFailure", "worker_batches", "in_order", "Iteration"]

log = logging.getLogger(__name__)

SUPERSEDED = ("this iteration over the CacheLoader was stopped because iter(loader) started another one; a loader "
              "has one position (its state_dict), so iterate it with one loop at a time")


def epoch_batches(cache: Any, epoch_plan: EpochPlan, arrays: Sequence[str] | None, ignore_index: int,
                  worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, dict]]:
    """``(j, batch)`` for the rank's batches j that worker ``worker`` of ``num_workers`` builds, in order of j.

    Before each read, the shards due next (``kdlib.order.ShardLookahead``) go to ``cache.prefetch_shards``
    (asynchronous); a cache without that method is read without look-ahead.
    """
    remaining = epoch_plan.remaining_order()
    plan = epoch_plan.plan
    prefetch_shards = getattr(cache, "prefetch_shards", None)
    lookahead = ShardLookahead(remaining, plan, epoch_plan.shard_seqs, worker, num_workers,
                               epoch_plan.lookahead_seqs if prefetch_shards is not None else 0)
    for j in plan.worker_batches(worker, num_workers):
        due = lookahead.due_before(j)
        if due:
            prefetch_shards(due, arrays=arrays)
        start, stop = plan.batch_range(j)
        if stop > start:
            yield j, read_batch(cache, remaining[start:stop], arrays, ignore_index)
        else:  # this rank's share of a small remainder is empty: a padding row keeps the step counts equal
            yield j, padding_batch(cache, int(remaining[0]), arrays, ignore_index)


def pinned(source: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """The source's batches in page-locked memory."""
    for j, batch in source:
        yield j, pin_batch(batch)


class PrefetchThread:
    """Reads batches ahead in one daemon thread, ``depth`` hand-offs at most.

    Batches are handed over in groups: every hand-off between two threads costs a wake-up and a GIL transfer
    (~0.1-0.2 ms on a 2-core VM, as much as making a small batch, so a loop that waits for each batch ran at
    half the inline speed). A group closes when it holds ``target`` batches (1 at first, doubling per group
    up to ``_GROUP_MAX``), ``_GROUP_BYTES`` of tensors, or its first batch is ``_GROUP_AGE_S`` old, so the first
    batch comes alone and large batches go one by one. The age is checked between batches: when the next read
    blocks (a shard still decoding), the batches already made wait with it, so the read-ahead holds at most
    ``depth`` groups (``depth`` batches when each is over 4 MB).

    Stopping is deterministic: the stop flag is checked between batches (and while waiting for queue space), and
    :meth:`close` returns only after the thread has exited; at most the read under way when it was called is
    finished (and discarded). The source generator runs, and is closed, in the thread.
    """

    _DONE = object()
    _GROUP_MAX = 64
    _GROUP_BYTES = 4 << 20
    _GROUP_AGE_S = 0.002

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="kdcache-loader-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        group: list[Any] = []
        try:
            target, group_bytes, started_s = 1, 0, 0.0
            while not self._stop.is_set():
                try:
                    item = next(self._source)
                except StopIteration:
                    if not group or self._put(group):
                        self._put(self._DONE)
                    return
                if not group:
                    started_s = time.monotonic()
                group.append(item)
                group_bytes += _tensor_bytes(item)
                if (len(group) >= target or group_bytes >= self._GROUP_BYTES
                        or time.monotonic() - started_s >= self._GROUP_AGE_S):
                    batch_group, group, group_bytes = group, [], 0
                    if not self._put(batch_group):
                        return
                    target = min(2 * target, self._GROUP_MAX)
        except BaseException as exc:  # re-raised in the consumer (after the batches made before it)
            if not group or self._put(group):
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
                    raise RuntimeError(SUPERSEDED) from None
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the loader's prefetch thread exited without a result; this is a bug")
                continue
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    def close(self) -> None:
        """Stop reading ahead and wait until the thread has exited."""
        self._stop.set()
        if self._thread is threading.current_thread():
            return
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            log.warning("kdcache loader: waiting for the prefetch thread to finish the batch it is reading")
            self._thread.join()


def _tensor_bytes(item: Any) -> int:
    """Bytes of the tensors in a ``(j, batch)`` item (0 for anything else)."""
    batch = item[1] if isinstance(item, tuple) and len(item) == 2 else item
    if not isinstance(batch, dict):
        return 0
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


class _WorkerTraceback(Exception):
    """The traceback of an exception raised in a loader worker process (chained as its cause)."""


class BatchFailure:
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


class WorkerStream(torch.utils.data.IterableDataset):
    """One pass of a rank's batches, split over the DataLoader's workers by batch number.

    The cache travels to each worker with this object: inherited under fork, pickled under spawn/forkserver
    (a pickled cache reopens the same cache with the same options in the worker).
    """

    def __init__(self, cache: Any, epoch_plan: EpochPlan, arrays: Sequence[str] | None, ignore_index: int) -> None:
        self.cache = cache
        self.epoch_plan = epoch_plan
        self.arrays = arrays
        self.ignore_index = ignore_index

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        next_j = worker
        try:
            for j, batch in epoch_batches(self.cache, self.epoch_plan, self.arrays, self.ignore_index, worker,
                                          num_workers):
                yield j, batch
                next_j = j + num_workers
        except Exception as exc:
            # Delivered as batch next_j, so the training loop gets every earlier batch, then this error.
            yield next_j, BatchFailure(exc, worker)


class Iteration:
    """One pass of ``iter(loader)``: closing it stops its producer (thread or worker processes)."""

    def __init__(self) -> None:
        self.closed = False
        self._closers: list[Callable[[], None]] = []

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        self.closed = True
        while self._closers:
            self._closers.pop()()


def threaded_batches(source: Iterator[tuple[int, dict]], depth: int,
                     iteration: Iteration) -> Iterator[tuple[int, dict]]:
    """``source`` read ``depth`` batches ahead in a daemon thread (decoding and page faults overlap the step)."""
    producer = PrefetchThread(source, depth)
    iteration.on_close(producer.close)
    try:
        yield from producer
    finally:
        producer.close()


def worker_batches(stream: WorkerStream, num_workers: int, *, prefetch: int, pin_memory: bool,
                   multiprocessing_context: str | None, iteration: Iteration) -> Iterator[tuple[int, Any]]:
    """``stream`` made by ``num_workers`` processes; closing ``iteration`` joins them."""
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                         prefetch_factor=max(prefetch, 1),
                                         multiprocessing_context=multiprocessing_context)
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
        raise RuntimeError(SUPERSEDED)
    finally:
        shutdown()


def in_order(source: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, dict]]:
    """Yield items by consecutive batch number whatever order workers deliver them in; re-raise worker errors."""
    pending: dict[int, Any] = {}
    expected = 0
    for j, batch in source:
        pending[j] = batch
        while expected in pending:
            item = pending.pop(expected)
            if isinstance(item, BatchFailure):
                raise item.rebuild()
            yield expected, item
            expected += 1
    failures = [pending[j] for j in sorted(pending) if isinstance(pending[j], BatchFailure)]
    if failures:
        raise failures[0].rebuild()
    if pending:
        raise RuntimeError(f"loader workers skipped batch {expected} (got {sorted(pending)}); this is a bug")
