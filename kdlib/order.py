"""The loader's order arithmetic: epoch order, rank plan, worker split, cursor, shard look-ahead. Pure numpy.

Shape notation::

    N  sequences in the cache      S  sequences per shard
    B  sequences per batch (per rank)   W  world size (ranks)
    L  sequences one epoch reads: N, or a :class:`Selection`'s length (a subset's size, weighted draws)

One definition, used by every rank and worker (no torch, no I/O: each function is a function of its arguments):

1. The epoch's global order is a function of ``(seed, epoch)`` only (:func:`epoch_order`): shards are
   permuted, consecutive runs of ``shuffle_window_shards`` permuted shards form windows, and sequences are
   permuted inside each window. Reads stay inside a few shards at a time, yet every epoch differs.
2. ``cursor`` counts global samples consumed in the epoch. A global step takes the next ``W * B`` samples of
   the remaining order ``order[cursor:]``; rank r takes the r-th block of B (:class:`RankPlan`; node → rank is
   implicit in the global rank).
3. Worker w of a rank's ``num_workers`` builds that rank's batches j with ``j % num_workers == w``
   (:meth:`RankPlan.worker_batches`); the loader re-orders worker output by j, so the batch sequence is
   identical for any number of workers.
4. After batch j the cursor is ``cursor + consumed_after(j)``; an epoch whose rank plan has no batch left is
   over (:func:`roll_epoch`).
5. A :class:`Selection` replaces the epoch's order by one of length L (a subset of the sequences, or weighted
   draws with replacement), still a function of ``(seed, epoch)``; steps 2-4 are unchanged over it.

Remainder of an epoch (``R = remaining % (W * B)`` samples after the last full global step):
``drop_last=True`` skips them for this epoch (the shuffle puts other samples there next epoch);
``drop_last=False`` splits them over the ranks as evenly as possible (sizes differ by at most one), so every
rank takes the same number of steps; a rank left with no sample (R < W) gets an empty range, which the loader
fills with one padding row (``kdlib.batch.padding_batch``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import numpy as np

__all__ = ["epoch_order", "seed64", "check_subset", "check_weights", "Selection", "RankPlan", "EpochPlan",
           "ShardLookahead", "roll_epoch", "resolve_rank_world"]

_U64 = (1 << 64) - 1


def seed64(seed: int) -> int:
    """The seed as an unsigned 64-bit integer (a negative seed as its two's complement).

    Raises:
        ValueError: not an integer in [-2**63, 2**64).
    """
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be an integer, got {seed!r}") from None
    if not -(1 << 63) <= value <= _U64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64) (a 64-bit seed), got {value}")
    return value & _U64


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
    seed_u64 = seed64(seed)
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    rng = np.random.default_rng([seed_u64 & 0xFFFFFFFF, seed_u64 >> 32, int(epoch)])
    return _windowed_order(rng, num_sequences, shard_seqs, shuffle_window_shards, None)


def _windowed_order(rng: np.random.Generator, num_sequences: int, shard_seqs: int, window: int,
                    counts: np.ndarray | None) -> np.ndarray:
    """Shards permuted, runs of ``window`` shards mixed: [sum(counts)] int64 (each i ``counts[i]`` times).

    ``counts`` None means once each (the plain epoch order); the rng's calls are the same either way.
    """
    num_shards = -(-num_sequences // shard_seqs)
    shard_perm = rng.permutation(num_shards)
    order = np.empty(num_sequences if counts is None else int(counts.sum()), dtype=np.int64)
    filled = 0
    for w in range(0, num_shards, window):
        parts = [np.arange(s * shard_seqs, min((s + 1) * shard_seqs, num_sequences)) for s in
                 shard_perm[w: w + window]]
        members = np.concatenate(parts)
        if counts is not None:
            members = np.repeat(members, counts[members])
        order[filled: filled + members.size] = rng.permutation(members)
        filled += members.size
    return order


_WEIGHTED_DRAWS = 0x5E1EC7  # a separate random stream for weighted draws: not the plain epoch order's


def check_subset(indices: Any, num_sequences: int) -> np.ndarray:
    """``indices`` as a sorted [L] int64 array of distinct sequence numbers in [0, N), or a ValueError saying why.

    Raises:
        ValueError: not a 1-D array of integers, empty, an index outside [0, N), or an index given twice.
    """
    arr = np.asarray(indices)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"subset must be a non-empty 1-D sequence of sequence indices, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "b":
            raise ValueError("subset must hold sequence indices, got booleans: pass np.flatnonzero(mask)")
        raise ValueError(f"subset must hold integer sequence indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= num_sequences)]
    if bad.size:
        raise ValueError(f"subset has {bad.size} index(es) outside [0, {num_sequences}) (the cache's sequences), "
                         f"e.g. {bad[:5].tolist()}")
    arr = np.sort(arr)
    repeated = np.unique(arr[1:][arr[1:] == arr[:-1]])
    if repeated.size:
        raise ValueError(f"subset has {repeated.size} index(es) given more than once, e.g. {repeated[:5].tolist()}: "
                         "a subset takes each sequence once per epoch; to repeat sequences pass per-sequence "
                         "weights= instead (e.g. bagging counts)")
    return arr


def check_weights(weights: Any, num_sequences: int) -> np.ndarray:
    """``weights`` as a [N] float64 array of finite, non-negative values, not all zero, or a ValueError.

    Raises:
        ValueError: not one weight per sequence, a NaN/inf, a negative weight, or every weight zero.
    """
    arr = np.asarray(weights)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"weights must be numbers (one per sequence), got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.shape != (num_sequences,):
        raise ValueError(f"weights must have one entry per cache sequence, shape ({num_sequences},), got {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))
        raise ValueError(f"weights has {bad.size} NaN/inf value(s), e.g. at sequences {bad[:5].tolist()}")
    if (arr < 0).any():
        bad = np.flatnonzero(arr < 0)
        raise ValueError(f"weights has {bad.size} negative value(s), e.g. at sequences {bad[:5].tolist()}; a "
                         "sampling weight is >= 0 (0 = never drawn)")
    if not (arr > 0).any():
        raise ValueError("every weight is 0, so no sequence can be drawn: give some sequence a positive weight")
    return arr


@dataclass(frozen=True, eq=False)
class Selection:
    """Which sequences an epoch reads: a fixed subset (each once), or weighted draws with replacement.

    Picklable and pure: the epoch's order is a function of ``(seed, epoch)`` and this object only, like the full
    order. Make one with :meth:`subset` or :meth:`weighted`.

    * subset: the epoch order is the full :func:`epoch_order` restricted to the subset (same shard windows,
      the subset's members in the order the full epoch would read them); ``shuffle=False`` reads them ascending.
    * weighted: each epoch draws ``num_samples`` sequences with replacement, sequence i with probability
      ``weights[i] / sum(weights)`` (its own random stream of ``(seed, epoch)``), then shuffles the draws with
      the same shard windows as :func:`epoch_order` (repeats of a sequence spread over its window).
    """

    kind: str
    values: np.ndarray  # subset: sorted distinct [L] int64; weighted: [N] float64
    num_sequences: int
    num_samples: int

    @classmethod
    def subset(cls, indices: Any, num_sequences: int) -> "Selection":
        arr = check_subset(indices, num_sequences)
        return cls("subset", arr, int(num_sequences), int(arr.size))

    @classmethod
    def weighted(cls, weights: Any, num_sequences: int, num_samples: int | None = None) -> "Selection":
        arr = check_weights(weights, num_sequences)
        draws = num_sequences if num_samples is None else num_samples
        if not isinstance(draws, (int, np.integer)) or isinstance(draws, bool) or draws < 1:
            raise ValueError(f"num_samples (draws per epoch) must be a positive integer, got {num_samples!r}")
        return cls("weighted", arr, int(num_sequences), int(draws))

    @property
    def epoch_length(self) -> int:
        """Sequences one epoch reads (all ranks together), before a dropped remainder."""
        return self.num_samples

    @cached_property
    def _digest(self) -> str:  # once per selection: a checkpoint's state_dict() need not hash N weights again
        return hashlib.blake2b(np.ascontiguousarray(self.values).tobytes(), digest_size=16).hexdigest()

    def identity(self) -> dict[str, Any]:
        """What a saved cursor into this selection's order means (kept in the loader's state)."""
        return {"kind": self.kind, "epoch_length": self.epoch_length, "digest": self._digest}

    def _rng(self, seed: int, epoch: int) -> np.random.Generator:
        seed_u64 = seed64(seed)
        return np.random.default_rng([seed_u64 & 0xFFFFFFFF, seed_u64 >> 32, int(epoch), _WEIGHTED_DRAWS])

    def epoch_counts(self, seed: int, epoch: int) -> np.ndarray:
        """Times each sequence is read in the epoch, [N] int64 (a subset: 0 or 1)."""
        if self.kind == "subset":
            counts = np.zeros(self.num_sequences, dtype=np.int64)
            counts[self.values] = 1
            return counts
        return self._draw(self._rng(seed, epoch))

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        cdf = np.cumsum(self.values)
        picks = np.searchsorted(cdf, rng.random(self.num_samples) * cdf[-1], side="right")
        # u * total may round up to total: such a pick is the last sequence with a positive weight.
        picks = np.minimum(picks, int(np.flatnonzero(self.values > 0)[-1]))
        return np.bincount(picks, minlength=self.num_sequences).astype(np.int64)

    def epoch_order(self, shard_seqs: int, *, shuffle: bool, seed: int, epoch: int,
                    shuffle_window_shards: int = 4) -> np.ndarray:
        """The epoch's order [epoch_length] int64 of sequence indices (see the class docstring)."""
        if self.kind == "subset":
            full = epoch_order(self.num_sequences, shard_seqs, shuffle=shuffle, seed=seed, epoch=epoch,
                               shuffle_window_shards=shuffle_window_shards)
            member = np.zeros(self.num_sequences, dtype=bool)
            member[self.values] = True
            return full[member[full]]
        if shuffle_window_shards < 1:
            raise ValueError(f"shuffle_window_shards must be >= 1, got {shuffle_window_shards}")
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        rng = self._rng(seed, epoch)
        counts = self._draw(rng)
        if not shuffle:
            return np.repeat(np.arange(self.num_sequences, dtype=np.int64), counts)
        return _windowed_order(rng, self.num_sequences, shard_seqs, shuffle_window_shards, counts)


@dataclass(frozen=True)
class RankPlan:
    """Which part of the remaining epoch order one rank reads, batch by batch.

    Offsets are into ``order[cursor:]`` (the remaining order). Batch j of the rank covers
    ``[start, stop)`` of it (empty for a padding batch); after the global step of batch j,
    ``consumed_after(j)`` samples are consumed globally (all ranks together).
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
        """``[start, stop)`` of batch j in the remaining order."""
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
        """Global samples consumed (from the cursor on) once every rank has taken its batch j."""
        return (j + 1) * self.global_step if j < self.full_steps else self.remaining

    def worker_batches(self, worker: int, num_workers: int) -> range:
        """The batch numbers worker ``worker`` of ``num_workers`` builds (``j % num_workers == worker``)."""
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ValueError(f"need 0 <= worker < num_workers, got worker={worker}, num_workers={num_workers}")
        return range(worker, self.num_batches, num_workers)


def roll_epoch(epoch: int, cursor: int, num_sequences: int, batch_size: int, world_size: int,
               drop_last: bool) -> tuple[int, int]:
    """``(epoch, cursor)``, or ``(epoch + 1, 0)`` when a started epoch has no batch left for the ranks."""
    remaining = RankPlan(num_sequences - cursor, batch_size, world_size, 0, drop_last)
    if cursor > 0 and remaining.num_batches == 0:
        return epoch + 1, 0
    return epoch, cursor


@dataclass(frozen=True)
class EpochPlan:
    """Everything a producer (thread or worker process) needs to make its batches of one pass (picklable)."""

    num_sequences: int
    shard_seqs: int
    shuffle: bool
    seed: int
    epoch: int
    window: int
    cursor: int
    plan: RankPlan
    lookahead_seqs: int = 0
    selection: Selection | None = None  # None: every sequence once (the plain epoch order)

    def remaining_order(self) -> np.ndarray:
        """``order[cursor:]`` [L - cursor] int64: what the rank plan's offsets index (L = the epoch's length)."""
        if self.selection is not None:
            full = self.selection.epoch_order(self.shard_seqs, shuffle=self.shuffle, seed=self.seed,
                                              epoch=self.epoch, shuffle_window_shards=self.window)
        else:
            full = epoch_order(self.num_sequences, self.shard_seqs, shuffle=self.shuffle, seed=self.seed,
                               epoch=self.epoch, shuffle_window_shards=self.window)
        return full[self.cursor:]


class ShardLookahead:
    """Which shards to fetch and decode in the background before each batch of a rank is read.

    Before batch j is read, every shard of the rank's batches that start less than ``lookahead_seqs`` positions
    after batch j's end is due, each shard once per pass. With ``lookahead_seqs`` = one shuffle window, the
    whole next window is requested while the current one is read. Worker w of n is given only the shards with
    ``shard % n == w``: the workers share the decoded-shard directory, so each upcoming shard is fetched and
    decoded once, not once per worker.
    """

    def __init__(self, remaining: np.ndarray, plan: RankPlan, shard_seqs: int, worker: int, num_workers: int,
                 lookahead_seqs: int) -> None:
        self.remaining = remaining
        self.plan = plan
        self.shard_seqs = int(shard_seqs)
        self.worker = worker
        self.num_workers = num_workers
        self.lookahead_seqs = int(lookahead_seqs)
        self.next_j = 0  # the rank's first batch not looked at yet
        self.requested: set[int] = set()

    def due_before(self, j: int) -> list[int]:
        """Shards not requested yet that batch j (about to be read) or the next ``lookahead_seqs`` need."""
        if self.lookahead_seqs <= 0:
            return []
        self.next_j = max(self.next_j, j + 1)
        horizon = self.plan.batch_range(j)[1] + self.lookahead_seqs
        due: list[int] = []
        while self.next_j < self.plan.num_batches:
            start, stop = self.plan.batch_range(self.next_j)
            if start >= horizon:
                break
            for shard in np.unique(self.remaining[start:stop] // self.shard_seqs).tolist():
                if shard % self.num_workers == self.worker and shard not in self.requested:
                    self.requested.add(shard)
                    due.append(int(shard))
            self.next_j += 1
        return due


def _distributed_group() -> object | None:
    """``torch.distributed`` if torch is already imported and a process group is initialized, else None.

    Not importing torch keeps this module pure: a process that never imported torch has no group either.
    """
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def resolve_rank_world(rank: int | None, world_size: int | None,
                       environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Explicit arguments, else an initialized ``torch.distributed`` group, else ``RANK``/``WORLD_SIZE``.

    Args:
        rank, world_size: this process's place, or None to find it.
        environ: the environment to read (default ``os.environ``).

    Raises:
        ValueError: not ``0 <= rank < world_size``.
    """
    environ = os.environ if environ is None else environ
    dist = _distributed_group()
    if world_size is None:
        world_size = dist.get_world_size() if dist is not None else int(environ.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = dist.get_rank() if dist is not None else int(environ.get("RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size} (from "
                         "arguments, torch.distributed, or the RANK/WORLD_SIZE environment variables)")
    return int(rank), int(world_size)
