"""Shard sources: where a reader gets a cache's manifest and its stored (compressed) shard bytes.

A ``CacheReader`` does not care whether a cache sits in a directory or behind ``kdcache serve``: it asks a
source for the manifest's bytes and for one stored shard at a time, and does everything after that (sha256
check, decoding, memory maps) itself. ``LocalShardSource`` reads a directory on a local or mounted
filesystem; ``kdlib.data.remote.HttpShardSource`` reads over HTTP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from cache_server import format as fmt
from cache_server.format import CorruptShardError

__all__ = ["ShardSource", "LocalShardSource"]


class ShardSource(Protocol):
    """Where stored (compressed) shard bytes come from: a local directory or an HTTP server.

    Attributes:
        description: the path or URL, for messages.
    """

    description: str

    def manifest_bytes(self) -> bytes:
        """The manifest file's exact bytes (they key the decoded-copy directory)."""
        ...

    def read_shard(self, array: str, shard_index: int, ndim: int) -> bytes:
        """The stored bytes of one shard of ``array`` (``ndim`` dimensions); the caller checks the sha256."""
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

    def read_shard(self, array: str, shard_index: int, ndim: int) -> bytes:
        """The stored bytes of one shard, or ``CorruptShardError`` naming it when its file is missing."""
        path = self.cache_dir / fmt.shard_relpath(array, shard_index, ndim)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise CorruptShardError(array, shard_index, "shard file is missing", where=str(path)) from None

    def close(self) -> None:
        """Nothing to release: files are opened per read."""
