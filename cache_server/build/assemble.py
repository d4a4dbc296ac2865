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

# The arrays shard_stats reads (a repair decodes just these from shards it did not rewrite); a cache has
# topk_logprobs, sample_counts or both (target kinds).
STATS_ARRAYS = ("input_ids", "topk_logprobs", "sample_counts", "seq_nll", "seq_entropy")


def _target_stats(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Top-k tail mass (topk / hybrid) and the draws kept in the sample slots (sample / hybrid), as sums."""
    stats: dict[str, Any] = {}
    if "topk_logprobs" in arrays:
        logprobs = np.asarray(arrays["topk_logprobs"], dtype=np.float64)
        stats["tail_mass_sum"] = float(np.clip(1.0 - np.exp(logprobs).sum(axis=-1), 0.0, 1.0).sum())
    if "sample_counts" in arrays:
        counts = np.asarray(arrays["sample_counts"])
        stats["sample_draws_kept"] = int(counts.sum(dtype=np.int64))
        stats["sample_unique_sum"] = int(np.count_nonzero(counts))
    return stats


def shard_stats(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Sums (not means) of one shard's statistics, so that shards combine exactly in the manifest."""
    input_ids = np.asarray(arrays["input_ids"])
    return {
        "positions": int(input_ids.size),
        "sequences": int(np.asarray(arrays["seq_nll"]).shape[0]),
        **_target_stats(arrays),
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
        **_targets_layout(layout),
        **({"offsets": True} if layout.offsets else {}),
    }


def _targets_layout(layout: fmt.CacheLayout) -> dict[str, Any]:
    """The target-kind fields of ``layout_dict``: none for a top-k cache, whose manifest stays as it was."""
    if not layout.has_samples:
        return {}
    return {"targets": layout.targets, "samples": layout.samples, "sample_slots": layout.sample_slots,
            "sample_temperature": layout.sample_temperature, "sample_logprobs": layout.sample_logprobs}


def _targets_fields(layout: fmt.CacheLayout, settings: Mapping[str, Any],
                    entries: list[Mapping[str, Any]], positions: int) -> dict[str, Any]:
    """The manifest's ``targets`` object and sampling stats (sample / hybrid caches only)."""
    if not layout.has_samples:
        return {}
    from cache_server.build.sampling import layout_seed  # torch: only a sampled build gets here

    drawn = layout.samples * positions
    kept = sum(e["stats"]["sample_draws_kept"] for e in entries)
    return {
        "targets": {"kind": layout.targets, "samples": layout.samples, "slots": layout.sample_slots,
                    "sample_temperature": layout.sample_temperature, "sample_seed": layout_seed(layout, settings)},
        "sample_stats": {
            "truncated_draws": drawn - kept,
            "truncated_fraction": (drawn - kept) / drawn,
            "mean_unique_per_position": sum(e["stats"]["sample_unique_sum"] for e in entries) / positions,
        },
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
        **fmt.format_fields(layout),
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
            "mean_tail_mass": (sum(e["stats"]["tail_mass_sum"] for e in entries) / positions
                               if layout.has_topk else None),
            "mean_entropy": sum(e["stats"]["seq_entropy_sum"] for e in entries) / sequences,
            "mean_nll": sum(e["stats"]["seq_nll_sum"] for e in entries) / sequences,
        },
    }
    sampled = _targets_fields(layout, settings, entries, positions)
    if sampled:
        manifest["targets"] = sampled["targets"]
        manifest["stats"].update(sampled["sample_stats"])
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
