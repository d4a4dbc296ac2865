"""Streaming training loader over a teacher-logit cache: partitioned, shard-aware shuffled, resumable.

Shape notation::

    B  sequences per batch (per rank)   T  positions per sequence
    K  top-k entries per position       N  sequences in the cache
    W  world size (ranks)               S  sequences per shard

A batch is a ``dict`` of CPU tensors, made by ``kdlib.batch.read_batch`` (its module docstring has the
layout: ``input_ids`` [B, T] int32, ``labels`` [B, T] int64, ``topk_ids`` [B, T, K] int32, ``topk_logprobs``
[B, T, K] float16, ``lse`` / ``lse_t{tau:g}`` [B, T] float32, ``sample_indices`` [B] int64,
``teacher_vocab_size`` [] int64). Every cached top-k id is checked against the teacher's vocabulary on the
CPU when the batch is made, so the vocabulary check of a training step needs no device sync.

Order, partition and resume are the arithmetic of ``kdlib.order`` (one definition, used by every rank and
worker): the epoch's order is a function of ``(seed, epoch)`` only (shards permuted, sequences mixed within
windows of ``shuffle_window_shards`` shards); ``cursor`` counts global samples consumed in the epoch; rank r
takes the r-th block of B of each global step of ``W * B``; worker w builds the rank's batches
``j % num_workers == w`` and the loader re-orders them, so the batch sequence is the same for any number of
workers.

``state_dict()`` is ``{seed, epoch, cursor, cache identity, ...}``; it does not mention ranks or workers, so a
run resumed with another ``num_workers``, world size or batch size continues exactly at the cursor: no sample
is repeated or skipped. Resuming on another cache (other sequences, or the same ones sharded differently,
which changes the order) is refused.

Subsets and weights (``subset=`` indices, or ``weights=`` per-sequence sampling weights with ``num_samples=``
draws per epoch): the epoch's order becomes that of a ``kdlib.order.Selection`` of length L, still a function of
``(seed, epoch)``, and everything above (partition, remainder, cursor, resume) works on it unchanged; the state
then names the selection, and resuming with another one is refused. ``kdlib.selection`` makes such subsets
(hardest sequences by student-vs-teacher KL, bags, clusters, difference sampling).

Because the order is known in advance, the shards of the next ``prefetch_windows`` shuffle window(s) this rank
will read are fetched (remote) and decoded in the background while the current window is consumed
(``cache.prefetch_shards``; split among the workers, which share the decoded-shard directory), so a cold or
remote cache does not stall at window boundaries.

Remainder of an epoch (``R = remaining % (W * B)`` samples after the last full global step):
``drop_last=True`` (default) skips them for this epoch (the shuffle puts other samples there next epoch);
``drop_last=False`` splits them over the ranks as evenly as possible (sizes differ by at most one), so every
rank takes the same number of steps; a rank left with no sample (R < W) gets one padding row (a copy of a
real sequence with every label = ignore_index and ``sample_indices = -1``), which the loss ignores.

Workers: prefer ``num_workers=0`` (the default) for a local cache whose shards are decoded (after the first
epoch, or ``cache.prepare()``): a batch is then a few memory-map slices, cheaper to make than to send from a
worker process (pickled into shared memory, through a queue), and the background thread already overlaps it
with the step. Workers pay when making a batch is heavy CPU work: a cold cache whose shards are decoded during
the epoch, a remote cache (whose shards are fetched, hashed and decoded the same way), or transforms of your
own. ``benchmarks/loader_throughput.py`` measures both cases; its results are in ``benchmarks/results``.

Producers (this thread, a background thread, worker processes) live in ``kdlib.producers``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .batch import DEFAULT_IGNORE_INDEX, KEEP_ON_CPU, move_batch
from .order import EpochPlan, RankPlan, Selection, epoch_order, resolve_rank_world, roll_epoch, seed64
from .producers import (SUPERSEDED, Iteration, WorkerStream, epoch_batches, in_order, pinned, threaded_batches,
                        worker_batches)

__all__ = ["make_loader", "CacheLoader", "epoch_order", "RankPlan", "move_batch", "resolve_rank_world",
           "resolve_device", "KEEP_ON_CPU"]

STATE_VERSION = 2  # 2 added the cache identity; version-1 states still load (without that check)


def resolve_device(device: torch.device | str | None) -> torch.device | None:
    """The device batches go to, checked now: ``"cuda"`` means ``cuda:$LOCAL_RANK``.

    Raises:
        ValueError: the device is not a device name, or is not available in this process (CUDA or MPS missing,
            a CUDA index beyond the visible devices), with how to fix it.
    """
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({exc}); pass e.g. 'cuda', 'cuda:1', 'cpu' or "
                         "None (batches stay on the CPU)") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type in ("cpu", "meta"):
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is not None and not is_available():
        raise ValueError(
            f"make_loader(device={str(device)!r}): {device.type.upper()} is not available in this process "
            f"(torch.{'backends.mps' if device.type == 'mps' else device.type}.is_available() is False: no such "
            "device visible, or a torch build without it). Pass device=None to keep batches on the CPU, or "
            "device='cpu'; on a GPU machine check CUDA_VISIBLE_DEVICES and the torch build")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(
            f"make_loader(device={str(device)!r}): only {count()} {device.type} device(s) are visible here "
            f"(indices 0..{count() - 1}); pass an index below that (with device='{device.type}' the index is "
            "LOCAL_RANK, so check that LOCAL_RANK and CUDA_VISIBLE_DEVICES agree)")
    return device


def _selection(subset: Any, weights: Any, num_samples: int | None, num_sequences: int) -> Selection | None:
    """The loader's :class:`~kdlib.order.Selection` (None: every sequence once per epoch), checked now."""
    if subset is not None and weights is not None:
        raise ValueError("pass subset= or weights=, not both (a subset with weights: weights that are 0 outside "
                         "the subset)")
    if num_samples is not None and weights is None:
        raise ValueError("num_samples= (draws per epoch) needs weights=; a subset's epoch is the subset")
    if subset is not None:
        return Selection.subset(subset, num_sequences)
    if weights is not None:
        return Selection.weighted(weights, num_sequences, num_samples)
    return None


