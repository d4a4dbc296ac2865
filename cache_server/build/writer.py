"""Crash-safe, resumable writer of a kdcache directory.

The writer owns the persistent state of a build, not the teacher computation (see ``job.py``):

* ``DIR/.kdcache-build/settings.json`` — the settings that determine the cache's bytes. A rerun with equal
  settings resumes; different settings are refused unless ``overwrite=True``.
* ``DIR/.kdcache-build/shards/{i}.json`` — written atomically AFTER shard i's files are complete on disk, with
  their sha256 and sizes and the shard's statistics. A shard without a journal entry is (re)written whole,
  so a SIGKILL at any moment loses at most the shards in flight.
* ``DIR/manifest.json`` — written atomically (tmp + rename) only when every shard is journaled. Readers refuse
  a directory without it, so a half-built cache can never be read as a complete one.

Shard files are deterministic functions of their data and codec, so a resumed build is bitwise identical to
an uninterrupted one. Several processes (one per GPU) may share a build: process ``rank`` of ``world_size``
writes shards ``i % world_size == rank``; rank 0 creates the metadata, the last one to finish writes the
manifest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cache_server import format as fmt

__all__ = ["CacheWriter", "BuildStateError", "atomic_write_bytes"]

STATE_DIR = ".kdcache-build"


class BuildStateError(fmt.CacheError):
    """The output directory holds something a build must not touch (or a build with other settings)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_stats(arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Sums (not means) so that shards combine exactly in the manifest."""
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


class CacheWriter:
    """Create or resume a cache directory and write its shards.

    Args:
        out_dir: the cache directory (created if missing).
        layout: array layout (sizes, dtypes, chunking, codec).
        settings: everything that determines the cache's bytes (teacher identity, data fingerprint, k, T,
            temperatures, compute dtype...). Compared on resume; stored in the manifest as ``build_args``.
        manifest_fields: extra manifest entries (``teacher``, ``tokenizer``, ``dataset``...).
        overwrite: replace an existing cache or build with different settings.
        rank / world_size: this process's part of a multi-process build.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        layout: fmt.CacheLayout,
        settings: Mapping[str, Any],
        manifest_fields: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        rank: int = 0,
        world_size: int = 1,
        wait_for_rank0_s: float = 600.0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.out_dir = Path(out_dir)
        self.layout = layout
        self.settings = json.loads(json.dumps(dict(settings), sort_keys=True))  # normalized, JSON-only
        self.manifest_fields = dict(manifest_fields or {})
        self.rank, self.world_size = rank, world_size
        self.state_dir = self.out_dir / STATE_DIR
        self.journal_dir = self.state_dir / "shards"
        self.already_complete = False
        if rank == 0:
            self._prepare(overwrite)
        else:
            self._wait_for_state(wait_for_rank0_s)

    # ------------------------------------------------------------------ setup / resume

    def _settings_blob(self) -> dict[str, Any]:
        return {"layout": _layout_dict(self.layout), "settings": self.settings}

    def _prepare(self, overwrite: bool) -> None:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise BuildStateError(f"output path {str(out)!r} is a file; pass a directory path to --out")
        if out.exists() and any(out.iterdir()):
            manifest_path = out / fmt.MANIFEST_NAME
            settings_path = self.state_dir / "settings.json"
            if manifest_path.exists():
                manifest = fmt.load_manifest(out)
                same = manifest.get("build_args") == self.settings and manifest.get("layout") == _layout_dict(
                    self.layout
                )
                if same and not overwrite:
                    self.already_complete = True
                    # A crash between writing the manifest and removing the build state leaves the latter.
                    shutil.rmtree(self.state_dir, ignore_errors=True)
                    return
                if not overwrite:
                    raise BuildStateError(
                        f"{str(out)!r} already holds a finished cache built with different settings "
                        f"({_diff(manifest.get('build_args') or {}, self.settings)}); pass --overwrite to "
                        "replace it, or choose another --out"
                    )
                self._wipe()
            elif settings_path.exists():
                previous = json.loads(settings_path.read_text())
                if previous == self._settings_blob():
                    # Resume. A finalize lock left by a crash during finalize would block forever: drop it.
                    (self.state_dir / "finalize.lock").unlink(missing_ok=True)
                    return
                if not overwrite:
                    raise BuildStateError(
                        f"{str(out)!r} holds an unfinished build with different settings "
                        f"({_diff(previous.get('settings', {}), self.settings)}); rerun with the original "
                        "arguments to resume it, or pass --overwrite to start over"
                    )
                self._wipe()
            else:
                raise BuildStateError(
                    f"{str(out)!r} exists, is not empty and is not a kdcache cache; refusing to write into it "
                    "(nothing was changed). Choose an empty or new --out directory"
                )
        out.mkdir(parents=True, exist_ok=True)
        attributes = {"kdcache": {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION}}
        fmt.create_arrays(out, self.layout, attributes=attributes)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        # settings.json last: its presence means "metadata complete, shards may be written".
        atomic_write_bytes(self.state_dir / "settings.json", fmt.manifest_bytes(self._settings_blob()))

    def _wipe(self) -> None:
        """Remove a previous cache's files (only ever called on a directory known to be a kdcache cache)."""
        for child in self.out_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _wait_for_manifest(self, timeout_s: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not (self.out_dir / fmt.MANIFEST_NAME).exists():
            if time.monotonic() > deadline:
                raise BuildStateError(f"another process is finalizing {str(self.out_dir)!r} but wrote no manifest "
                                      f"within {timeout_s}s; rerun the build to finish it")
            time.sleep(0.1)
        return fmt.load_manifest(self.out_dir)

    def _wait_for_state(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        settings_path = self.state_dir / "settings.json"
        while not settings_path.exists():
            if (self.out_dir / fmt.MANIFEST_NAME).exists():
                self.already_complete = True
                return
            if time.monotonic() > deadline:
                raise BuildStateError(f"rank {self.rank}: rank 0 did not create {settings_path} within {timeout_s}s")
            time.sleep(0.2)
        if json.loads(settings_path.read_text()) != self._settings_blob():
            raise BuildStateError(f"rank {self.rank}: settings differ from rank 0's build in {str(self.out_dir)!r}")

    # ------------------------------------------------------------------ shards

    def _journal_path(self, shard_index: int) -> Path:
        return self.journal_dir / f"{shard_index}.json"

    def completed_shards(self) -> set[int]:
        if self.already_complete:
            return set(range(self.layout.num_shards))
        done = set()
        for path in self.journal_dir.glob("*.json"):
            try:
                done.add(int(path.stem))
            except ValueError:
                continue
        return done

    def pending_shards(self) -> list[int]:
        """Shards this rank still has to write, in order."""
        if self.already_complete:
            return []
        done = self.completed_shards()
        return [i for i in range(self.layout.num_shards) if i % self.world_size == self.rank and i not in done]

    def write_shard(self, shard_index: int, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Write shard ``shard_index`` of every array, fsync, then journal it. Returns the journal entry."""
        if shard_index % self.world_size != self.rank:
            raise ValueError(f"rank {self.rank} must not write shard {shard_index} (world_size {self.world_size})")
        checksums = fmt.write_shard(self.out_dir, self.layout, shard_index, arrays)
        for spec in self.layout.arrays():
            _fsync_file(self.out_dir / fmt.shard_relpath(spec.name, shard_index, 1 + len(spec.trailing_shape)))
        entry = {"shard": shard_index, "files": checksums, "stats": _shard_stats(arrays)}
        atomic_write_bytes(self._journal_path(shard_index), fmt.manifest_bytes(entry))
        return entry

    # ------------------------------------------------------------------ finish

    def is_complete(self) -> bool:
        return len(self.completed_shards()) == self.layout.num_shards

    def finalize(self, extra_fields: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Write manifest.json if every shard is journaled; return it (None if shards are missing)."""
        manifest_path = self.out_dir / fmt.MANIFEST_NAME
        if self.already_complete or manifest_path.exists():
            return fmt.load_manifest(self.out_dir)
        if not self.is_complete():
            # Another rank may have finalized (and removed the journal) between the two checks.
            return fmt.load_manifest(self.out_dir) if manifest_path.exists() else None
        # Several ranks may see "all shards journaled" at once: one writes the manifest, the others wait for it.
        lock = self.state_dir / "finalize.lock"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except (FileExistsError, FileNotFoundError):
            return self._wait_for_manifest()
        layout = self.layout
        entries = [json.loads(self._journal_path(i).read_text()) for i in range(layout.num_shards)]
        shards = {
            spec.name: [entry["files"][spec.name] for entry in entries] for spec in layout.arrays()
        }
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
            "layout": _layout_dict(layout),
            "arrays": {
                spec.name: {"shape": list(spec.shape(layout.num_sequences)), "dtype": spec.dtype.name}
                for spec in layout.arrays()
            },
            "shards": shards,
            "build_args": self.settings,
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
        manifest.update(self.manifest_fields)
        manifest.update(extra_fields or {})
        atomic_write_bytes(self.out_dir / fmt.MANIFEST_NAME, fmt.manifest_bytes(manifest))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return manifest


def _layout_dict(layout: fmt.CacheLayout) -> dict[str, Any]:
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


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "layout differs"
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5])


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
