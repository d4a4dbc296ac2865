"""``kdcache merge``: the weighted mixture of teachers whose top-k caches were built separately over the same tokens.

Per position each cache m holds teacher m's top-k ids S_m and their exact log-probs; its tail
t_m = 1 - sum_{i in S_m} p_m(i) is exact, and every id outside S_m has p_m(i) <= a_m = min(p_m on S_m, t_m)
(the k-th probability, and never more than the tail). The mixture p_mix = sum_m w_m p_m is therefore known on
the union U = S_1 ∪ ... ∪ S_M only up to the entries a teacher did not keep. What a merged cache stores
(docs/MERGE.md has the derivations and the measured error):

    p_hat(i) = sum_{m : i in S_m} w_m p_m(i)          the known part: p_hat(i) <= p_mix(i) <= p_hat(i) + eps(i),
                                                        eps(i) = sum_{m : i not in S_m} w_m a_m
    topk_ids, topk_logprobs   the K ids of U with the largest p_hat (ties: ascending id), log p_hat
    lse                       0 (the stored values are log-probabilities of a normalised distribution)
    tail (implied)            1 - sum_top p_hat  >=  the exact mixture mass outside the stored ids; equal to
                              it when every stored id is in every teacher's top-k (always when k = V)
    seq_nll                   min(mean_t -log p_hat(x_t+1), sum_m w_m seq_nll_m): both are upper bounds of the
                              mixture's NLL (p_hat <= p_mix; Jensen), exact when k = V
    seq_entropy               sum_m w_m seq_entropy_m + mean_t clip(J_hat_t, 0, H(w)), from
                              H(p_mix) = sum_m w_m H(p_m) + sum_m w_m KL(p_m || p_mix); J_hat is that KL sum
                              over the known entries with p_hat for p_mix: exact when k = V, an estimate else

The merge writes through the build's writer (journal, manifest last, build lock), so a killed merge resumes
where it stopped and gives the same bytes as an uninterrupted one.

Shape notation::

    M  input caches (teachers)      N  sequences      T  sequence length      V  vocabulary size
    K_m  top-k of cache m           C  sum_m K_m       K  top-k of the merged cache (<= max_m K_m)
    R  positions of one block (sequences * T)
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cache_server import format as fmt
from cache_server.build.mixture import normalize_weights
from cache_server.build.options import BuildInputError

__all__ = ["MergeInput", "MergedPositions", "open_inputs", "check_compatible", "merge_positions",
           "merged_sequence_stats", "merge_error_bound", "CacheRows"]

class CacheRows:
    """Rows of a finished cache's arrays across its shards, each shard checked against the manifest and decoded
    once (the last one is kept, as a merge reads rows in order)."""

    def __init__(self, path: Path, manifest: dict[str, Any], layout: fmt.CacheLayout) -> None:
        self.path, self.manifest, self.layout = path, manifest, layout
        self._specs = {spec.name: spec for spec in layout.arrays()}
        self._last: dict[str, tuple[int, np.ndarray]] = {}

    def _shard(self, name: str, index: int) -> np.ndarray:
        cached = self._last.get(name)
        if cached is not None and cached[0] == index:
            return cached[1]
        # A format v2 slot-group array decodes with its group's ordering array (format.decode_inputs).
        companions = {other: self._stored(other, index) for other in fmt.decode_inputs(self.layout, name)[1:]}
        data = fmt.decode_shard(self._stored(name, index), self._specs[name], self.layout, index,
                                companions=companions)
        self._last[name] = (index, data)
        return data

    def _stored(self, name: str, index: int) -> bytes:
        """The stored bytes of shard ``index`` of ``name``, checked against the manifest's size and digest."""
        file = self.path / fmt.shard_relpath(name, index, 1 + len(self._specs[name].trailing_shape))
        raw = file.read_bytes()
        fmt.verify_shard_bytes(raw, self.manifest["shards"][name][index], name, index, str(file))
        return raw

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array ``name``."""
        S = self.layout.shard_seqs
        parts = []
        for index in range(start // S, (stop - 1) // S + 1):
            lo = index * S
            parts.append(self._shard(name, index)[max(start, lo) - lo : min(stop, lo + S) - lo])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class MergeInput:
    """One input cache of a merge."""

    path: Path
    manifest: dict[str, Any]
    layout: fmt.CacheLayout
    manifest_sha256: str
    rows: CacheRows = field(repr=False)

    def teacher_entry(self, weight: float) -> dict[str, Any]:
        """This cache's teacher (as its manifest records it), its weight and where it came from."""
        entry = {**(self.manifest.get("teacher") or {}), "weight": weight, "cache": str(self.path),
                 "cache_manifest_sha256": self.manifest_sha256}
        if "teachers" in self.manifest:  # a mixture or a merge itself: keep its members
            entry["teachers"] = self.manifest["teachers"]
        return entry


