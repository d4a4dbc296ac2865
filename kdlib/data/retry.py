"""Retries with exponential backoff and jitter: the one policy every remote shard source uses.

``kdlib.data.remote`` (HTTP) and ``kdlib.data.sources.FsspecShardSource`` (object stores) wait the same way
between attempts: ``min(max_backoff_s, backoff_s * 2**(attempt - 1))``, times a random factor in [0.5, 1).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

__all__ = ["RetryPolicy"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a failed fetch.

    Args:
        max_retries: retries after the first attempt (0: none).
        backoff_s: the first wait; doubled per retry, capped at ``max_backoff_s``, with jitter.
    """

    max_retries: int = 8
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def delay_s(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (1-based), jitter included."""
        return min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1))) * (0.5 + random.random() / 2)

    def sleep(self, attempt: int) -> None:
        time.sleep(self.delay_s(attempt))

    def call(self, fn: Callable[[], T], what: str, final: tuple[type[BaseException], ...],
             give_up: Callable[[int, BaseException], BaseException]) -> T:
        """``fn()``, retried on any ``Exception`` that is not one of ``final`` (those propagate at once).

        Args:
            fn: the attempt.
            what: what is fetched, for the log line of each retry.
            final: exceptions that no retry can fix (a missing object, refused credentials...).
            give_up: the exception to raise after the last attempt, from (attempts made, last error).
        """
        attempt = 0
        while True:
            try:
                return fn()
            except final:
                raise
            except Exception as exc:  # noqa: BLE001 - transport errors of any fsspec backend
                attempt += 1
                if attempt > self.max_retries:
                    raise give_up(attempt, exc) from exc
                log.warning("kdcache: %s fetching %s (%s); retry %d/%d", type(exc).__name__, what, exc,
                            attempt, self.max_retries)
                self.sleep(attempt)
