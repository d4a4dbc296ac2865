"""The build's main loop: teacher forward → targets on the device → a background thread that writes shards.

Shape notation::

    B  sequences per forward batch (--batch-size)     T  sequence length (--seq-len)
    V  teacher vocabulary size                          K  top-k kept per position

Per batch of B rows of one pending shard::

    main thread:   logits = teacher(ids)                      # [B, T, V] on the device
                   uniforms of sequences [b0, b1) → device    # sample / hybrid caches (sampling.py)
                   targets = compute_targets(logits, ids)     # top-k, samples, lse, lse_t, nll, entropy in fp32
                   start device→host copies, enqueue           # bounded queue: at most a few batches ahead
    writer thread: wait for the copy, cast, fill the shard buffers, and when a shard is full
                   CacheWriter.write_shard (compress, fsync, journal)

Batches never cross shard boundaries, so a resumed build runs exactly the same batches as an uninterrupted
one (same batch size ⇒ bitwise-identical shard files). The draws of a sampled cache depend only on the
sequence index and the cache's seed, not on the batch.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from cache_server import format as fmt
from cache_server.build import sampling
from cache_server.build.options import NonFiniteLogitsError
from cache_server.build.targets import compute_targets, workspace_numel
from cache_server.build.teacher import forward_logits
from cache_server.build.writer import CacheWriter
from cache_server.format.offsets import OFFSET_ARRAYS

__all__ = ["PipelineStats", "ShardComputer", "run_pipeline"]


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
    for name in ("topk_ids", "input_ids", "sample_ids", "sample_counts"):
        if name in targets:
            targets[name] = targets[name].to(torch.int32)
    for name in ("topk_logprobs", "sample_logprobs"):
        if name in targets and layout.logprob_dtype == "float16":
            targets[name] = targets[name].to(torch.float16)
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


@dataclass
class PipelineStats:
    """What one run of the pipeline did, and where its time went."""

    shards_written: int = 0
    shard_bytes: int = 0
    forward_s: float = 0.0  # main thread: forward + targets + starting the host copies
    writer_thread_cpu_s: float = 0.0  # CPU time of the writer thread itself (zarr's own pool not included)
    writer_write_s: float = 0.0  # writer thread wall time inside CacheWriter.write_shard (compress, write, fsync)
    drain_s: float = 0.0  # main thread waiting for the writer after the last batch (the last shard's write)


def _stop(assembler: _ShardAssembler) -> None:
    """Stop the writer thread without writing anything queued after a failure; finished shards stay."""
    if assembler.is_alive():
        with assembler.queue.mutex:
            assembler.queue.queue.clear()
        try:
            assembler.queue.put_nowait(None)
        except queue.Full:
            pass
        assembler.join()


def _sample_request(layout: fmt.CacheLayout, seed: int, b0: int, b1: int, device) -> sampling.SampleRequest | None:
    """The draws of sequences [b0, b1) of a sample / hybrid cache (None for a top-k cache)."""
    if not layout.has_samples:
        return None
    uniforms = sampling.sequence_uniforms(seed, b0, b1, layout.seq_len, layout.samples)  # [B, T, D] CPU
    return sampling.SampleRequest(uniforms.to(device, non_blocking=True), layout.sample_slots,
                                  layout.sample_temperature, hybrid=layout.targets == "hybrid",
                                  logprobs=layout.sample_logprobs)


class ShardComputer:
    """Whole shards through the teacher, batched exactly as the local build batches them, written in order.

    Each shard's rows ``[start, stop)`` are cut into batches ``[b0, b0 + batch_size)`` from its first row (never
    across shards), so any process that computes a shard with the same --batch-size gets the same bytes: the
    local loop (:func:`run_pipeline`) and every Ray actor (``engine_ray.py``) use this class. The forward runs
    in the caller's thread; a background :class:`_ShardAssembler` writes each finished shard through the
    writer while the caller goes on with the next shard.

    Args:
        model: the teacher, on ``device``, in eval mode.
        sequences: [N, T] token ids of the whole cache (rows of the computed shards are read).
        writer: the cache's writer.
        device: the teacher's torch device.
        batch_size: B.
        queue_batches: batches the caller may run ahead of the writer thread.
        extra_arrays: arrays [N, T, ...] stored like ``input_ids``, rows copied as given (``--record-offsets``:
            ``token_doc``, ``token_bytes``; ``cache_server/format/offsets.py``).
    """

    def __init__(self, model: torch.nn.Module, sequences: np.ndarray, writer: CacheWriter, *, device: str,
                 batch_size: int, queue_batches: int = 4, extra_arrays: Mapping[str, np.ndarray] | None = None) -> None:
        self.model, self.sequences, self.layout = model, sequences, writer.layout
        self.extra_arrays = dict(extra_arrays or {})
        missing = [name for name in OFFSET_ARRAYS if writer.layout.offsets and name not in self.extra_arrays]
        if missing:
            raise ValueError(f"the layout stores {missing} (--record-offsets) but the pipeline was not given them: "
                             "pass extra_arrays=TokenData.offsets (open_token_data(..., record_offsets=True))")
        self.device, self.batch_size = torch.device(device), batch_size
        self.seed = sampling.layout_seed(writer.layout, writer.settings)
        self.assembler = _ShardAssembler(writer, writer.layout, maxsize=max(1, queue_batches))
        self.forward_s = 0.0  # forward + targets + starting the host copies, over every shard so far
        self._workspace: torch.Tensor | None = None  # reused fp32 scratch of compute_targets (a few rows of V)
        self.assembler.start()

    def forward_shard(self, shard_index: int, on_tokens: Callable[[int], None] | None = None) -> None:
        """Run every batch of ``shard_index`` through the teacher and queue it for the writer thread."""
        layout, device, assembler = self.layout, self.device, self.assembler
        start, stop = layout.shard_range(shard_index)
        with torch.inference_mode():
            for b0 in range(start, stop, self.batch_size):
                b1 = min(b0 + self.batch_size, stop)
                f0 = time.perf_counter()
                ids = torch.from_numpy(np.array(self.sequences[b0:b1], dtype=np.int64)).to(device)  # [B, T]
                logits = forward_logits(self.model, ids)  # [B, T, V]
                need = workspace_numel(logits, sampled=layout.has_samples)
                if self._workspace is None or self._workspace.numel() < need:
                    self._workspace = torch.empty(need, dtype=torch.float32, device=device)
                request = _sample_request(layout, self.seed, b0, b1, device)
                targets = compute_targets(logits, ids, layout.topk, layout.temperatures, self._workspace,
                                          sampling_request=request)
                targets["input_ids"] = ids
                del logits
                host, ready = _to_host(targets, layout, device)
                for name, array in self.extra_arrays.items():  # inputs stored as they are (text offsets)
                    host[name] = torch.from_numpy(np.asarray(array[b0:b1], dtype=np.int64))
                self.forward_s += time.perf_counter() - f0
                assembler.put((shard_index, b0 - start, host, ready))
                if on_tokens is not None:
                    on_tokens((b1 - b0) * layout.seq_len)

    def close(self) -> None:
        """Write every queued shard, stop the writer thread, re-raise its error."""
        self.assembler.close()

    def abort(self) -> None:
        """Stop the writer thread without writing what is queued; finished shards stay."""
        _stop(self.assembler)

    def fill_stats(self, stats: PipelineStats) -> PipelineStats:
        """Copy what the writer thread did into ``stats``."""
        assembler = self.assembler
        stats.forward_s = self.forward_s
        stats.shards_written, stats.shard_bytes = assembler.shards_written, assembler.shard_bytes
        stats.writer_thread_cpu_s, stats.writer_write_s = assembler.cpu_s, assembler.write_s
        return stats


def run_pipeline(
    model: torch.nn.Module,
    sequences: np.ndarray,
    writer: CacheWriter,
    *,
    device: str,
    batch_size: int,
    queue_batches: int = 4,
    progress: bool = True,
    desc: str = "kdcache build",
    extra_arrays: Mapping[str, np.ndarray] | None = None,
) -> PipelineStats:
    """Compute and write every shard ``writer`` still lacks for this rank, with a tqdm progress bar.

    Args:
        model: the teacher, on ``device``, in eval mode.
        sequences: [N, T] token ids of the whole cache (rows of the pending shards are read).
        writer: the cache's writer (its ``pending_shards()`` are computed, in order).
        device: the teacher's torch device.
        batch_size: B.
        queue_batches: batches the main thread may run ahead of the writer thread.
        progress: show the progress bar.
        desc: the progress bar's label.
        extra_arrays: arrays stored like ``input_ids`` (see :class:`ShardComputer`).
    """
    from tqdm.auto import tqdm

    layout = writer.layout
    pending = writer.pending_shards()
    pending_tokens = sum(stop - start for start, stop in map(layout.shard_range, pending)) * layout.seq_len
    bar = tqdm(total=int(pending_tokens), unit="tok", unit_scale=True, desc=desc, disable=not progress,
               dynamic_ncols=True)
    computer = ShardComputer(model, sequences, writer, device=device, batch_size=batch_size,
                             queue_batches=queue_batches, extra_arrays=extra_arrays)
    assembler = computer.assembler
    assembler.on_shard = lambda i: bar.set_postfix_str(f"shards {assembler.shards_written}/{len(pending)}")
    stats = PipelineStats()
    try:
        for shard_index in pending:
            computer.forward_shard(shard_index, bar.update)
        drain0 = time.perf_counter()
        computer.close()
        stats.drain_s = time.perf_counter() - drain0
    except BaseException:
        computer.abort()
        raise
    finally:
        bar.close()
    return computer.fill_stats(stats)
