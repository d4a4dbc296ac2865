"""Errors of the cache format: what readers, the server and ``kdcache verify`` raise and catch.

Each error carries structured fields (which array, which shard, why, where) so that callers report or act on
them without parsing message text; the message itself says how to repair the cache.
"""

from __future__ import annotations

__all__ = ["CacheError", "CorruptShardError", "REPAIR_HINT"]

# The one repair path for damaged or missing stored shards: the build re-verifies every shard it finds
# against the manifest and rewrites only the bad ones, so nobody has to delete files by hand.
REPAIR_HINT = (
    "to repair it, rerun the same `kdcache build` command you built the cache with (`kdcache info DIR` prints "
    "its arguments): it re-verifies every shard against the manifest and rebuilds only the damaged or missing "
    "ones (and rewrites damaged Zarr metadata); or copy the cache again from an intact source"
)


class CacheError(Exception):
    """A cache is missing, incomplete, of an unknown version, or otherwise unusable."""


class CorruptShardError(CacheError):
    """A stored shard's bytes do not match the manifest's size and sha256, cannot be decoded, or are missing.

    Attributes:
        array: name of the array (``topk_ids``, ...).
        shard_index: index of the shard in that array.
        reason: what is wrong, without the location or the repair hint (``"shard file is missing"``).
        where: where the shard lives (a file path, a URL or a cache name); ``""`` when unknown.
    """

    def __init__(self, array: str, shard_index: int, reason: str, where: str = "") -> None:
        self.array = array
        self.shard_index = int(shard_index)
        self.reason = reason
        self.where = str(where)
        location = f" ({self.where})" if self.where else ""
        super().__init__(
            f"corrupt shard: array {array!r} shard {self.shard_index}{location}: {reason}; {REPAIR_HINT}. "
            "Run `kdcache verify DIR` to list every damaged shard."
        )

    @property
    def path(self) -> str:
        """Alias of :attr:`where` for the common case of a local file."""
        return self.where

    def __reduce__(self):
        # Exceptions pickle as cls(*args) by default, which would pass the message as `array`.
        return type(self), (self.array, self.shard_index, self.reason, self.where)
