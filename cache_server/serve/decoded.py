"""Server-side decoded shards for the Arrow row endpoint: an in-memory LRU bounded by bytes.

Shape notation::

    n  sequences in a shard (≤ S)   T  positions   K  top-k entries

Each shard is read from disk, checked against the manifest sha256 and decoded (``format.decode_shard``) at
most once while it stays in memory; concurrent requests for the same shard wait for one decode. Runs in
FastAPI's thread pool (the endpoints are plain ``def``), never on the event loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from cache_server import format as fmt
from cache_server.serve.registry import RegisteredCache

__all__ = ["DecodedShardLRU", "MissingShardError"]


class MissingShardError(fmt.CorruptShardError):
    """The manifest lists a shard whose file is not on the server's disk (final: retrying will not help)."""


class DecodedShardLRU:
    """Decoded shards [n, *trailing] kept in memory, least recently used evicted beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, str, int], threading.Lock] = {}

    def get(self, cache: RegisteredCache, array: str, shard_index: int) -> np.ndarray:
        key = (cache.name, array, shard_index)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one decode per shard even under concurrent requests
            try:
                with self._lock:
                    hit = self._items.get(key)
                    if hit is not None:
                        return hit
                decoded = self._decode(cache, array, shard_index)
                with self._lock:
                    self._items[key] = decoded
                    self.nbytes += decoded.nbytes
                    while self.nbytes > self.max_bytes and len(self._items) > 1:
                        _, old = self._items.popitem(last=False)
                        self.nbytes -= old.nbytes
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
        return decoded

    @staticmethod
    def _decode(cache: RegisteredCache, array: str, shard_index: int) -> np.ndarray:
        # Format v2: a slot-group array also needs the stored shard that orders its group (decode_inputs).
        raws = {name: _stored_bytes(cache, name, shard_index) for name in fmt.decode_inputs(cache.layout, array)}
        decoded = fmt.decode_shard(raws[array], cache.specs[array], cache.layout, shard_index, companions=raws)
        decoded.setflags(write=False)
        return decoded


def _stored_bytes(cache: RegisteredCache, array: str, shard_index: int) -> bytes:
    """A stored shard's bytes from the server's disk, checked against the manifest's sha256."""
    path = cache.shard_path(array, shard_index)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MissingShardError(array, shard_index, "the shard file is missing on the server",
                                where=f"cache {cache.name!r}") from None
    fmt.verify_shard_bytes(raw, cache.shard_entry(array, shard_index), array, shard_index)
    return raw
