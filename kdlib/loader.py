"""Streaming training loader over a teacher-logit cache: partitioned, shard-aware shuffled, resumable.

Shape notation::

    B  sequences per batch (per rank)   T  positions per sequence
    K  top-k entries per position       N  sequences in the cache
    W  world size (ranks)               S  sequences per shard

A batch is a ``dict`` of CPU tensors (compact until they reach the device; the loss widens them)::

    input_ids           [B, T]     int32    the tokens the teacher saw (feed these to the student)
    labels              [B, T]     int64    input_ids shifted left; labels[:, T-1] = ignore_index
    topk_ids            [B, T, K]  uint16 | int32
    topk_logprobs       [B, T, K]  float16 (as stored)
    lse                 [B, T]     float32  teacher full-vocab logsumexp
    lse_t{tau:g}        [B, T]     float32  one per build temperature
    sample_indices      [B]        int64    the cache sequence of each row (-1 for a padding row)
    teacher_vocab_size  []         int64    for ``check_alignment(..., student_vocab_size=...)``

Order, partition and resume (one definition, used by every rank and worker):

1. The epoch's global order is a function of ``(seed, epoch)`` only: shards are permuted, consecutive runs of
   ``shuffle_window_shards`` permuted shards form windows, and sequences are permuted inside each window. Reads
   stay inside a few shards at a time (each decoded once, then memory-mapped), yet every epoch differs.
2. ``cursor`` counts global samples consumed in the epoch. A global step takes the next ``W * B`` samples of
   the remaining order; rank r takes the r-th block of B (node → rank is implicit in the global rank).
3. Worker w of a rank's ``num_workers`` builds that rank's batches j with ``j % num_workers == w``; the loader
   re-orders worker output by j, so the batch sequence is identical for any number of workers.
4. ``state_dict()`` is ``{seed, epoch, cursor, ...}``; it does not mention ranks or workers, so a run resumed
   with another ``num_workers``, world size or batch size continues exactly at the cursor: no sample is
   repeated or skipped.

Remainder of an epoch (``R = remaining % (W * B)`` samples after the last full global step):
``drop_last=True`` (default) skips them for this epoch (the shuffle puts other samples there next epoch);
``drop_last=False`` splits them over the ranks as evenly as possible (sizes differ by at most one), so every
rank takes the same number of steps; a rank left with no sample (R < W) gets one padding row (a copy of a
real sequence with every label = ignore_index and ``sample_indices = -1``), which the loss ignores.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .alignment import DEFAULT_IGNORE_INDEX, shift_labels

__all__ = ["make_loader", "CacheLoader", "epoch_order", "RankPlan", "move_batch", "resolve_rank_world"]

STATE_VERSION = 1
_TEACHER_KEYS_WIDEN_ON_DEVICE = ("input_ids",)


# ----------------------------------------------------------------------------------------------- order


def epoch_order(
    num_sequences: int, shard_seqs: int, *, shuffle: bool, seed: int, epoch: int, shuffle_window_shards: int = 4,
) -> np.ndarray:
    """The epoch's global order of sequence indices [N] int64; a function of its arguments only.

    Args:
        num_sequences: N.
        shard_seqs: S, sequences per shard (the last shard may be shorter).
        shuffle: False gives ``0..N-1``.
        seed: base seed; the same (seed, epoch) gives the same order on every machine.
        epoch: epoch number (each epoch has its own permutation).
        shuffle_window_shards: shards whose sequences are mixed together; 1 only permutes shards and
            sequences within a shard; larger mixes more at the cost of more shards open at once.
    """
    if not shuffle:
        return np.arange(num_sequences, dtype=np.int64)
    if shuffle_window_shards < 1:
        raise ValueError(f"shuffle_window_shards must be >= 1, got {shuffle_window_shards}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(epoch)])
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
            from .reader import open_cache

            path, kwargs = self._spec
            self._cache = open_cache(path, **kwargs)
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        if self._spec is not None:
            return {"_spec": self._spec, "_cache": None}  # reopened lazily in the new process
        return {"_spec": None, "_cache": self._cache}  # must pickle itself (RemoteCache does)


def _local_spec(cache: Any) -> tuple[str, dict[str, Any]] | None:
    from .reader import LocalCache

    if isinstance(cache, LocalCache):
        return os.fspath(cache.path), {"decode_dir": cache.decode_dir.parent, "widen": cache.widen,
                                       "readahead": cache.readahead}
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
    batch["labels"] = shift_labels(batch["input_ids"], ignore_index)  # [B, T]
    batch["sample_indices"] = torch.from_numpy(np.array(indices, dtype=np.int64))  # [B]
    batch["teacher_vocab_size"] = torch.tensor(cache.vocab_size, dtype=torch.int64)
    return batch


def _padding_batch(cache, any_index: int, arrays, ignore_index: int) -> dict:
    batch = _read_batch(cache, np.array([any_index], dtype=np.int64), arrays, ignore_index)
    batch["labels"].fill_(ignore_index)
    batch["sample_indices"].fill_(-1)
    return batch


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

    def order(self) -> np.ndarray:
        full = epoch_order(self.num_sequences, self.shard_seqs, shuffle=self.shuffle, seed=self.seed,
                           epoch=self.epoch, shuffle_window_shards=self.window)
        return full[self.cursor:]

    def batches(self, cache, worker: int, num_workers: int) -> Iterator[tuple[int, dict]]:
        remaining = self.order()
        for j in range(worker, self.plan.num_batches, num_workers):
            start, stop = self.plan.batch_range(j)
            if stop > start:
                yield j, _read_batch(cache, remaining[start:stop], self.arrays, self.ignore_index)
            else:
                yield j, _padding_batch(cache, int(remaining[0]), self.arrays, self.ignore_index)


class _WorkerStream(torch.utils.data.IterableDataset):
    def __init__(self, cache_ref: _CacheRef, epoch_plan: _EpochPlan) -> None:
        self.cache_ref = cache_ref
        self.epoch_plan = epoch_plan

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.epoch_plan.batches(self.cache_ref.get(), worker, num_workers)


def _pin(batch: dict) -> dict:
    return {k: v.pin_memory() for k, v in batch.items()}


def move_batch(batch: Mapping[str, torch.Tensor], device: torch.device | str, *, non_blocking: bool = True,
               long_input_ids: bool = True) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device`` (asynchronously from pinned memory); widen ``input_ids`` there if asked.

    The top-k arrays stay compact (uint16/int32, fp16): the loss widens them on the device, where it is cheap.
    """
    device = torch.device(device)
    out = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=non_blocking)
        if long_input_ids and key in _TEACHER_KEYS_WIDEN_ON_DEVICE:
            value = value.to(torch.int64)
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- loader


