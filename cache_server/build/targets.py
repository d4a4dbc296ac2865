"""Everything a cache stores for a batch of teacher logits: top-k log-probs, samples, logsumexps, NLL, entropy.

:func:`compute_targets` walks the logits in row chunks on the device that holds them, in fp32 (see there);
on CPU the chunks are shared by a small pool of single-threaded worker threads, and the top-k is the exact
grouped top-k of :func:`_grouped_topk`. Sampled targets (``sampling.py``) are drawn inside the same chunk
pass, from the exp the logsumexp already takes.

Shape notation::

    B  sequences per forward batch     T  sequence length
    V  teacher vocabulary size         K  top-k kept per position (0 for a sample cache)
    N  B * T positions                 n  positions in one row chunk
    D  draws per position              W  sample slots per position
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from cache_server import format as fmt
from cache_server.build import sampling

__all__ = ["compute_targets", "workspace_numel"]

# Rows of V per chunk: compute_targets walks the [B*T, V] logits in row chunks so its fp32 scratch (the
# upcast chunk, z - max, exp) stays in the CPU's last-level cache between passes instead of streaming
# 100+ MB buffers through DRAM once per pass. ~4 MiB per fp32 buffer and core measured best on a 2-core
# EPYC (L2 1 MiB/core, L3 32 MiB). On accelerators a pass is a kernel launch, so chunks are only as small
# as needed to bound the scratch memory (256 MiB per buffer).
_CPU_CHUNK_ELEMS = 1 << 20
_DEVICE_CHUNK_ELEMS = 1 << 26

# On CPU the chunks are spread over torch.get_num_threads() worker threads, each running single-threaded
# torch ops on its own chunks, instead of every op of every chunk being split over an OpenMP team. A
# chunk is ~20 small ops; with OpenMP each one ends in a barrier, and when anything else wants a core
# (the shard writer, another process) the barrier waits for a descheduled thread. Measured on
# [4, 256, 50257] with 2 cores (medians): 43 vs 42 ms quiet (the ops release the GIL), but 209 vs 70 ms
# next to one busy single-threaded process. The calling thread works as one of the workers.
_workers: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)
_workers_lock = threading.Lock()


def _worker_pool(n: int) -> ThreadPoolExecutor:
    """n threads whose torch ops run single-threaded (torch.set_num_threads is per thread)."""
    global _workers
    with _workers_lock:
        if _workers is None or _workers[0] != n:
            if _workers is not None:
                _workers[1].shutdown(wait=False)
            caller_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="kdcache-targets", initializer=torch.set_num_threads,
                                      initargs=(1,))
            started = threading.Barrier(n)
            for future in [pool.submit(started.wait) for _ in range(n)]:
                future.result()  # all n threads exist and have run their initializer
            # set_num_threads(1) also lowered the count torch gives threads started later (a process-wide
            # default); put back the caller's.
            torch.set_num_threads(caller_threads)
            _workers = (n, pool)
        return _workers[1]


def _forget_worker_pool() -> None:
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_pool)


def _chunk_plan(logits: torch.Tensor, chunk_rows: int | None) -> tuple[int, int]:
    """(rows per chunk, worker threads) for ``logits`` [B, T, V]."""
    V = logits.shape[-1]
    N = max(1, logits.numel() // V)
    on_cpu = logits.device.type == "cpu"
    rows = min(chunk_rows or max(1, (_CPU_CHUNK_ELEMS if on_cpu else _DEVICE_CHUNK_ELEMS) // V), N)
    workers = min(torch.get_num_threads(), -(-N // rows)) if on_cpu else 1
    return rows, max(1, workers)


def _buffers(logits: torch.Tensor, sampled: bool) -> int:
    """Scratch buffers per worker: z - max, exp, (the fp32 upcast chunk,) (the CDF of the draws)."""
    return 2 + (logits.dtype != torch.float32) + sampled


def workspace_numel(logits: torch.Tensor, chunk_rows: int | None = None, sampled: bool = False) -> int:
    """fp32 elements of the scratch buffer ``compute_targets`` needs for ``logits`` [B, T, V] (``sampled``:
    with a ``sampling.SampleRequest``)."""
    rows, workers = _chunk_plan(logits, chunk_rows)
    return workers * _buffers(logits, sampled) * rows * logits.shape[-1]


def _topk_group_size(vocab_size: int, k: int) -> int:
    """Group size S for ``_grouped_topk``, or 0 where a plain ``torch.topk`` is as fast (small V, k near V).

    G = V // S groups of >= 512 (and >= 16 k): fewer groups leave too many candidates (k * S), more make
    the top-k over the group maxima the expensive step (CPU topk costs ~1 ns per element of rows this
    short, and more below ~2k elements per row, where it switches from partial sort to nth_element), and
    groups shorter than ~64 make the group-max pass slow.
    """
    # Measured on a 2-core CPU: S = 98 for V = 50,257 was the fastest group size.
    groups = max(512, 1 << (16 * k - 1).bit_length())
    size = vocab_size // groups
    return size if size >= 8 else 0


def _grouped_topk(z: torch.Tensor, k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``torch.topk(z, k, -1)`` (values; ids up to the order of ties) at a fraction of its CPU cost.

    CPU ``torch.topk`` copies each row into a (value, index) queue before selecting, which costs more than
    every other pass of ``compute_targets`` together. Instead: split the row into G = V // S contiguous
    groups of S, take each group's max (one vectorized pass), keep the k groups with the largest maxima,
    and select among their k*S members plus the < S tail elements.

    Why exact: let t be the k-th largest group max. The k kept groups hold k elements >= t, so the k-th
    largest element of the row is >= t, while every element of a dropped group is <= its max <= t. So
    the dropped elements can only tie with the k-th value, never beat it. NaN/inf propagate through max
    (topk ranks NaN first, as torch.topk does), so non-finite rows are still caught by the caller.

    Args:
        z: [R, V] rows (contiguous along V).
        k: K.
        group_size: S from ``_topk_group_size``.

    Returns:
        values [R, K] sorted descending, ids [R, K] int64.
    """
    # Single-threaded, 1040 rows of V = 50,257, k = 32: 61 ms for torch.topk, 25 ms for this.
    R, V = z.shape
    S = group_size
    G = V // S
    body = z[:, : G * S].view(R, G, S)  # [R, G, S], body[r, g, j] = z[r, g*S + j]
    groups = body.amax(dim=-1).topk(k, dim=-1, sorted=False).indices  # [R, K]
    rows = torch.arange(R, device=z.device).unsqueeze(1)  # [R, 1]
    cand = body[rows, groups].view(R, k * S)  # [R, K*S], column i*S + j = z[r, groups[r, i]*S + j]
    if G * S < V:  # the < S tail elements belong to no group: always candidates
        cand = torch.cat([cand, z[:, G * S :]], dim=1)  # [R, K*S + tail]
    values, pos = cand.topk(k, dim=-1, largest=True, sorted=True)  # [R, K]
    # Candidate column -> vocabulary id: i*S + j -> groups[i]*S + j; tail column c -> c - K*S + G*S.
    i, j = pos.div(S, rounding_mode="floor"), pos.remainder(S)
    ids = groups.gather(1, i.clamp_(max=k - 1)) * S + j
    return values, torch.where(pos < S * k, ids, pos + (G * S - S * k))


