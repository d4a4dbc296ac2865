"""The manifest of a finished build, assembled from one journal entry per shard.

A journal entry (``{"shard": i, "files": {array: {"sha256", "nbytes"}}, "stats": {...}}``) holds sums, not
means, so entries combine exactly whatever the order or the process that wrote them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from typing import Any, Mapping

import numpy as np

from cache_server import format as fmt

__all__ = ["shard_stats", "layout_dict", "manifest_from_entries", "STATS_ARRAYS"]

# The arrays shard_stats reads (a repair decodes just these from shards it did not rewrite).
STATS_ARRAYS = ("input_ids", "topk_logprobs", "seq_nll", "seq_entropy")


def shard_stats(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Sums (not means) of one shard's statistics, so that shards combine exactly in the manifest."""
    logprobs = np.asarray(arrays["topk_logprobs"], dtype=np.float64)
    tail = np.clip(1.0 - np.exp(logprobs).sum(axis=-1), 0.0, 1.0)
    return {
        "positions": int(tail.size),
        "sequences": int(np.asarray(arrays["seq_nll"]).shape[0]),
        "tail_mass_sum": float(tail.sum()),
        "seq_entropy_sum": float(np.asarray(arrays["seq_entropy"], dtype=np.float64).sum()),
        "seq_nll_sum": float(np.asarray(arrays["seq_nll"], dtype=np.float64).sum()),
        "input_ids_sha256": hashlib.sha256(np.ascontiguousarray(arrays["input_ids"]).tobytes()).hexdigest(),
    }


def layout_dict(layout: fmt.CacheLayout) -> dict[str, Any]:
    """The manifest's ``layout`` field (also the build's resume key, with the settings)."""
    return {
        "num_sequences": layout.num_sequences,
        "seq_len": layout.seq_len,
        "topk": layout.topk,
        "vocab_size": layout.vocab_size,
        "temperatures": list(layout.temperatures),
        "logprob_dtype": layout.logprob_dtype,
        "shard_seqs": layout.shard_seqs,
        "chunk_seqs": layout.chunk_seqs,
        "codec": layout.codec,
    }


def manifest_from_entries(
    layout: fmt.CacheLayout,
    settings: Mapping[str, Any],
    manifest_fields: Mapping[str, Any],
    entries: list[Mapping[str, Any]],
) -> dict[str, Any]:
    """The manifest of a cache whose shard i is described by ``entries[i]``."""
    shards = {spec.name: [entry["files"][spec.name] for entry in entries] for spec in layout.arrays()}
    positions = sum(e["stats"]["positions"] for e in entries)
    sequences = sum(e["stats"]["sequences"] for e in entries)
    dataset_hash = hashlib.sha256("".join(e["stats"]["input_ids_sha256"] for e in entries).encode()).hexdigest()
    stored_bytes = sum(f["nbytes"] for files in shards.values() for f in files)
    manifest: dict[str, Any] = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "tool_version": _tool_version(),
        "created_at": _created_at(),
        "alignment": fmt.ALIGNMENT_CONVENTION,
        "num_sequences": layout.num_sequences,
        "seq_len": layout.seq_len,
        "topk": layout.topk,
        "vocab_size": layout.vocab_size,
        "temperatures": list(layout.temperatures),
        "shard_seqs": layout.shard_seqs,
        "chunk_seqs": layout.chunk_seqs,
        "num_shards": layout.num_shards,
        "codec": layout.codec,
        "layout": layout_dict(layout),
        "arrays": {
            spec.name: {"shape": list(spec.shape(layout.num_sequences)), "dtype": spec.dtype.name}
            for spec in layout.arrays()
        },
        "shards": shards,
        "build_args": dict(settings),
        "dataset_fingerprint": "sha256:" + dataset_hash,
        "stats": {
            "tokens": positions,
            "stored_bytes": stored_bytes,
            "bytes_per_token": stored_bytes / positions,
            "mean_tail_mass": sum(e["stats"]["tail_mass_sum"] for e in entries) / positions,
            "mean_entropy": sum(e["stats"]["seq_entropy_sum"] for e in entries) / sequences,
            "mean_nll": sum(e["stats"]["seq_nll_sum"] for e in entries) / sequences,
        },
    }
    manifest.update(manifest_fields)
    return manifest


def _created_at() -> str:
    """UTC creation time; honours SOURCE_DATE_EPOCH so builds can be byte-for-byte reproducible."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        if epoch and epoch.isdigit()
        else _dt.datetime.now(_dt.timezone.utc)
    )
    return when.replace(microsecond=0).isoformat()


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("kdcache")
    except Exception:
        return "0.1.0"
