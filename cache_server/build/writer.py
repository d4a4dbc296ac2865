"""Crash-safe, resumable writer of a kdcache directory (or object-store prefix).

The writer owns the persistent state of a build, not the teacher computation (see ``pipeline.py``):

* ``DIR/.kdcache-build/settings.json`` — the settings that determine the cache's bytes. A rerun with equal
  settings resumes; different settings are refused unless ``overwrite=True``.
* ``DIR/.kdcache-build/shards/{i}.json`` — written atomically AFTER shard i's files are complete on disk, with
  their sha256 and sizes and the shard's statistics. A shard without a journal entry is (re)written whole,
  so a SIGKILL at any moment loses at most the shards in flight, and a shard whose write failed (a full
  disk) is never journaled.
* ``DIR/manifest.json`` — written atomically (tmp + rename) only when every shard is journaled. Readers refuse
  a directory without it, so a half-built cache can never be read as a complete one.
* ``DIR/.kdcache-build/lock.rank{R}`` (and ``lock.start``) — the build lock of
  ``cache_server.format.build_lock``, held by the build process (not by this class); the writer never
  deletes a lock file while it clears the state.

Shard files are deterministic functions of their data and codec, so a resumed build is bitwise identical to
an uninterrupted one. Several processes (one per GPU) may share a build: process ``rank`` of ``world_size``
writes shards ``i % world_size == rank``; rank 0 creates the metadata, the last one to finish writes the
manifest. A finished cache whose shard files were damaged is repaired in place (:meth:`CacheWriter.begin_repair`).

``out_dir`` may be an object-store URL (``s3://bucket/prefix``): the same state lives there as whole objects,
zarr writes each shard into a local staging directory first, and the shard's objects are uploaded before its
journal object (``objstore.py``; what the directory or prefix holds is ``dirstate.py``'s business).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cache_server import format as fmt
from cache_server.build import space
from cache_server.build.assemble import STATS_ARRAYS, layout_dict, manifest_from_entries, shard_stats
from cache_server.build.dirstate import (
    JOURNAL_DIR,
    SETTINGS_NAME,
    STATE_DIR,
    BuildStateError,
    DirState,
    check_existing,
    journal_entries,
    read_dir_state,
)
from cache_server.build.objstore import ObjectOutput
from cache_server.format import storage
from cache_server.format.build_lock import is_lock_file

__all__ = [
    "CacheWriter",
    "BuildStateError",
    "DirState",
    "STATE_DIR",
    "atomic_write_bytes",
    "read_dir_state",
    "check_existing",
    "journal_entries",
]

_SETTINGS_NAME = SETTINGS_NAME
_JOURNAL_DIR = JOURNAL_DIR


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written temporary behind
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_lock_file(path: Path) -> bool:
    return is_lock_file(path.name)  # build_lock's lock files: kept whenever the state is cleared


def _clear_state_dir(state_dir: Path) -> None:
    """Remove the build state except the build-lock files (held by running builds), and the directory if empty."""
    if not state_dir.is_dir():
        return
    for child in state_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        elif not _is_lock_file(child):
            child.unlink(missing_ok=True)
    try:
        state_dir.rmdir()
    except OSError:
        pass  # a lock file is left: its build removes it when it ends


# ------------------------------------------------------------------ the writer


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
        wait_for_rank0_s: how long a rank > 0 waits for rank 0 to create the metadata.
        storage_options: fsspec options when ``out_dir`` is an object-store URL (``s3://bucket/prefix``; default
            ``$KDCACHE_STORAGE_OPTIONS``). Then zarr writes each shard into a local staging directory
            (``self.out_dir``) and the shard is uploaded as whole objects before it is journaled (``objstore.py``).
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
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self._remote = ObjectOutput(str(out_dir), storage_options) if storage.is_url(out_dir) else None
        self.location: str | Path = str(out_dir) if self._remote is not None else Path(out_dir)
        self.out_dir = self._remote.staging if self._remote is not None else Path(out_dir)
        self.layout = layout
        self.settings = json.loads(json.dumps(dict(settings), sort_keys=True))  # normalized, JSON-only
        self.manifest_fields = dict(manifest_fields or {})
        self.rank, self.world_size = rank, world_size
        self.state_dir = self.out_dir / STATE_DIR
        self.journal_dir = self.state_dir / _JOURNAL_DIR
        self.already_complete = False
        self._repair: list[int] | None = None  # shards being rewritten in a finished cache
        self._repaired: dict[int, dict[str, Any]] = {}
        self.changed_shards: list[int] = []  # repaired shards whose new bytes differ from the old manifest
        if rank == 0:
            self._prepare(overwrite)
        else:
            self._wait_for_state(wait_for_rank0_s)

    # ------------------------------------------------------------------ setup / resume

    def _settings_blob(self) -> dict[str, Any]:
        return {"layout": layout_dict(self.layout), "settings": self.settings}

    def _prepare(self, overwrite: bool) -> None:
        action = check_existing(read_dir_state(self.location), self.layout, self.settings, overwrite=overwrite)
        if self._remote is not None and action == "complete":
            self.already_complete = True
            self._remote.clear_state()  # a crash between the manifest and the journal's removal leaves the latter
            self._remote.prepare("resume", self.layout, b"")  # staging metadata only: a repair writes shards there
            return
        if self._remote is not None:
            self._remote.prepare(action, self.layout, fmt.manifest_bytes(self._settings_blob()))
            return
        if action == "complete":
            self.already_complete = True
            # A crash between writing the manifest and removing the build state leaves the latter.
            _clear_state_dir(self.state_dir)
            return
        if action == "resume":
            return
        if action == "restart":
            self._wipe()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fmt.create_arrays(self.out_dir, self.layout, attributes=fmt.GROUP_ATTRIBUTES)
            self.journal_dir.mkdir(parents=True, exist_ok=True)
            # settings.json last: its presence means "metadata complete, shards may be written".
            atomic_write_bytes(self.state_dir / _SETTINGS_NAME, fmt.manifest_bytes(self._settings_blob()))
        except OSError as exc:
            if space.is_out_of_space(exc):
                raise space.out_of_space_error(self.out_dir, self.layout, [], "creating the cache metadata") from exc
            raise

    def _wipe(self) -> None:
        """Remove a previous cache's files (only ever called on a directory known to be a kdcache cache)."""
        for child in self.out_dir.iterdir():
            if child.name == STATE_DIR and child.is_dir():
                _clear_state_dir(child)
            elif child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _wait_for_state(self, timeout_s: float) -> None:
        if self._remote is not None:
            self.already_complete = self._remote.wait_for_settings(self.layout, self._settings_blob(), self.rank,
                                                                   timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        settings_path = self.state_dir / _SETTINGS_NAME
        while not settings_path.exists():
            if (self.out_dir / fmt.MANIFEST_NAME).exists():
                self.already_complete = True
                return
            if time.monotonic() > deadline:
                raise BuildStateError(f"rank {self.rank}: rank 0 did not create {settings_path} within {timeout_s}s; "
                                      "start rank 0 of this build (or rerun it) first")
            time.sleep(0.2)
        if json.loads(settings_path.read_text()) != self._settings_blob():
            raise BuildStateError(f"rank {self.rank}: settings differ from rank 0's build in {str(self.out_dir)!r}; "
                                  "run every rank with the same arguments")

    # ------------------------------------------------------------------ shards

    def _journal_path(self, shard_index: int) -> Path:
        return self.journal_dir / f"{shard_index}.json"

    def completed_shards(self) -> set[int]:
        if self.already_complete:
            return set(range(self.layout.num_shards))
        if self._repair is not None:
            return set(range(self.layout.num_shards)) - set(self.pending_shards())
        if self._remote is not None:
            return self._remote.journaled()
        return {int(p.stem) for p in self.journal_dir.glob("*.json") if p.stem.isdigit()}

    def pending_shards(self) -> list[int]:
        """Shards this rank still has to write, in order."""
        if self.already_complete:
            return []
        if self._repair is not None:
            return [i for i in self._repair if i % self.world_size == self.rank and i not in self._repaired]
        done = self.completed_shards()
        return [i for i in range(self.layout.num_shards) if i % self.world_size == self.rank and i not in done]

    def begin_repair(self, shards: list[int]) -> None:
        """Rewrite ``shards`` of this finished cache (their files are damaged or missing).

        The manifest stays the record while the shards are rewritten: a killed repair is simply redone
        by the next run. :meth:`finalize` then keeps the manifest byte for byte when the new files have
        the checksums it lists (the normal case: shards are deterministic), and otherwise rewrites it.
        """
        self.already_complete = False
        self._repair = sorted(set(shards))

    def _discard_shard(self, shard_index: int) -> None:
        """Delete whatever a failed write of ``shard_index`` left, so that nothing half-written remains."""
        for spec in self.layout.arrays():
            path = self.out_dir / fmt.shard_relpath(spec.name, shard_index, 1 + len(spec.trailing_shape))
            path.unlink(missing_ok=True)
            for leftover in path.parent.glob(f"{path.name}.*.partial") if path.parent.exists() else ():
                leftover.unlink(missing_ok=True)

    def write_shard(self, shard_index: int, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Write shard ``shard_index`` of every array, fsync, then journal it. Returns the journal entry.

        Raises:
            space.OutOfSpaceError: the filesystem filled up; the shard's files are removed, not journaled.
        """
        if shard_index % self.world_size != self.rank:
            raise ValueError(f"rank {self.rank} must not write shard {shard_index} (world_size {self.world_size})")
        try:
            checksums = fmt.write_shard(self.out_dir, self.layout, shard_index, arrays)
            for spec in self.layout.arrays():
                _fsync_file(self.out_dir / fmt.shard_relpath(spec.name, shard_index, 1 + len(spec.trailing_shape)))
            entry = {"shard": shard_index, "files": checksums, "stats": shard_stats(arrays)}
            if self._remote is not None:
                self._remote.commit_shard(self.layout, shard_index, entry, journal=self._repair is None)
            elif self._repair is None:
                atomic_write_bytes(self._journal_path(shard_index), fmt.manifest_bytes(entry))
        except Exception as exc:
            if not space.is_out_of_space(exc):
                raise
            self._discard_shard(shard_index)
            written = journal_entries(self.out_dir) + list(self._repaired.values())
            raise space.out_of_space_error(self.out_dir, self.layout, written, f"writing shard {shard_index}") from exc
        if self._repair is not None:
            self._repaired[shard_index] = entry
        return entry

    # ------------------------------------------------------------------ finish

    @property
    def repairing(self) -> bool:
        """Whether this writer rewrites damaged shards of a finished cache (see :meth:`begin_repair`)."""
        return self._repair is not None

    @property
    def repaired_shards(self) -> list[int]:
        """The shards a repair has rewritten so far."""
        return sorted(self._repaired)

    def is_complete(self) -> bool:
        return len(self.completed_shards()) == self.layout.num_shards

    def finalize(self) -> dict[str, Any] | None:
        """Write manifest.json if every shard is journaled; return it (None if shards are missing)."""
        if self._repair is not None:
            return self._finish_repair()
        if self._remote is not None:
            return self._finalize_remote()
        manifest_path = self.out_dir / fmt.MANIFEST_NAME
        if self.already_complete or manifest_path.exists():
            return fmt.load_manifest(self.out_dir, during_build=True)
        if not self.is_complete():
            # Another rank may have finalized (and removed the journal) between the two checks.
            return fmt.load_manifest(self.out_dir, during_build=True) if manifest_path.exists() else None
        # Several ranks may see "all shards journaled" at once: the first to take this lock writes the
        # manifest, the others find it when they get the lock. The kernel drops the lock of a killed process.
        fd = os.open(self.state_dir / "finalize.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if manifest_path.exists():
                return fmt.load_manifest(self.out_dir, during_build=True)
            entries = sorted(journal_entries(self.out_dir), key=lambda e: int(e["shard"]))
            manifest = manifest_from_entries(self.layout, self.settings, self.manifest_fields, entries)
            self._write_manifest(manifest)
            _clear_state_dir(self.state_dir)
            return manifest
        finally:
            os.close(fd)

    def _finalize_remote(self) -> dict[str, Any] | None:
        """The object-store finalize: the manifest in one PUT once every shard is journaled, then the journal goes."""
        manifest = self._remote.load_manifest()
        if manifest is None and not self.already_complete and self.is_complete():
            manifest = manifest_from_entries(self.layout, self.settings, self.manifest_fields, self._remote.entries())
            self._remote.write_manifest(manifest)
        if manifest is not None:
            self._remote.clear_state()
        return manifest

    def _write_manifest(self, manifest: Mapping[str, Any]) -> None:
        if self._remote is not None:
            self._remote.write_manifest(manifest)
            return
        try:
            atomic_write_bytes(self.out_dir / fmt.MANIFEST_NAME, fmt.manifest_bytes(manifest))
        except OSError as exc:
            if space.is_out_of_space(exc):
                written = journal_entries(self.out_dir) or list(self._repaired.values())
                raise space.out_of_space_error(self.out_dir, self.layout, written, "writing the manifest") from exc
            raise

    def _finish_repair(self) -> dict[str, Any]:
        """The manifest after a repair: unchanged when every rewritten file has its old checksum."""
        manifest = fmt.load_manifest(self.location, during_build=True)
        self.changed_shards = sorted(
            i for i, entry in self._repaired.items()
            if any(entry["files"][name] != manifest["shards"][name][i] for name in entry["files"])
        )
        if not self.changed_shards:
            return manifest
        if self.world_size > 1:
            raise BuildStateError(
                f"shards {self.changed_shards} of {str(self.out_dir)!r} were rebuilt with other bytes than the "
                "manifest records (the teacher's output depends on --batch-size or --device), so the manifest "
                "must be rewritten from every shard: rerun this command as one process, without --rank and "
                "--world-size"
            )
        entries = [self._repaired.get(i) or self._entry_from_disk(i, manifest) for i in range(self.layout.num_shards)]
        fields = {k: v for k, v in manifest.items() if k in self.manifest_fields}
        new_manifest = manifest_from_entries(self.layout, self.settings, fields, entries)
        self._write_manifest(new_manifest)
        return new_manifest

    def _entry_from_disk(self, shard_index: int, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The journal entry of an intact shard, its statistics decoded from its files."""
        specs = {spec.name: spec for spec in self.layout.arrays()}
        arrays = {}
        for name in (n for n in STATS_ARRAYS if n in specs):  # the kinds' arrays differ (topk/sample)
            spec = specs[name]
            relpath = fmt.shard_relpath(name, shard_index, 1 + len(spec.trailing_shape))
            raw = self._remote.read_shard(relpath) if self._remote is not None else (self.out_dir / relpath).read_bytes()
            arrays[name] = fmt.decode_shard(raw, spec, self.layout, shard_index)
        files = {name: manifest["shards"][name][shard_index] for name in specs}
        return {"shard": shard_index, "files": files, "stats": shard_stats(arrays)}