@dataclass
class _ChunkJob:
    """The shared state of one ``compute_targets`` call: inputs, scratch and the [N, ...] outputs."""

    flat: torch.Tensor  # [N, V] logits (a view)
    scratch: torch.Tensor  # [workers, buffers, rows, V] fp32
    rows: int
    topk: int
    group_size: int
    temperatures: tuple[float, ...]
    topk_logprobs: torch.Tensor  # [N, K] fp32
    topk_ids: torch.Tensor  # [N, K] int64
    lse: torch.Tensor  # [N]
    entropy: torch.Tensor  # [N]
    lse_t: dict[float, torch.Tensor]  # tau -> [N]
    next_chunk: Iterator[int]  # shared by the workers (next() is atomic under the GIL)
    sampling: sampling.SampleRequest | None = None
    uniforms: torch.Tensor | None = None  # [N, D] fp32
    draws: torch.Tensor | None = None  # [N, D] int64 (-1: a hybrid row with no weight outside the head)


def _run_chunks(job: _ChunkJob, worker: int) -> None:
    """Take row chunks off ``job.next_chunk`` until none are left; write their results into ``job``."""
    N, V = job.flat.shape
    with torch.inference_mode():  # thread-local: workers must enter it themselves
        while (r0 := next(job.next_chunk) * job.rows) < N:
            r1 = min(r0 + job.rows, N)
            n = r1 - r0
            z = job.flat[r0:r1]  # [n, V]
            if z.dtype != torch.float32:
                z = job.scratch[worker, 2, :n].copy_(z)  # exact upcast
            d, w = job.scratch[worker, 0, :n], job.scratch[worker, 1, :n]  # [n, V] each
            if not job.topk:  # a sample cache: no top-k, just the row max (NaN if the row has a NaN)
                values, ids = z.amax(dim=-1, keepdim=True), None
            elif job.group_size:
                values, ids = _grouped_topk(z, job.topk, job.group_size)  # [n, K]
            else:
                values, ids = torch.topk(z, job.topk, dim=-1, largest=True, sorted=True)  # [n, K]
            row_max = values[:, :1]  # [n, 1]; NaN if the row has a NaN (topk ranks NaN first)
            torch.sub(z, row_max, out=d)
            sum_w = torch.exp(d, out=w).sum(dim=-1)  # [n]
            if job.sampling is not None and job.sampling.temperature == 1.0:
                _draw_chunk(job, worker, r0, r1, w, ids)
            log_sum_w = sum_w.log()
            chunk_lse = row_max.squeeze(1) + log_sum_w  # [n]
            # A -inf logit gives w * d = 0 * (-inf) = NaN, +inf gives d = inf - inf = NaN: bad positions
            # show up as non-finite lse/entropy without a separate pass over the logits.
            job.entropy[r0:r1] = log_sum_w - w.mul_(d).sum(dim=-1) / sum_w
            job.lse[r0:r1] = chunk_lse
            if job.topk:
                torch.sub(values, chunk_lse.unsqueeze(1), out=job.topk_logprobs[r0:r1])
                job.topk_ids[r0:r1] = ids
            for tau in job.temperatures:
                sum_w_tau = torch.div(d, tau, out=w).exp_().sum(dim=-1)  # [n]
                job.lse_t[tau][r0:r1] = row_max.squeeze(1) / tau + sum_w_tau.log()
                if job.sampling is not None and tau == job.sampling.temperature:
                    _draw_chunk(job, worker, r0, r1, w, ids)


