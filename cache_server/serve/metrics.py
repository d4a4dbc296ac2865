"""Prometheus metrics of the cache server and the ASGI middleware that records them.

A pure ASGI middleware (not ``BaseHTTPMiddleware``) so streamed bodies pass through untouched and the bytes
actually sent are counted. Labels use the route template (``/v1/caches/{name}/shards/{array}/{shard_index}``)
and a registered cache name, never raw request text, so label cardinality stays bounded: ``cache`` is a
registered name, ``_unknown`` for any other name in the URL, ``-`` for endpoints without a cache.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServerMetrics", "MetricsMiddleware", "NO_CACHE_LABEL", "UNKNOWN_CACHE_LABEL"]

NO_CACHE_LABEL = "-"
UNKNOWN_CACHE_LABEL = "_unknown"  # '_' cannot start a registered name, so it never collides with one
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Metrics in their own registry (several apps in one process never collide)."""

    def __init__(self, cache_names: Iterable[str]) -> None:
        self.cache_names = frozenset(cache_names)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kdcache_http_requests", "HTTP requests by cache, endpoint and status",
            ["cache", "endpoint", "method", "status"], registry=self.registry,
        )
        self.response_bytes = Counter(
            "kdcache_http_response_bytes", "Response body bytes sent", ["cache", "endpoint"], registry=self.registry
        )
        self.latency = Histogram(
            "kdcache_http_request_duration_seconds", "Time from request to the last body byte sent, by cache",
            ["cache", "endpoint"], buckets=_LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.errors = Counter(
            "kdcache_http_errors", "Responses with status >= 400 (or aborted) by cache",
            ["cache", "endpoint", "status"], registry=self.registry,
        )
        self.corrupt_shards = Counter(
            "kdcache_corrupt_shards", "Shards that failed their manifest checksum on the server",
            ["cache", "array"], registry=self.registry,
        )
        self.decoded_bytes = Gauge(
            "kdcache_decoded_cache_bytes", "Bytes of decoded shards held in memory for the Arrow endpoint",
            registry=self.registry,
        )

    def cache_label(self, scope: dict[str, Any]) -> str:
        name = scope.get("path_params", {}).get("name")
        if name is None:
            return NO_CACHE_LABEL
        return name if name in self.cache_names else UNKNOWN_CACHE_LABEL


class MetricsMiddleware:
    """Count requests, body bytes, latency and errors for every HTTP request."""

    def __init__(self, app: Callable, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        state = {"status": 0, "bytes": 0}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = int(message["status"])
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            if not state["status"]:
                state["status"] = 500
            state["aborted"] = True
            raise
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            cache = self.metrics.cache_label(scope)
            status = str(state["status"] or 500)
            m = self.metrics
            m.requests.labels(cache, endpoint, scope.get("method", ""), status).inc()
            m.response_bytes.labels(cache, endpoint).inc(state["bytes"])
            m.latency.labels(cache, endpoint).observe(time.perf_counter() - started_s)
            if state["status"] >= 400 or state.get("aborted"):
                m.errors.labels(cache, endpoint, status).inc()