def open_inputs(paths: Sequence[str | os.PathLike]) -> list[MergeInput]:
    """Read and validate each input cache's manifest (a cache being built is refused by load_manifest)."""
    if len(paths) < 2:
        raise BuildInputError(f"kdcache merge needs at least two caches, got {len(paths)}")
    inputs = []
    for p in paths:
        path = Path(p).resolve()
        raw = fmt.read_manifest_bytes(path)
        manifest = fmt.parse_manifest(raw, str(path / fmt.MANIFEST_NAME))
        layout = fmt.layout_from_manifest(manifest)
        inputs.append(MergeInput(path, manifest, layout, hashlib.sha256(raw).hexdigest(),
                                 CacheRows(path, manifest, layout)))
    return inputs


def _refuse(first: MergeInput, other: MergeInput, what: str, a: Any, b: Any, fix: str) -> BuildInputError:
    return BuildInputError(f"cannot merge {first.path} and {other.path}: {what} differ ({a} vs {b}); {fix}")


def check_compatible(inputs: Sequence[MergeInput], progress: Callable[[int], None] | None = None) -> None:
    """Refuse caches that are not the same tokens under the same format: target kind, format version,
    vocabulary, sequence length, number of sequences, and the content of ``input_ids`` (compared row by row,
    so a different dataset is refused whatever its fingerprint or sharding).

    Raises:
        BuildInputError: naming both caches, what differs and how to fix it.
    """
    first = inputs[0]
    for other in inputs:
        kind = (other.manifest.get("targets") or {}).get("kind", "topk")
        if kind != "topk":
            raise BuildInputError(f"{other.path} is a {kind!r} cache; kdcache merge mixes top-k caches only "
                                  "(build the teachers with --targets topk, or use kdcache build --teacher A "
                                  "--teacher B for an exact mixture)")
    checks = (
        ("format versions", lambda i: i.manifest.get("format_version"), "rebuild the older cache with this kdcache"),
        ("vocabularies", lambda i: i.layout.vocab_size, "merge only teachers that share a tokenizer"),
        ("sequence lengths (--seq-len)", lambda i: i.layout.seq_len, "build every cache with the same --seq-len"),
        ("numbers of sequences", lambda i: i.layout.num_sequences,
         "build every cache over the same data and --max-sequences"),
    )
    for other in inputs[1:]:
        for what, get, fix in checks:
            if get(first) != get(other):
                raise _refuse(first, other, what, get(first), get(other), fix)
    _check_same_tokens(inputs, progress)


def _check_same_tokens(inputs: Sequence[MergeInput], progress: Callable[[int], None] | None) -> None:
    first = inputs[0]
    step = first.layout.shard_seqs
    for start in range(0, first.layout.num_sequences, step):
        stop = min(start + step, first.layout.num_sequences)
        ids = first.rows.read("input_ids", start, stop)
        for other in inputs[1:]:
            theirs = other.rows.read("input_ids", start, stop)
            if not np.array_equal(ids, theirs):
                row, pos = (int(v) for v in np.argwhere(ids != theirs)[0])
                raise BuildInputError(
                    f"cannot merge {first.path} and {other.path}: they were built over different tokens (first "
                    f"difference at sequence {start + row}, position {pos}: token {ids[row, pos]} vs "
                    f"{theirs[row, pos]}; dataset fingerprints {first.manifest.get('dataset_fingerprint')} vs "
                    f"{other.manifest.get('dataset_fingerprint')}); build every cache from the same --data with "
                    "the same --seq-len and tokenizer"
                )
        if progress is not None:
            progress(stop - start)


@dataclass
class MergedPositions:
    """The merged top-K of R positions (see the module docstring for what each value means)."""

    ids: np.ndarray  # [R, K] int64, by descending p_hat, ties ascending id
    logprobs: np.ndarray  # [R, K] float64: log p_hat
    jsd: np.ndarray  # [R] float64: J_hat, the estimate of sum_m w_m KL(p_m || p_mix), clipped to [0, H(w)]


