"""What every request handler of the server shares: the registered caches, the limits, metrics, decoded LRU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from cache_server.serve.decoded import DecodedShardLRU
from cache_server.serve.metrics import ServerMetrics
from cache_server.serve.registry import RegisteredCache

__all__ = [
    "DEFAULT_MAX_ROWS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_DECODED_CACHE_BYTES",
    "ServerLimits",
    "ServerState",
]

DEFAULT_MAX_ROWS = 65536
DEFAULT_MAX_RESPONSE_BYTES = 256 << 20
DEFAULT_DECODED_CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits; a request over one gets 413 with the limit in its message.

    Attributes:
        max_rows: most sequences one ``/rows`` request may ask for.
        max_response_bytes: most body bytes one request may ask for (decoded rows, or a shard/range).
    """

    max_rows: int = DEFAULT_MAX_ROWS
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    def __post_init__(self) -> None:
        if self.max_rows <= 0 or self.max_response_bytes <= 0:
            raise ValueError(
                f"max_rows and max_response_bytes must be positive, got {self.max_rows} and "
                f"{self.max_response_bytes}"
            )


@dataclass
class ServerState:
    """One server's registered caches and the state its handlers share (one per app).

    Attributes:
        caches: ``{name: RegisteredCache}``, fixed at start-up.
        limits: per-request limits.
        metrics: the Prometheus metrics (their own registry).
        decoded: decoded shards behind ``/rows`` (in memory, LRU by bytes).
    """

    caches: Mapping[str, RegisteredCache]
    limits: ServerLimits
    metrics: ServerMetrics
    decoded: DecodedShardLRU

    @classmethod
    def create(cls, caches: Mapping[str, RegisteredCache], limits: ServerLimits,
               decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_BYTES) -> "ServerState":
        """Fresh metrics and an empty decoded-shard LRU for ``caches``."""
        return cls(dict(caches), limits, ServerMetrics(caches), DecodedShardLRU(decoded_cache_bytes))