def _draw_chunk(job: _ChunkJob, worker: int, r0: int, r1: int, w: torch.Tensor, ids: torch.Tensor | None) -> None:
    """Draw rows [r0, r1) from ``w`` = exp((z - max) / tau_s) [n, V]; a hybrid excludes its head ``ids``."""
    cdf = job.scratch[worker, -1, : r1 - r0]  # [n, V], the last buffer (see _buffers)
    head = ids[:, : job.topk - 1] if job.sampling.hybrid else None  # the last of the H + 1 is not in the head
    job.draws[r0:r1] = sampling.draw_ids(w, job.uniforms[r0:r1], cdf, head)


def _run_workers(job: _ChunkJob, workers: int) -> None:
    if workers == 1:
        _run_chunks(job, 0)
        return
    # The calling thread is worker 0, single-threaded like the pool's, and gets its thread count back.
    futures = [_worker_pool(workers - 1).submit(_run_chunks, job, i) for i in range(1, workers)]
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_chunks(job, 0)
    finally:
        torch.set_num_threads(caller_threads)
        for future in futures:
            future.result()


def _new_job(logits, topk, temperatures, workspace, chunk_rows, request) -> tuple[_ChunkJob, int]:
    """The chunk plan, scratch views and empty outputs of one call; returns (job, worker threads).

    A hybrid request computes the top-(K + 1): the head is the first K, and the (K + 1)-th is the draw of a
    row whose weight outside the head is 0 in fp32 (where the restricted distribution is a point mass on it).
    """
    B, T, V = logits.shape
    N = B * T
    device = logits.device
    rows, workers = _chunk_plan(logits, chunk_rows)
    sampled = request is not None
    need = workspace_numel(logits, chunk_rows, sampled)
    if workspace is None or workspace.numel() < need or workspace.device != device or workspace.dtype != torch.float32:
        workspace = torch.empty(need, dtype=torch.float32, device=device)
    k = topk + 1 if sampled and request.hybrid else topk
    job = _ChunkJob(
        flat=logits.reshape(N, V),  # [N, V] (a view for the contiguous output of an LM head)
        scratch=workspace.view(-1)[:need].view(workers, _buffers(logits, sampled), rows, V),
        rows=rows,
        topk=k,
        group_size=_topk_group_size(V, k) if device.type == "cpu" and k else 0,  # CUDA's radix top-k is fast
        temperatures=tuple(temperatures),
        topk_logprobs=torch.empty(N, k, dtype=torch.float32, device=device),
        topk_ids=torch.empty(N, k, dtype=torch.int64, device=device),
        lse=torch.empty(N, dtype=torch.float32, device=device),
        entropy=torch.empty(N, dtype=torch.float32, device=device),
        lse_t={tau: torch.empty(N, dtype=torch.float32, device=device) for tau in temperatures},
        next_chunk=itertools.count(),
        sampling=request,
    )
    if sampled:
        job.uniforms = request.uniforms.reshape(N, -1)  # [N, D]
        job.draws = torch.empty(job.uniforms.shape, dtype=torch.int64, device=device)
    return job, workers


