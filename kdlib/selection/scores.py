"""Per-sequence scores of a whole cache in one streaming no-grad pass: student-vs-teacher KL, a model's NLL.

Shape notation::

    N  sequences in the cache      B  sequences per batch      T  positions per sequence
    V  vocabulary

Both scores are means over a sequence's valid positions (label != ignore_index: positions 0..T-2 with the
cache's labels, the convention of the cache's own ``seq_nll``):

* :func:`score_sequences`: the student's divergence from the cached teacher, ``kd_loss_from_batch`` with
  ``reduction="none"`` (every divergence/temperature/tail option passes through; ce_weight 0, kd_weight 1).
* :func:`reference_nll`: a model's NLL of the cache's own next tokens (for difference sampling).

A sequence without any valid position (a cache with T = 1) gets ``empty_score`` (default 0.0: nothing to be
hard on); a NaN or infinite score of any other sequence is an error naming the sequence, never a silent NaN.

Resume: with ``out="scores.npy"`` the scores go to that ``.npy`` file (a memory map, filled batch by batch)
and a progress record ``scores.npy.progress.json`` says how many sequences are done and what was scored
(cache manifest, options, batch size, a fingerprint of the model's parameters). A rerun with the same
arguments continues after the last recorded batch, with the same batch boundaries, so its scores are identical
to an uninterrupted run's; other arguments are refused (nothing written is overwritten). A finished file is
returned as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdlib.batch import DEFAULT_IGNORE_INDEX, move_batch, read_batch, student_input_ids
from kdlib.integrations.step import logits_of, model_device
from kdlib.losses.options import KDLossOptions, resolve_options

__all__ = ["score_sequences", "reference_nll", "stream_scores", "model_fingerprint", "SCORES_FORMAT"]

SCORES_FORMAT = "kdcache-sequence-scores/1"
# (per-position losses [B, T], valid mask [B, T]) of one batch
BatchScorer = Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def model_fingerprint(model: Any) -> str | None:
    """A digest of a module's parameters and buffers (names, dtypes, shapes, bytes); None for a plain callable."""
    state = getattr(model, "state_dict", None)
    if not callable(state):
        return None
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in state().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _manifest_digest(cache: Any) -> str:
    text = json.dumps(cache.manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _open(cache: Any, open_kwargs: Mapping[str, Any] | None) -> Any:
    from kdlib.data.open import as_cache

    return as_cache(cache, open_kwargs)


def _write_json_atomic(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` so that a reader (or a process killed mid-write) sees the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as file:
        json.dump(record, file, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


class _ScoreFile:
    """The ``.npy`` memory map of the scores and its progress record (module docstring, "Resume")."""

    def __init__(self, path: str | os.PathLike, num_sequences: int, identity: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.record_path = self.path.with_name(self.path.name + ".progress.json")
        self.identity = dict(identity)
        if self.record_path.exists():
            record = json.loads(self.record_path.read_text())
            self._check(record.get("identity", {}))
            self.done = int(record["done"])
        elif self.path.exists():
            raise ValueError(f"{self.path} exists but has no progress record {self.record_path.name}: it was not "
                             "written by this scoring pass, and is left alone; pass another out= path")
        else:  # the record first: a pass killed before its first record restarts from scratch, not refused
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.done = 0
            _write_json_atomic(self.record_path, {"identity": self.identity, "done": 0, "complete": False})
        if self.done == 0:
            self.scores = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(num_sequences,))
            self.scores[:] = np.nan  # not scored yet
        elif not self.path.exists():
            raise ValueError(f"{self.record_path} records {self.done} scored sequences but {self.path.name} is "
                             f"missing; delete {self.record_path.name} to score again from the start")
        else:
            self.scores = np.lib.format.open_memmap(self.path, mode="r+")

    def _check(self, saved: Mapping[str, Any]) -> None:
        differs = [f"{key}: {saved.get(key)!r} (saved) vs {value!r} (now)" for key, value in self.identity.items()
                   if saved.get(key) != value]
        if differs:
            raise ValueError(f"{self.path} holds scores of another pass (" + "; ".join(differs) + "); resume with "
                             "the same model, cache and options, or pass another out= path (or delete the file "
                             f"and {self.record_path.name} to start over)")

    def record(self, done: int) -> None:
        """The scores up to ``done`` are on disk (flushed first), then the record says so."""
        self.scores.flush()
        self.done = int(done)
        _write_json_atomic(self.record_path, {"identity": self.identity, "done": self.done,
                                              "complete": self.done >= self.scores.shape[0]})


def _sequence_means(losses: torch.Tensor, valid: torch.Tensor, first: int, empty_score: float) -> np.ndarray:
    """Mean of ``losses`` [B, T] over ``valid`` [B, T] per row, as [B] float32; rows without any: empty_score."""
    valid = valid.to(torch.float64)
    totals = (losses.to(torch.float64) * valid).sum(-1)
    counts = valid.sum(-1)
    means = torch.where(counts > 0, totals / counts.clamp_min(1), torch.full_like(totals, float(empty_score)))
    out = means.cpu().numpy().astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise ValueError(f"the score of sequence(s) {(bad + first)[:5].tolist()} is not finite (the model's logits "
                         "there are NaN/inf, or the loss options overflow); check the model on those sequences")
    return out


def stream_scores(cache: Any, scorer: BatchScorer, *, batch_size: int = 8, out: str | os.PathLike | None = None,
                  identity: Mapping[str, Any] | None = None, arrays: Sequence[str] | None = None,
                  device: torch.device | str | None = None, empty_score: float = 0.0, progress: bool = True,
                  desc: str = "scoring", ignore_index: int = DEFAULT_IGNORE_INDEX, record_every_s: float = 5.0,
                  open_kwargs: Mapping[str, Any] | None = None) -> np.ndarray:
    """One streaming no-grad pass over the cache in order: per-sequence means of ``scorer``'s losses, [N] float32.

    Args:
        cache: an open cache (local or remote) or its path/URL (opened with ``open_kwargs``).
        scorer: ``batch -> (losses [B, T], valid [B, T])`` for a batch already on ``device``.
        batch_size: B; part of what a resume must match (the batch boundaries fix the arithmetic).
        out: the ``.npy`` file to fill and resume (module docstring); None keeps the scores in memory only.
        identity: what is scored (recorded; a resume must match it). The cache's manifest digest, N, B and
            ``empty_score`` are added.
        arrays: the per-position arrays to read (default all).
        device: where batches go (default the CPU).
        empty_score: the score of a sequence without valid positions.
        progress: show a tqdm bar (sequences/s).
        desc: the bar's label.
        ignore_index: the label of positions without a next token.
        record_every_s: seconds between progress records (and at the end); 0 records after every batch.

    Raises:
        ValueError: a bad argument, a non-finite score, or an ``out`` file of another pass.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not np.isfinite(empty_score):
        raise ValueError(f"empty_score must be a finite number (it stands for 'no valid position'), got {empty_score}")
    cache = _open(cache, open_kwargs)
    num_sequences = int(cache.num_sequences)
    full_identity = {**dict(identity or {}), "format": SCORES_FORMAT, "cache": _manifest_digest(cache),
                     "num_sequences": num_sequences, "batch_size": batch_size, "empty_score": float(empty_score)}
    store = _ScoreFile(out, num_sequences, full_identity) if out is not None else None
    scores = store.scores if store is not None else np.full(num_sequences, np.nan, dtype=np.float32)
    start = store.done if store is not None else 0
    last_record = time.monotonic()
    bar = tqdm(total=num_sequences, initial=start, unit="seq", desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for first in range(start, num_sequences, batch_size):
                stop = min(first + batch_size, num_sequences)
                batch = read_batch(cache, np.arange(first, stop), arrays, ignore_index)
                if device is not None:
                    batch = move_batch(batch, device)
                losses, valid = scorer(batch)
                scores[first:stop] = _sequence_means(losses, valid, first, empty_score)
                bar.update(stop - first)
                if store is not None and (stop == num_sequences or time.monotonic() - last_record >= record_every_s):
                    store.record(stop)
                    last_record = time.monotonic()
    finally:
        bar.close()
    return np.array(scores, dtype=np.float32)


class _EvalMode:
    """``model.eval()`` for the pass (dropout off: deterministic scores), its training flag restored after."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))

    def __enter__(self) -> None:
        if hasattr(self.model, "eval"):
            self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        if self.was_training:
            self.model.train()


def _run_model(model: Any, batch: Mapping[str, torch.Tensor], device: torch.device | None) -> torch.Tensor:
    ids = student_input_ids(batch, device)  # [B, T] int64: the tokens the teacher saw
    logits = logits_of(model(ids))  # [B, T, V]
    if tuple(logits.shape[:-1]) != tuple(ids.shape):
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)} for input_ids of shape "
                         f"{tuple(ids.shape)}; scoring needs a causal LM's [B, T, V] logits")
    return logits


def score_sequences(student: Any, cache: Any, *, batch_size: int = 8, out: str | os.PathLike | None = None,
                    device: torch.device | str | None = None, empty_score: float = 0.0, progress: bool = True,
                    record_every_s: float = 5.0, open_kwargs: Mapping[str, Any] | None = None,
                    options: KDLossOptions | None = None, **loss_kwargs: Any) -> np.ndarray:
    """Each sequence's mean student-vs-teacher divergence over its valid positions, [N] float32.

    ``kd_loss_from_batch(logits, batch, reduction="none", ce_weight=0, kd_weight=1, ...)`` per batch (the
    fused loss; any cache kind it takes), averaged per sequence; the student runs on the batch's own tokens
    in eval mode (restored after) without gradients. See the module docstring for resume and empty sequences.

    Args:
        student: a causal LM, ``student(input_ids [B, T]) -> logits [B, T, V]`` (tensor, tuple or ``.logits``).
        cache: an open cache (``kdlib.open_cache``, local or remote) or its path/URL.
        batch_size: sequences per forward pass.
        out: ``.npy`` path to write and resume (None: in memory).
        device: where batches go (default: the student's parameters' device).
        empty_score: the score of a sequence without valid positions.
        progress: tqdm progress bar with sequences/s.
        record_every_s: seconds between progress records when ``out`` is given.
        open_kwargs: ``open_cache`` options when ``cache`` is a path/URL.
        options, **loss_kwargs: loss options (``divergence``, ``temperature``, ``tail``, ``beta``, ``tau_squared``,
            ``allow_padded_vocab``, ``ignore_index``, ``backend``...); not ``reduction``/``ce_weight``/``kd_weight``.

    Returns:
        scores [N] float32, higher = the student is further from the teacher.
    """
    fixed = sorted({"reduction", "ce_weight", "kd_weight"} & set(loss_kwargs))
    if fixed:
        raise ValueError(f"score_sequences sets {fixed} itself (the score is the divergence alone, per position)")
    opts = resolve_options(options, {**loss_kwargs, "reduction": "none", "ce_weight": 0.0, "kd_weight": 1.0},
                           entry_point="kd_loss_from_batch")
    from kdlib.losses import kd_loss_from_batch

    target = model_device(student, device)

    def scorer(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _run_model(student, batch, target)
        losses = kd_loss_from_batch(logits, batch, options=opts)  # [B, T], 0 at ignored positions
        return losses, batch["labels"].to(losses.device) != opts.ignore_index

    identity = {"score": "kd", "model": model_fingerprint(student),
                "options": {k: repr(v) for k, v in opts.non_defaults().items()}}
    with _EvalMode(student):
        return stream_scores(cache, scorer, batch_size=batch_size, out=out, identity=identity, device=target,
                             empty_score=empty_score, progress=progress, desc="kd scores",
                             ignore_index=opts.ignore_index, record_every_s=record_every_s, open_kwargs=open_kwargs)


def reference_nll(model: Any, cache: Any, *, batch_size: int = 8, out: str | os.PathLike | None = None,
                  device: torch.device | str | None = None, empty_score: float = 0.0, progress: bool = True,
                  record_every_s: float = 5.0, open_kwargs: Mapping[str, Any] | None = None,
                  ignore_index: int = DEFAULT_IGNORE_INDEX) -> np.ndarray:
    """Each sequence's mean NLL (nats) of its own next tokens under ``model``, [N] float32: the cache's
    ``seq_nll`` convention (positions 0..T-2), for a reference model. Same pass, resume and arguments as
    :func:`score_sequences`; only ``input_ids`` is read from the cache."""
    target = model_device(model, device)

    def scorer(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _run_model(model, batch, target)
        labels = batch["labels"].to(logits.device)
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                                 reduction="none").view(labels.shape)  # [B, T], 0 at ignored positions
        return losses, labels != ignore_index

    identity = {"score": "nll", "model": model_fingerprint(model), "ignore_index": ignore_index}
    with _EvalMode(model):
        return stream_scores(cache, scorer, batch_size=batch_size, out=out, identity=identity, device=target,
                             arrays=["input_ids"], empty_score=empty_score, progress=progress,
                             desc="reference nll", ignore_index=ignore_index, record_every_s=record_every_s,
                             open_kwargs=open_kwargs)