class CacheLoader:
    """Iterable of cache batches for one rank; see the module docstring for order, partition and resume.

    Args:
        cache: a reader from ``kdlib.open_cache`` or a cache path/URL (then each process opens its own).
        batch_size: B, sequences per batch on this rank.
        shuffle: shard-aware shuffle (False reads 0..N-1 in order).
        seed: shuffle seed; the epoch's order depends on (seed, epoch) only.
        rank, world_size: this process's place; default from torch.distributed, else RANK/WORLD_SIZE.
        num_workers: DataLoader worker processes (0 reads in a background thread of this process).
        drop_last: what happens to an epoch's remainder (module docstring).
        prefetch: batches read ahead per worker (or by the background thread when num_workers=0; 0 = none).
        pin_memory: page-locked batches for asynchronous host→GPU copies (default: when CUDA is available).
        device: move every batch there (``non_blocking`` from pinned memory) and widen ``input_ids`` to
            int64; None leaves batches on the CPU. ``"cuda"`` picks ``cuda:$LOCAL_RANK``.
        shuffle_window_shards: shards whose sequences are mixed together per window.
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
        arrays: Sequence[str] | None = None,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        multiprocessing_context: str | None = None,
        open_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_workers < 0 or prefetch < 0:
            raise ValueError(f"num_workers and prefetch must be >= 0, got {num_workers}, {prefetch}")
        if shuffle_window_shards < 1:
            raise ValueError(f"shuffle_window_shards must be >= 1, got {shuffle_window_shards}")
        self._cache_ref = _CacheRef(cache, open_kwargs)
        self.cache = self._cache_ref.get()
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.device = _resolve_device(device)
        self.shuffle_window_shards = int(shuffle_window_shards)
        self.arrays = tuple(arrays) if arrays is not None else None
        self.ignore_index = int(ignore_index)
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.cursor = 0  # global samples consumed in self.epoch (all ranks together)
        if self._rank_plan().num_batches == 0:
            raise ValueError(
                f"the cache has {self.num_sequences} sequences, fewer than one global batch of "
                f"{self.world_size} ranks x {batch_size}, so drop_last=True leaves nothing to train on; use a "
                "smaller batch_size or drop_last=False")

    # -------------------------------------------------------------- state

    @property
    def num_sequences(self) -> int:
        return self.cache.num_sequences

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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at a saved position. The state's seed/shuffle settings win: they define the order."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}; it was "
                             "written by another kdlib version")
        if int(state["num_sequences"]) != self.num_sequences:
            raise ValueError(
                f"the loader state is for a cache of {state['num_sequences']} sequences but this cache has "
                f"{self.num_sequences}: resume with the same cache (or start a fresh loader)")
        cursor = int(state["cursor"])
        if not 0 <= cursor <= self.num_sequences:
            raise ValueError(f"loader state cursor {cursor} outside [0, {self.num_sequences}]")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.shuffle_window_shards = int(state["shuffle_window_shards"])
        self.epoch = int(state["epoch"])
        self.cursor = cursor

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (like ``DistributedSampler.set_epoch``)."""
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
        return _EpochPlan(self.num_sequences, self.cache.shard_seqs, self.shuffle, self.seed, self.epoch,
                          self.shuffle_window_shards, self.cursor, self._rank_plan(), self.arrays,
                          self.ignore_index)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._roll_epoch_if_done()
        epoch_plan = self._epoch_plan()
        start_epoch, start_cursor = self.epoch, self.cursor
        if self.num_workers > 0:
            source = self._worker_batches(epoch_plan)
        elif self.prefetch > 0:
            source = self._threaded_batches(epoch_plan)
        else:
            source = self._inline_batches(epoch_plan)
        try:
            for j, batch in _in_order(source):
                if self.device is not None:
                    batch = move_batch(batch, self.device, non_blocking=self.pin_memory)
                # Counted as consumed when handed over: a checkpoint taken after training on it resumes after it.
                self.epoch, self.cursor = start_epoch, start_cursor + epoch_plan.plan.consumed_after(j)
                yield batch
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        self._roll_epoch_if_done()

    def _inline_batches(self, epoch_plan: _EpochPlan) -> Iterator[tuple[int, dict]]:
        for j, batch in epoch_plan.batches(self._cache_ref.get(), 0, 1):
            yield j, (_pin(batch) if self.pin_memory else batch)

    def _threaded_batches(self, epoch_plan: _EpochPlan) -> Iterator[tuple[int, dict]]:
        """Read ``prefetch`` batches ahead in a daemon thread (decoding and page faults overlap the step)."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for item in self._inline_batches(epoch_plan):
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                item = done
            except BaseException as exc:  # re-raised in the consumer with its traceback
                item = exc
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        thread = threading.Thread(target=produce, name="kdcache-loader-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def _worker_batches(self, epoch_plan: _EpochPlan) -> Iterator[tuple[int, dict]]:
        workers = min(self.num_workers, max(epoch_plan.plan.num_batches, 1))
        loader = torch.utils.data.DataLoader(
            _WorkerStream(self._cache_ref, epoch_plan),
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=max(self.prefetch, 1),
            multiprocessing_context=self.multiprocessing_context,
        )
        yield from loader

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(cache={self.cache!r}, batch_size={self.batch_size}, rank={self.rank}/"
                f"{self.world_size}, num_workers={self.num_workers}, shuffle={self.shuffle}, seed={self.seed}, "
                f"epoch={self.epoch}, cursor={self.cursor})")


def _in_order(source: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """Yield items by consecutive batch number whatever order workers deliver them in."""
    pending: dict[int, dict] = {}
    expected = 0
    for j, batch in source:
        pending[j] = batch
        while expected in pending:
            yield expected, pending.pop(expected)
            expected += 1
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

        loader = kdlib.make_loader("cache_dir", batch_size=8, seed=0, num_workers=2, device="cuda")
        for batch in loader:
            logits = student(batch["input_ids"]).logits          # [B, T, V]
            loss = kdlib.kd_loss_from_batch(logits, batch, ce_weight=0.1)
    """
    return CacheLoader(cache, batch_size, **kwargs)
