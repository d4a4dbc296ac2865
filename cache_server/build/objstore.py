"""A cache being built on an object store (``--out s3://bucket/prefix``): local staging, whole-object uploads.

Object stores have no rename and no flock, so the crash-safety rules of a local build become (docs/FORMAT.md,
"Object storage"):

* each shard is written by zarr into a local staging directory (exactly the bytes a local build writes),
  then uploaded file by file as whole objects (one PUT each), and only then is its journal entry
  ``PREFIX/.kdcache-build/shards/{i}.json`` written: a shard object without a journal entry is rewritten by
  the next run, so a SIGKILL at any moment loses at most the shards in flight;
* ``.kdcache-build/settings.json`` is written after the Zarr metadata objects (its presence means "metadata
  complete, shards may be written");
* ``manifest.json`` is written last, in one PUT, when every shard is journaled; then the journal objects go.
  A prefix without a manifest is never read as a cache (``format.manifest`` says "unfinished build").

Readers check every shard against the manifest's sha256, so an object overwritten or damaged after the
build is never trusted. Several ranks may write one cache; two ranks finishing at once may both write the
manifest (same shard table; ``created_at`` may differ): the last PUT wins and either one is valid.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Mapping

from cache_server import format as fmt
from cache_server.build.dirstate import JOURNAL_DIR, SETTINGS_NAME, STATE_DIR, BuildStateError, journal_entries
from cache_server.format import storage
from cache_server.format.build_lock import is_lock_file

__all__ = ["ObjectOutput"]

_METADATA_NAME = "zarr.json"


class ObjectOutput:
    """The object-store side of a ``CacheWriter`` whose output is a URL.

    Args:
        url: the cache's location (``s3://bucket/prefix``).
        storage_options: fsspec options (default ``$KDCACHE_STORAGE_OPTIONS``).

    Attributes:
        store: the :class:`storage.ObjectStore`.
        staging: the local directory zarr writes shards into before they are uploaded (removed with this object).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.store = storage.open_store(url, storage_options)
        self.staging = Path(tempfile.mkdtemp(prefix="kdcache-staging-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.staging), True)

    @property
    def description(self) -> str:
        return self.store.description

    # ------------------------------------------------------------------ setup

    def prepare(self, action: str, layout: fmt.CacheLayout, settings_blob: bytes) -> None:
        """Make the staging directory's Zarr metadata; for a new build also upload it, then settings.json."""
        if action == "restart":
            self.wipe()
        fmt.create_arrays(self.staging, layout, attributes=fmt.GROUP_ATTRIBUTES)
        if action == "resume":
            return  # the metadata objects exist (settings.json is written after them)
        for path in sorted(self.staging.rglob(_METADATA_NAME)):
            self.store.write_bytes(path.relative_to(self.staging).as_posix(), path.read_bytes())
        self.store.write_bytes(f"{STATE_DIR}/{SETTINGS_NAME}", settings_blob)

    def wait_for_settings(self, layout: fmt.CacheLayout, settings_blob: dict[str, Any], rank: int,
                          timeout_s: float) -> bool:
        """Rank > 0: wait for rank 0's settings object; True when the cache is already complete."""
        deadline = time.monotonic() + timeout_s
        name = f"{STATE_DIR}/{SETTINGS_NAME}"
        while True:
            try:
                found = json.loads(self.store.read_bytes(name))
                break
            except FileNotFoundError:
                pass
            if self.store.exists(fmt.MANIFEST_NAME):
                fmt.create_arrays(self.staging, layout, attributes=fmt.GROUP_ATTRIBUTES)  # for a repair
                return True
            if time.monotonic() > deadline:
                raise BuildStateError(f"rank {rank}: rank 0 did not create {self.store.child_url(name)} within "
                                      f"{timeout_s}s; start rank 0 of this build (or rerun it) first")
            time.sleep(0.5)
        if found != settings_blob:
            raise BuildStateError(f"rank {rank}: settings differ from rank 0's build in {self.description}; run "
                                  "every rank with the same arguments")
        fmt.create_arrays(self.staging, layout, attributes=fmt.GROUP_ATTRIBUTES)
        return False

    def wipe(self) -> None:
        """Delete every object of the prefix except build locks (only for a prefix known to hold a kdcache cache)."""
        self.store.delete([n for n in self.store.list() if not is_lock_file(n.rsplit("/", 1)[-1])])

    # ------------------------------------------------------------------ shards

    def journaled(self) -> set[int]:
        """The shards with a journal object."""
        names = (n.rsplit("/", 1)[-1] for n in self.store.list(f"{STATE_DIR}/{JOURNAL_DIR}/"))
        return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}

    def commit_shard(self, layout: fmt.CacheLayout, shard_index: int, entry: Mapping[str, Any],
                     journal: bool = True) -> None:
        """Upload shard ``shard_index``'s staged files (whole objects), then its journal entry; drop the staged files."""
        for spec in layout.arrays():
            relpath = fmt.shard_relpath(spec.name, shard_index, 1 + len(spec.trailing_shape))
            local = self.staging / relpath
            self.store.write_bytes(relpath, local.read_bytes())
            local.unlink()
        if journal:
            self.store.write_bytes(f"{STATE_DIR}/{JOURNAL_DIR}/{shard_index}.json", fmt.manifest_bytes(entry))

    def read_shard(self, relpath: str) -> bytes:
        return self.store.read_bytes(relpath)

    # ------------------------------------------------------------------ finish

    def load_manifest(self) -> dict[str, Any] | None:
        """The manifest if one was written (None if not)."""
        try:
            raw = self.store.read_bytes(fmt.MANIFEST_NAME)
        except FileNotFoundError:
            return None
        return fmt.parse_manifest(raw, source=self.store.child_url(fmt.MANIFEST_NAME))

    def entries(self) -> list[dict[str, Any]]:
        return sorted(journal_entries(self.url), key=lambda e: int(e["shard"]))

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        """The manifest, in one PUT (the last object a build writes)."""
        self.store.write_bytes(fmt.MANIFEST_NAME, fmt.manifest_bytes(manifest))

    def clear_state(self) -> None:
        """Delete settings.json and the journal (after the manifest); lock objects stay (their builds remove them)."""
        self.store.delete([n for n in self.store.list(f"{STATE_DIR}/") if not is_lock_file(n.rsplit("/", 1)[-1])])