def _open(cache: Any, open_kwargs: Mapping[str, Any] | None) -> Any:
    """A path/URL opened with ``open_kwargs``; an open cache as is (workers get it by pickling)."""
    from .data.open import as_cache  # lazy: the HTTP client is imported only for a URL's sake

    return as_cache(cache, open_kwargs)


class CacheLoader:
    """Iterable of cache batches for one rank; see the module docstring for order, partition and resume.

    For a decoded local cache keep ``num_workers=0`` (the default): batches are memory-map slices read by a
    background thread, and worker processes only add inter-process copies. Workers pay for a cold or remote
    cache, whose shards are decoded (fetched) while the epoch runs, or for heavy transforms of your own (module
    docstring, "Workers").

    One loop at a time: a new ``iter(loader)`` stops the previous iteration's producer (waiting for it), and the
    previous iterator raises if used again. Breaking out of a loop stops the producer before the next statement.

    Args:
        cache: a reader from ``kdlib.open_cache`` or a cache path/URL (opened here with ``open_kwargs``).
        batch_size: B, sequences per batch on this rank.
        shuffle: shard-aware shuffle (False reads 0..N-1 in order).
        seed: shuffle seed, any integer in [-2**63, 2**64); the epoch's order depends on (seed, epoch) only.
        rank, world_size: this process's place; default from torch.distributed, else RANK/WORLD_SIZE.
        num_workers: DataLoader worker processes (0 reads in a background thread of this process; see above).
        drop_last: what happens to an epoch's remainder (module docstring).
        prefetch: batches read ahead per worker; with num_workers=0, hand-offs of the background thread, each
            a group of batches up to 4 MB of tensors (``kdlib.producers.PrefetchThread``, which makes batches in
            this thread instead while the loop comes back sooner than half a batch's making time); 0 = none
            (inline).
        pin_memory: page-locked batches for asynchronous host→GPU copies (default: when CUDA is available;
            requesting it without CUDA warns and reads unpinned batches).
        device: move every batch there (``non_blocking`` from pinned memory) and widen ``input_ids`` to
            int64; None leaves batches on the CPU. ``"cuda"`` picks ``cuda:$LOCAL_RANK``. A device that is not
            available here raises ValueError at construction. ``sample_indices`` and ``teacher_vocab_size``
            stay on the CPU (``move_batch``).
        shuffle_window_shards: shards whose sequences are mixed together per window.
        prefetch_windows: shuffle windows of upcoming shards fetched and decoded in the background ahead of the
            reads (0 disables). The decoded-shard size limit (``max_decoded_bytes``)
            should hold ``1 + prefetch_windows`` windows of shards, or prefetched shards are evicted before use.
        arrays: per-position arrays to read (default all; ``input_ids`` is required).
        ignore_index: label of positions without a next token.
        multiprocessing_context: e.g. ``"spawn"``/``"forkserver"`` for workers (default: the platform's).
        open_kwargs: keyword arguments for ``open_cache`` when ``cache`` is a path/URL.
        subset: read only these sequences (distinct indices in [0, N)), each once per epoch, in the order the
            full epoch would read them (``kdlib.order.Selection``); e.g. ``kdlib.selection.hardest(scores)``.
        weights: per-sequence sampling weights [N] (>= 0, not all 0): each epoch draws ``num_samples``
            sequences with replacement, sequence i with probability ``weights[i] / sum(weights)``, seeded by
            (seed, epoch). Not together with ``subset``.
        num_samples: draws per epoch with ``weights`` (default N).
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
        subset: Sequence[int] | np.ndarray | None = None,
        weights: Sequence[float] | np.ndarray | None = None,
        num_samples: int | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_workers < 0 or prefetch < 0 or prefetch_windows < 0:
            raise ValueError(f"num_workers, prefetch and prefetch_windows must be >= 0, got {num_workers}, "
                             f"{prefetch}, {prefetch_windows}")
        if shuffle_window_shards < 1:
            raise ValueError(f"shuffle_window_shards must be >= 1, got {shuffle_window_shards}")
        if arrays is not None and "input_ids" not in arrays:
            raise ValueError(f"the loader needs 'input_ids' among arrays= (labels and alignment checks use them), "
                             f"got {list(arrays)}")
        seed64(seed)  # a clear error now rather than at the first iter()
        self.device = resolve_device(device)  # likewise: an unavailable device fails here, not at batch one
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self.cache = _open(cache, open_kwargs)
        self.selection = _selection(subset, weights, num_samples, self.cache.num_sequences)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        cuda = torch.cuda.is_available()
        if pin_memory and not cuda:
            warnings.warn("CacheLoader(pin_memory=True) needs CUDA, which is not available here: batches are not "
                          "pinned", UserWarning, stacklevel=2)
        self.pin_memory = cuda if pin_memory is None else bool(pin_memory) and cuda
        self.shuffle_window_shards = int(shuffle_window_shards)
        self.prefetch_windows = int(prefetch_windows)
        self.arrays = tuple(arrays) if arrays is not None else None
        self.ignore_index = int(ignore_index)
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.cursor = 0  # global samples consumed in self.epoch (all ranks together)
        self._active: Iteration | None = None
        if self._rank_plan().num_batches == 0:
            raise ValueError(
                f"the {'cache' if self.selection is None else 'selection'} has {self.epoch_length} sequences per epoch, "
                "fewer than one global batch of "
                f"{self.world_size} ranks x {batch_size}, so drop_last=True leaves nothing to train on; use a "
                "smaller batch_size or drop_last=False")

    # -------------------------------------------------------------- state

    @property
    def num_sequences(self) -> int:
        return self.cache.num_sequences

    @property
    def epoch_length(self) -> int:
        """Sequences one epoch reads, all ranks together (N; a subset's size; ``num_samples`` with weights)."""
        return self.num_sequences if self.selection is None else self.selection.epoch_length

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
        """Position in the global order; identical on every rank, independent of workers/world size.

        With a subset or weights it also holds ``"selection"`` (kind, epoch length, a digest of the indices or
        weights): the cursor indexes that selection's order.
        """
        state = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "shuffle": self.shuffle,
            "shuffle_window_shards": self.shuffle_window_shards,
            "num_sequences": self.num_sequences,
            "cache": self.cache_identity(),
        }
        if self.selection is not None:
            state["selection"] = self.selection.identity()
        return state

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
        self._check_saved_identity(state.get("cache"))
        self._check_saved_selection(state.get("selection"))
        cursor = int(state["cursor"])
        if not 0 <= cursor <= self.epoch_length:
            raise ValueError(f"loader state cursor {cursor} outside [0, {self.epoch_length}]")
        seed64(state["seed"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.shuffle_window_shards = int(state["shuffle_window_shards"])
        self.epoch = int(state["epoch"])
        self.cursor = cursor

    def _check_saved_identity(self, saved: Mapping[str, Any] | None) -> None:
        if saved is None:
            warnings.warn("this loader state predates cache identities (version 1): only the number of sequences "
                          "could be checked against this cache", UserWarning, stacklevel=3)
            return
        saved, mine = dict(saved), self.cache_identity()
        differs = [f"{key} {saved.get(key)!r} (saved) vs {mine[key]!r} (this cache)" for key in mine
                   if saved.get(key) != mine[key]]
        if differs:
            raise ValueError(
                "the loader state was saved on another cache: " + "; ".join(differs) + ". The saved cursor "
                "indexes that cache's order (its sequences and sharding), so it would repeat or skip samples "
                "here: resume with the cache the state was saved on, or start a fresh loader")

    def _check_saved_selection(self, saved: Mapping[str, Any] | None) -> None:
        mine = None if self.selection is None else self.selection.identity()
        if (dict(saved) if saved is not None else None) != mine:
            def describe(sel: Mapping[str, Any] | None) -> str:
                return "all sequences" if sel is None else f"{sel['kind']} of {sel['epoch_length']} ({sel['digest']})"

            raise ValueError(
                f"the loader state was saved with another selection ({describe(saved)}) than this loader's "
                f"({describe(mine)}): its cursor indexes that selection's order. Pass the same subset=/weights=/"
                "num_samples= as the saved run, or start a fresh loader")

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (like ``DistributedSampler.set_epoch``)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.cursor = 0

    def _rank_plan(self) -> RankPlan:
        return RankPlan(self.epoch_length - self.cursor, self.batch_size, self.world_size, self.rank,
                        self.drop_last)

    def _roll_epoch_if_done(self) -> None:
        self.epoch, self.cursor = roll_epoch(self.epoch, self.cursor, self.epoch_length, self.batch_size,
                                             self.world_size, self.drop_last)

    def __len__(self) -> int:
        """Batches the next ``iter()`` yields on this rank (the rest of the current epoch)."""
        self._roll_epoch_if_done()
        return self._rank_plan().num_batches

    # -------------------------------------------------------------- iteration

    def _epoch_plan(self) -> EpochPlan:
        lookahead_seqs = self.prefetch_windows * self.shuffle_window_shards * self.cache.shard_seqs
        return EpochPlan(self.num_sequences, self.cache.shard_seqs, self.shuffle, self.seed, self.epoch,
                         self.shuffle_window_shards, self.cursor, self._rank_plan(), lookahead_seqs, self.selection)

    def close(self) -> None:
        """Stop the current iteration's producer (thread or workers) and wait for it; iterating again restarts."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.close()  # one producer per loader: a previous loop's is stopped (and waited for) first
        iteration = Iteration()
        self._active = iteration
        self._roll_epoch_if_done()
        epoch_plan = self._epoch_plan()
        start_epoch, start_cursor = self.epoch, self.cursor
        source = self._producer(epoch_plan, iteration)
        try:
            for j, batch in in_order(source):
                if self.device is not None:
                    batch = move_batch(batch, self.device, non_blocking=self.pin_memory)
                # Counted as consumed when handed over: a checkpoint taken after training on it resumes after it.
                self.epoch, self.cursor = start_epoch, start_cursor + epoch_plan.plan.consumed_after(j)
                yield batch
                if iteration.closed:
                    raise RuntimeError(SUPERSEDED)
        finally:
            iteration.close()
            if self._active is iteration:
                self._active = None
            source.close()
        self._roll_epoch_if_done()

    def _producer(self, epoch_plan: EpochPlan, iteration: Iteration) -> Iterator[tuple[int, Any]]:
        """Worker processes, a background thread, or this thread, per ``num_workers`` and ``prefetch``."""
        if self.num_workers > 0:
            stream = WorkerStream(self.cache, epoch_plan, self.arrays, self.ignore_index)
            return worker_batches(stream, min(self.num_workers, max(epoch_plan.plan.num_batches, 1)),
                                  prefetch=self.prefetch, pin_memory=self.pin_memory,
                                  multiprocessing_context=self.multiprocessing_context, iteration=iteration)
        inline = epoch_batches(self.cache, epoch_plan, self.arrays, self.ignore_index)
        if self.pin_memory:
            inline = pinned(inline)
        if self.prefetch > 0:
            return threaded_batches(inline, self.prefetch, iteration)
        return inline

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(cache={self.cache!r}, batch_size={self.batch_size}, rank={self.rank}/"
                f"{self.world_size}, num_workers={self.num_workers}, shuffle={self.shuffle}, seed={self.seed}, "
                f"epoch={self.epoch}, cursor={self.cursor})")


def make_loader(cache: Any, batch_size: int, **kwargs: Any) -> CacheLoader:
    """A :class:`CacheLoader` over ``cache`` (a reader, or a path/URL); keyword arguments as documented there.

    Example::

        loader = kdlib.make_loader("cache_dir", batch_size=8, seed=0, device="cuda")
        for batch in loader:
            loss, logits = kdlib.kd_step_loss(student, batch, ce_weight=0.1)  # the student gets batch's tokens
            loss.backward()
    """
    return CacheLoader(cache, batch_size, **kwargs)