def _check_request(logits: torch.Tensor, topk: int, temperatures, request) -> None:
    if request is None:
        if topk <= 0:
            raise ValueError(f"topk must be positive without sampling, got {topk}")
        return
    B, T, V = logits.shape
    if request.uniforms.shape[:2] != (B, T) or request.uniforms.device != logits.device:
        raise ValueError(f"sampling.uniforms must be [{B}, {T}, D] on {logits.device}, got "
                         f"{tuple(request.uniforms.shape)} on {request.uniforms.device}")
    if request.temperature != 1.0 and request.temperature not in temperatures:
        raise ValueError(f"the sampling temperature {request.temperature} must be one of temperatures {temperatures}")
    if request.hybrid and not 0 < topk < V:
        raise ValueError(f"a hybrid request needs 0 < topk < V = {V}, got topk={topk}")


def _sample_outputs(job: _ChunkJob, request, topk: int, B: int, T: int) -> dict[str, torch.Tensor]:
    """The draws of a batch packed into slots (``sampling.pack_slots``), plus their exact log-probs."""
    draws = job.draws
    if request.hybrid:  # no weight outside the head: the best non-head id (see _new_job)
        draws = torch.where(draws < 0, job.topk_ids[:, topk : topk + 1], draws)
    ids, counts = sampling.pack_slots(draws, request.slots, job.flat.shape[-1])  # [N, W] each
    out = {"sample_ids": ids.view(B, T, -1), "sample_counts": counts.view(B, T, -1)}
    if request.logprobs:
        out["sample_logprobs"] = sampling.slot_logprobs(job.flat, ids, counts, job.lse).view(B, T, -1)
    return out


