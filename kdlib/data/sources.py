"""Shard sources: where a reader gets a cache's manifest and its stored (compressed) shard bytes.

A ``CacheReader`` does not care whether a cache sits in a directory or behind ``kdcache serve``: it asks a
source for the manifest's bytes and for one stored shard at a time, and does everything after that (sha256
check, decoding, memory maps) itself. ``LocalShardSource`` reads a directory on a local or mounted
filesystem; ``FsspecShardSource`` reads an object store (``s3://bucket/prefix``, any fsspec URL);
``kdlib.data.remote.HttpShardSource`` reads over HTTP.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path
from typing import Any, Mapping, Protocol

from cache_server import format as fmt
from cache_server.format import CacheError, CorruptShardError, storage
from kdlib.data.retry import RetryPolicy

__all__ = ["ShardSource", "LocalShardSource", "FsspecShardSource", "ObjectStoreError"]

log = logging.getLogger(__name__)


class ShardSource(Protocol):
    """Where stored (compressed) shard bytes come from: a local directory or an HTTP server.

    Attributes:
        description: the path or URL, for messages.
        checks_shards: (optional, default False) ``read_shard`` itself checks the bytes against the entry of
            the source's ``manifest`` attribute; the store then does not hash them again when that entry is the
            one it holds.
    """

    description: str

    def manifest_bytes(self) -> bytes:
        """The manifest file's exact bytes (they key the decoded-copy directory)."""
        ...

    def read_shard(self, array: str, shard_index: int, ndim: int) -> bytes | memoryview:
        """The stored bytes of one shard of ``array`` (``ndim`` dimensions; any bytes-like object, e.g. a
        memory map); the caller checks them against the manifest."""
        ...

    def close(self) -> None:
        """Release connections or files (the source reopens them on use)."""
        ...


class LocalShardSource:
    """Stored shards of a cache directory on a local (or mounted) filesystem.

    Args:
        cache_dir: the cache directory (the one holding ``manifest.json``).
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.description = str(self.cache_dir)

    def manifest_bytes(self) -> bytes:
        """The manifest's bytes; the format module refuses (and says why) a missing directory, a build
        running on it, an unfinished build, or not a cache."""
        return fmt.read_manifest_bytes(self.cache_dir)

    def read_shard(self, array: str, shard_index: int, ndim: int) -> bytes | memoryview:
        """The stored bytes of one shard (a read-only memory map of its file), or ``CorruptShardError`` naming it
        when its file is missing.

        Mapped, not read: the digest check and the decompression read the page cache's pages in place, instead
        of a fresh 12 MB buffer being faulted in and copied into first (~15 ms of a cold shard's ~100 ms). The
        map lives as long as the returned view. A build never rewrites a shard file in place (it removes it and
        writes a new file), so the mapped bytes stay those of the file that was opened.
        """
        path = self.cache_dir / fmt.shard_relpath(array, shard_index, ndim)
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size == 0:
                    return b""  # mmap refuses empty files; the size check then reports the damage
                return memoryview(mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ))
        except FileNotFoundError:
            raise CorruptShardError(array, shard_index, "shard file is missing", where=str(path)) from None

    def close(self) -> None:
        """Nothing to release: files are opened per read."""


class ObjectStoreError(CacheError):
    """The object store stayed unreachable (or kept failing) through every retry."""


# Errors no retry fixes: a missing object, refused credentials, bad options, our own refusals, bugs.
_FINAL_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, CacheError, AttributeError, TypeError,
                 KeyError, ImportError)


class FsspecShardSource:
    """Stored shards of a cache on an object store (any fsspec URL: ``s3://bucket/prefix``, ``gs://...``).

    Every object is read whole; transport errors are retried with the same backoff as the HTTP client
    (``kdlib.data.retry.RetryPolicy``), so an endpoint that goes away and comes back mid-read only delays the
    read. Bytes that do not match the manifest's size and sha256 are fetched again ``corrupt_retries`` times and
    never used: a persistent mismatch is ``CorruptShardError`` naming the object.

    Args:
        url: the cache's location (credentials: the filesystem's usual ones, e.g. ``AWS_*`` / profiles).
        storage_options: fsspec options (default ``$KDCACHE_STORAGE_OPTIONS``).
        max_retries, backoff_s, max_backoff_s: the retry policy for transport errors.
        corrupt_retries: extra fetches of an object whose bytes do not match the manifest.
    """

    checks_shards = True  # read_shard checks the bytes against self.manifest (and fetches a damaged one again)

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None, max_retries: int = 8,
                 backoff_s: float = 0.1, max_backoff_s: float = 5.0, corrupt_retries: int = 2) -> None:
        self.store = storage.open_store(url, storage_options)
        self.description = self.store.description
        self.retry = RetryPolicy(int(max_retries), float(backoff_s), float(max_backoff_s))
        self.corrupt_retries = int(corrupt_retries)
        self.manifest: dict[str, Any] | None = None
        self.stats = {"requests": 0, "corrupt_transfers": 0, "bytes": 0}

    def _fetch(self, fn: Any, what: str) -> Any:
        def give_up(attempts: int, exc: BaseException) -> BaseException:
            return ObjectStoreError(f"{self.description}: could not fetch {what} after {attempts} attempts "
                                    f"({type(exc).__name__}: {exc}); is the object store reachable, and are "
                                    "its endpoint and credentials right?")

        self.stats["requests"] += 1
        return self.retry.call(fn, what, _FINAL_ERRORS, give_up)

    def manifest_bytes(self) -> bytes:
        """The manifest object's bytes; a prefix without one is refused (an unfinished build, or not a cache)."""
        raw = self._fetch(lambda: fmt.read_object_manifest(self.store), "the manifest")
        self.manifest = fmt.parse_manifest(raw, source=self.store.child_url(fmt.MANIFEST_NAME))
        return raw

    def read_shard(self, array: str, shard_index: int, ndim: int) -> bytes:
        """The stored bytes of one shard, checked against the manifest (fetched again if they do not match)."""
        if self.manifest is None:
            self.manifest_bytes()
        relpath = fmt.shard_relpath(array, shard_index, ndim)
        where = self.store.child_url(relpath)
        expected = self.manifest["shards"][array][shard_index]
        error: CorruptShardError | None = None
        for _ in range(1 + self.corrupt_retries):
            try:
                raw = self._fetch(lambda: self.store.read_bytes(relpath), f"shard {shard_index} of {array!r}")
            except FileNotFoundError:
                raise CorruptShardError(array, shard_index, "the shard object is missing", where=where) from None
            self.stats["bytes"] += len(raw)
            try:
                fmt.verify_shard_bytes(raw, expected, array, shard_index, where=where)
                return raw
            except CorruptShardError as exc:
                error = exc
                self.stats["corrupt_transfers"] += 1
                log.warning("kdcache: %s; fetching it again", exc)
        raise error

    def close(self) -> None:
        """Nothing to release: the filesystem object is per process and reused."""