def merge_positions(ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], weights: Sequence[float],
                    topk: int) -> MergedPositions:
    """Merge the teachers' top-k of R positions into the mixture's top-K.

    Args:
        ids: per teacher, [R, K_m] top-k ids (unique per row).
        logprobs: per teacher, [R, K_m] their log-probs.
        weights: normalised weights w_m.
        topk: K <= max_m K_m (the union holds at least that many ids).
    """
    R = ids[0].shape[0]
    log_w = np.concatenate([np.full(i.shape[1], math.log(w)) for i, w in zip(ids, weights)])  # [C]
    all_ids = np.concatenate([i.reshape(R, -1).astype(np.int64) for i in ids], axis=1)  # [R, C]
    all_lw = np.concatenate([lp.reshape(R, -1).astype(np.float64) for lp in logprobs], axis=1) + log_w  # log w p
    C = all_ids.shape[1]
    order = np.argsort(all_ids, axis=1, kind="stable")  # [R, C]: equal ids next to each other
    sid, slw = np.take_along_axis(all_ids, order, 1), np.take_along_axis(all_lw, order, 1)
    first = np.ones((R, C), dtype=bool)
    first[:, 1:] = sid[:, 1:] != sid[:, :-1]  # the first entry of each distinct id of a row
    starts = np.flatnonzero(first)
    rows = starts // C  # [U] the row of each distinct id, row-major
    # Sums of w_m p_m in probability space, relative to the row's largest term: 10x cheaper than a logaddexp
    # reduction, and exact unless every term of an id is below e^-700 of the row's top, where the id's
    # largest term is kept instead (a lower bound within log M).
    row_max = slw.max(axis=1, keepdims=True)  # [R, 1]
    scaled = np.exp(slw - row_max)  # [R, C]
    summed = np.add.reduceat(scaled.ravel(), starts)  # [U]
    with np.errstate(divide="ignore"):
        merged = np.log(summed) + row_max.ravel()[rows]  # [U] log p_hat
    if not summed.all():
        merged = np.where(summed > 0, merged, np.maximum.reduceat(slw.ravel(), starts))
    group = np.cumsum(first.ravel()) - 1  # [R*C] the distinct id each sorted entry belongs to
    # J_hat: sum over the known entries of w_m p_m(i) (log p_m(i) - log p_hat(i)); log p_m = slw - log w.
    gap = slw - log_w[order] - merged[group].reshape(R, C)
    jsd = (scaled * gap).sum(axis=1) * np.exp(row_max.ravel())
    entropy_w = -sum(w * math.log(w) for w in weights)
    # Distinct ids into [R, C] rows in ascending-id order, padded with log p = -inf at the end; a stable sort by
    # -log p_hat then gives descending probability with ties by ascending id.
    slot = (np.cumsum(first, axis=1) - 1).ravel()[starts]
    pad_lp = np.full((R, C), -np.inf)
    pad_ids = np.zeros((R, C), dtype=np.int64)
    pad_lp[rows, slot], pad_ids[rows, slot] = merged, sid.ravel()[starts]
    top = np.argsort(-pad_lp, axis=1, kind="stable")[:, :topk]  # [R, K]
    return MergedPositions(ids=np.take_along_axis(pad_ids, top, 1), logprobs=np.take_along_axis(pad_lp, top, 1),
                           jsd=np.clip(jsd, 0.0, entropy_w))


def merge_error_bound(ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], weights: Sequence[float],
                      merged_ids: np.ndarray) -> np.ndarray:
    """eps [R, K]: p_mix(i) - p_hat(i) is in [0, eps] for each merged id i (the module docstring's bound).

    Args:
        ids / logprobs / weights: the inputs of :func:`merge_positions` ([R, K_m] per teacher).
        merged_ids: [R, K] its ``ids``.
    """
    eps = np.zeros(merged_ids.shape, dtype=np.float64)
    for i, lp, w in zip(ids, logprobs, weights):
        p = np.exp(lp.astype(np.float64))  # [R, K_m]
        a = np.minimum(p.min(axis=1), np.clip(1.0 - p.sum(axis=1), 0.0, 1.0))  # [R]: bound of an unknown entry
        kept = (merged_ids[:, :, None] == i.astype(np.int64)[:, None, :]).any(axis=2)  # [R, K]
        eps += np.where(kept, 0.0, w * a[:, None])
    return eps


def merged_sequence_stats(ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], weights: Sequence[float],
                          stats: Sequence[dict[str, np.ndarray]], input_ids: np.ndarray,
                          jsd: np.ndarray) -> dict[str, np.ndarray]:
    """``seq_nll`` and ``seq_entropy`` [n] of the merged cache (see the module docstring).

    Args:
        ids / logprobs / weights: per teacher, [n, T, K_m] and the normalised weights.
        stats: per teacher, its ``seq_nll`` / ``seq_entropy`` [n].
        input_ids: [n, T] the tokens.
        jsd: [n * T] ``MergedPositions.jsd``.
    """
    n, T = input_ids.shape
    nxt = input_ids[:, 1:].astype(np.int64)[:, :, None]  # [n, T-1, 1]: position t predicts token t + 1
    log_known = np.full((n, T - 1), -np.inf)
    for i, lp, w in zip(ids, logprobs, weights):
        hit = i[:, :-1].astype(np.int64) == nxt  # [n, T-1, K_m]: at most one hit per position
        term = np.where(hit, lp[:, :-1].astype(np.float64), -np.inf).max(axis=2) + math.log(w)
        log_known = np.logaddexp(log_known, term)
    with np.errstate(divide="ignore"):
        nll_known = -log_known.mean(axis=1)  # inf where a next token is in no teacher's top-k
    nll_jensen = sum(w * s["seq_nll"].astype(np.float64) for w, s in zip(weights, stats))
    entropy = sum(w * s["seq_entropy"].astype(np.float64) for w, s in zip(weights, stats))
    return {"seq_nll": np.minimum(nll_known, nll_jensen).astype(np.float32),
            "seq_entropy": (entropy + jsd.reshape(n, T).mean(axis=1)).astype(np.float32)}