def compute_targets(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    topk: int,
    temperatures: tuple[float, ...] = (),
    workspace: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    sampling_request: sampling.SampleRequest | None = None,
) -> dict[str, torch.Tensor]:
    """Everything a cache stores for a batch, computed in fp32 where the logits live.

    Math (per position, over the full vocabulary z = logits[b, t], in fp32)::

        topk_logits, topk_ids = topk(z)                     (same order as the top-k of the log-probs)
        m = topk_logits[0] = max(z);   d = z - m <= 0;   w = exp(d);   s = sum(w)
        lse = m + log s;               topk_logprobs = topk_logits - lse
        entropy = -sum(p log p) = log s - sum(w * d) / s      (p = w / s; two non-negative terms, no
                                                               cancellation, unlike lse - sum(p * z))
        lse_t{tau} = logsumexp(z / tau) = m / tau + log sum(exp(d / tau))
        nll_t = lse - z[token[t + 1]]                          (position t predicts token t + 1)
        samples: D draws from the weights exp(d / tau_s) the lse/lse_t pass just took (hybrid: with the
                 top-K head zeroed), packed into W slots; sample_logprobs = z[id] - lse (``sampling.py``)

    So the vocabulary is read once for top-k (grouped on CPU, see ``_grouped_topk``) and the exp is taken
    once per temperature; lse and entropy share one, and the draws reuse it (one cumsum pass more). The
    work runs in row chunks whose scratch lives in ``workspace`` (fresh 100+ MB allocations per batch cost
    more in page faults than the arithmetic on a CPU; chunks small enough to stay in cache make the later
    passes cheap); on CPU the chunks are shared by ``torch.get_num_threads()`` single-threaded workers (see
    ``_CPU_CHUNK_ELEMS``). Each chunk's result does not depend on which worker ran it. ``logits`` are not
    modified.

    Args:
        logits: [B, T, V] teacher logits (any float dtype; bf16/fp16 are upcast exactly, chunk by chunk).
        input_ids: [B, T] the tokens the teacher saw.
        topk: K (0: no top-k, for a sample cache; the hybrid head H otherwise).
        temperatures: extra temperatures tau != 1 (must include the sampling temperature when it is not 1).
        workspace: optional reusable fp32 buffer on the logits' device with at least
            ``workspace_numel(logits, chunk_rows, sampled)`` elements (a larger one, e.g. [B, T, V], is fine).
        chunk_rows: positions per chunk (default: ~4 MiB of fp32 per chunk on CPU, 256 MiB elsewhere).
        sampling_request: what to draw (``sampling.SampleRequest``), or None.

    Returns:
        dict with ``topk_ids`` [B, T, K] int64, ``topk_logprobs`` [B, T, K] fp32 (when K > 0), ``lse`` [B, T],
        ``lse_t{tau}`` [B, T], ``seq_nll`` [B], ``seq_entropy`` [B] (fp32), ``finite`` [B, T] bool (False
        where any logit of the position is NaN/inf), and with sampling ``sample_ids`` / ``sample_counts``
        [B, T, W] int64 (+ ``sample_logprobs`` [B, T, W] fp32). No returned tensor aliases the workspace or
        logits.

    Raises:
        ValueError: topk is 0 without sampling, or the request does not fit the logits.
    """
    B, T, V = logits.shape
    _check_request(logits, topk, tuple(temperatures), sampling_request)
    job, workers = _new_job(logits, topk, temperatures, workspace, chunk_rows, sampling_request)
    _run_workers(job, workers)

    lse_bt = job.lse.view(B, T)
    # Position t predicts token t+1: NLL over positions 0..T-2.
    next_logits = logits[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()  # [B, T-1]
    out = {"lse": lse_bt, "seq_nll": (lse_bt[:, :-1] - next_logits).mean(dim=1)}
    if topk:
        out["topk_ids"] = job.topk_ids[:, :topk].reshape(B, T, topk)
        out["topk_logprobs"] = job.topk_logprobs[:, :topk].reshape(B, T, topk)
    if sampling_request is not None:
        out.update(_sample_outputs(job, sampling_request, topk, B, T))
    for tau in temperatures:
        out[fmt.temperature_key(tau)] = job.lse_t[tau].view(B, T)
    entropy_bt = job.entropy.view(B, T)
    out["seq_entropy"] = entropy_bt.mean(dim=1)  # [B]
    out["finite"] = torch.isfinite(lse_bt) & torch.isfinite(entropy_bt)
    return out
