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
    """Reads batches ahead in one daemon thread, ``depth`` hand-offs at most, or makes them in the consumer's
    thread while there is nothing to overlap.

    Batches are handed over in groups: every hand-off between two threads costs a wake-up and a GIL transfer
    (~0.1-0.2 ms on a 2-core VM, as much as making a small batch, so a loop that waits for each batch ran at
    half the inline speed). A group closes when it holds ``target`` batches (1 at first, doubling per group
    up to ``_GROUP_MAX``), ``_GROUP_BYTES`` of tensors, or its first batch is ``_GROUP_AGE_S`` old, so the first
    batch comes alone and large batches go one by one. The age is checked between batches: when the next read
    blocks (a shard still decoding), the batches already made wait with it, so the read-ahead holds at most
    ``depth`` groups (``depth`` batches when each is over 4 MB).

    Inline while the consumer is quick: the thread only pays when the consumer spends time away from the loader
    (a training step) for the batches to be made in. The consumer measures how long it stays away between two
    batches and how long a batch takes to make (moving averages); while it comes back in under
    ``_INLINE_BELOW`` of a batch's making time (a loop that only reads: statistics, a benchmark, a step far
    cheaper than the batch), it makes the next batch itself and the thread waits; once it stays away for
    ``_THREAD_ABOVE`` of a batch's making time (a real step), the thread reads ahead again. It starts inline
    (``inline_first``; the thread is started the first time it is needed), so the first two batches are made in
    the consumer's thread: the first waits for a shard's decode either way, the second measures. Either way the
    source is advanced under one lock, by one thread at a time, and a group is queued before the lock is let go,
    so the batches come in the source's order; the consumer makes one itself only when the queue is empty.

    Stopping is deterministic: the stop flag is checked between batches (and while waiting for queue space), and
    :meth:`close` returns only after the thread has exited; at most the read under way when it was called is
    finished (and discarded). The source generator is closed by the thread (by :meth:`close` if the thread
    never started).
    """

    _DONE = object()
    _GROUP_MAX = 64
    _GROUP_BYTES = 4 << 20
    _GROUP_AGE_S = 0.002
    _INLINE_BELOW = 0.5  # away time / making time under which the consumer makes the batches itself
    _THREAD_ABOVE = 1.0  # ... and over which the thread reads ahead again (between the two: no change)
    _AVERAGE_WEIGHT = 0.25  # of the newest measurement in the moving averages

    def __init__(self, source: Iterator[Any], depth: int, *, inline_first: bool = True) -> None:
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._source_lock = threading.Lock()  # held while the source is advanced and what it made is queued
        self._exhausted = False  # the source ended (or raised): under _source_lock
        self._inline = inline_first
        self._resume = threading.Event()  # set while the thread reads ahead
        self._make_s: float | None = None  # moving average: one batch made (the first one, a cold decode, not)
        self._made = 0
        self._away_s: float | None = None  # moving average: the consumer away between two batches
        self._thread = threading.Thread(target=self._produce, name="kdcache-loader-prefetch", daemon=True)
        self._started = False
        if not inline_first:
            self._start_thread()

    def _start_thread(self) -> None:
        """Let the thread read ahead (started on first use: a loop that only reads never needs it)."""
        self._inline = False
        self._resume.set()
        if not self._started:
            self._started = True
            self._thread.start()

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self._AVERAGE_WEIGHT * (new - old)

    def _next_from_source(self) -> Any:
        """One item of the source, timed (under ``_source_lock``); StopIteration and errors mark it exhausted."""
        started_s = time.perf_counter()
        try:
            item = next(self._source)
        except BaseException:
            self._exhausted = True
            raise
        self._made += 1
        if self._made > 1:  # the first batch waits for the first shard's decode: not what a batch costs
            self._make_s = self._average(self._make_s, time.perf_counter() - started_s)
        return item

    def _produce(self) -> None:
        group: list[Any] = []
        try:
            target = 1
            while not self._stop.is_set():
                if self._inline:
                    target = 1  # the first group after a pause comes alone again
                    self._resume.wait(0.05)
                    continue
                with self._source_lock:
                    if self._exhausted:
                        return  # run dry by the consumer, which knows it
                    group_bytes, started_s = 0, time.monotonic()
                    while True:
                        try:
                            item = self._next_from_source()
                        except StopIteration:
                            if not group or self._put(group):
                                self._put(self._DONE)
                            return
                        group.append(item)
                        group_bytes += _tensor_bytes(item)
                        if (len(group) >= target or group_bytes >= self._GROUP_BYTES
                                or time.monotonic() - started_s >= self._GROUP_AGE_S or self._stop.is_set()):
                            break
                    batch_group, group = group, []
                    if not self._put(batch_group):
                        return
                target = min(2 * target, self._GROUP_MAX)
        except BaseException as exc:  # re-raised in the consumer (after the batches made before it)
            if not group or self._put(group):
                self._put(exc)
        finally:
            self._close_source()

    def _close_source(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            with self._source_lock:  # not while the consumer is advancing it
                close()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _take(self) -> list[Any] | None:
        """The next batches in order: a group from the queue, or one made here (inline); None at the end."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError(SUPERSEDED) from None
                # Ended in the thread: its end (or error) is on the way to the queue, after its last group.
                if self._inline and not self._exhausted and self._source_lock.acquire(blocking=False):
                    try:
                        # Else a group was queued, or the source ended, before the lock was let go: take that.
                        if self._queue.empty() and not self._exhausted:
                            try:
                                return [self._next_from_source()]
                            except StopIteration:
                                return None
                    finally:
                        self._source_lock.release()
                    continue
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    if not self._started:  # cannot happen: inline until started, and then the thread queues
                        raise RuntimeError("the loader's prefetch thread was never started; this is a bug")
                    if not self._thread.is_alive() and self._queue.empty():
                        raise RuntimeError("the loader's prefetch thread exited without a result; this is a bug")
                    continue
            if item is self._DONE:
                return None
            if isinstance(item, BaseException):
                raise item
            return item

    def __iter__(self) -> Iterator[Any]:
        while True:
            items = self._take()
            if items is None:
                return
            for item in items:
                handed_s = time.perf_counter()
                yield item
                self._away_s = self._average(self._away_s, time.perf_counter() - handed_s)
                if self._make_s is not None:
                    if not self._inline and self._away_s < self._INLINE_BELOW * self._make_s:
                        self._inline = True
                        self._resume.clear()
                    elif self._inline and self._away_s > self._THREAD_ABOVE * self._make_s:
                        self._start_thread()

    def close(self) -> None:
        """Stop reading ahead and wait until the thread has exited."""
        self._stop.set()
        self._resume.set()
        if not self._started or self._thread is threading.current_thread():
            if not self._started:
                self._close_source()
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
