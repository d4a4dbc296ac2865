"""Read-only HTTP server for kdcache caches: the FastAPI app factory (``create_app``).

Shape notation::

    N  sequences in a cache    S  sequences per shard    T  positions    K  top-k entries

The endpoints, their paths, headers and error codes are listed in ``cache_server.format.wire`` (shared with
the client). Every endpoint but ``/healthz`` needs ``Authorization: Bearer TOKEN`` when the server has a
token. The shard endpoint serves stored (compressed) bytes with one HTTP Range and ETag = the shard's manifest
sha256; a shard file missing on disk is 404 + ``X-Kdcache-Error: shard-missing``.

The shard endpoint is the fast path (``kdlib.data.remote`` decodes and verifies on the client: least server CPU,
fewest bytes on the wire). Every endpoint touching the disk is a plain ``def`` (FastAPI's thread pool) and
file bytes are read in the thread pool too, so the event loop never blocks on disk.

The routes here only declare the HTTP surface (paths, parameters, the OpenAPI schema) and hand the request's
parts to one plain function each: ``handlers`` (caches, manifest, shards, metrics, auth) and ``rows``.
Range handling lives in ``ranges``, the registered caches in ``registry``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from fastapi import APIRouter, Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cache_server.format import wire
from cache_server.serve import handlers
from cache_server.serve.config import (
    DEFAULT_DECODED_CACHE_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_ROWS,
    ServerLimits,
    ServerState,
)
from cache_server.serve.metrics import MetricsMiddleware
from cache_server.serve.registry import RegisteredCache, register_caches
from cache_server.serve.rows import rows_response

__all__ = ["create_app"]

_SHARD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "the whole shard file"},
    206: {"content": {"application/octet-stream": {}}, "description": "the requested byte range"},
    403: {"description": "the shard file cannot be served (outside the cache directory, unreadable)"},
    404: {"description": "unknown cache, array or shard index; or the shard file is missing on the "
                         f"server ({wire.ERROR_HEADER}: {wire.SHARD_MISSING})"},
    413: {"description": "larger than the server's per-request byte limit: use Range"},
    416: {"description": "malformed, multi-part or unsatisfiable Range"},
}
_ROWS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {wire.ARROW_STREAM_MEDIA_TYPE: {}}, "description": "Arrow IPC stream, one row per sequence"},
    400: {"description": "bad arrays or start > stop"},
    413: {"description": "more rows or bytes than the server allows per request"},
    404: {"description": f"unknown cache, or a shard file is missing on the server ({wire.ERROR_HEADER})"},
    416: {"description": "rows outside the cache"},
    500: {"description": "a stored shard failed its manifest checksum (named in the detail)"},
}


def create_app(
    caches: Mapping[str, str | Path | RegisteredCache],
    token: str | None = None,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_BYTES,
) -> FastAPI:
    """Build the server app for registered caches.

    Args:
        caches: ``{name: cache directory}`` (registered and validated here) or already registered caches.
        token: bearer token required on every endpoint but ``/healthz``; None disables auth (only safe
            on a loopback address, which ``kdcache serve`` enforces).
        max_rows: most sequences one ``/rows`` request may ask for.
        max_response_bytes: most body bytes one request may ask for (decoded rows, or a shard/range);
            larger requests get 413 with the limit in the message.
        decoded_cache_bytes: memory for decoded shards behind ``/rows`` (LRU).

    Returns:
        The app; ``app.state.server`` is its ``ServerState`` (``app.state.caches``, ``app.state.metrics``).

    Raises:
        ValueError: an empty token or a non-positive limit.
        CacheError: a cache directory that cannot be registered (see ``register_caches``).
    """
    if token is not None and not token:
        raise ValueError("token must be a non-empty string or None")
    state = ServerState.create(_registered(caches), ServerLimits(max_rows, max_response_bytes), decoded_cache_bytes)
    app = FastAPI(
        title="kdcache server",
        version="1",
        description="Read-only access to offline teacher-logit caches (kdcache format v1).",
        openapi_url=None,  # served by _add_ops_routes, behind auth
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    app.state.caches = state.caches
    app.state.metrics = state.metrics
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    require_token = _token_dependency(token)
    _add_ops_routes(app, state, require_token)
    app.include_router(_v1_router(state, require_token))
    return app


def _registered(caches: Mapping[str, str | Path | RegisteredCache]) -> dict[str, RegisteredCache]:
    """Caches given by directory are registered (validated) here; registered ones are taken as they are."""
    registry = {name: value for name, value in caches.items() if isinstance(value, RegisteredCache)}
    to_register = [(name, value) for name, value in caches.items() if not isinstance(value, RegisteredCache)]
    if to_register:
        registry.update(register_caches(to_register))
    return registry


def _token_dependency(token: str | None) -> Callable[..., None]:
    """A FastAPI dependency refusing requests without the bearer token (a no-op when ``token`` is None)."""
    bearer = HTTPBearer(auto_error=False, description="the server's token (`kdcache serve --token-file`)")
    expected = token.encode() if token is not None else None

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        handlers.check_bearer_token(expected, credentials.credentials if credentials is not None else None)

    return require_token


# The nested route functions below carry no docstrings on purpose: FastAPI would publish them in the OpenAPI
# schema as operation descriptions. Their names are the schema's operation ids; keep them.


def _add_ops_routes(app: FastAPI, state: ServerState, require_token: Callable[..., None]) -> None:
    """``/healthz`` (no auth), then ``/metrics`` and ``/openapi.json`` (behind the token)."""

    @app.get(wire.HEALTHZ_PATH, tags=["ops"], summary="Liveness probe (no auth)")
    def healthz() -> dict[str, Any]:
        return handlers.healthz(state)

    ops = APIRouter(dependencies=[Depends(require_token)])

    @ops.get(wire.METRICS_PATH, tags=["ops"], summary="Prometheus metrics", response_class=Response)
    def prometheus_metrics() -> Response:
        return handlers.metrics_response(state)

    @ops.get(wire.OPENAPI_PATH, include_in_schema=False)
    def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(ops)


def _v1_router(state: ServerState, require_token: Callable[..., None]) -> APIRouter:
    """The versioned cache endpoints under ``wire.API_PREFIX``."""
    v1 = APIRouter(prefix=wire.API_PREFIX, dependencies=[Depends(require_token)], tags=["caches"])

    @v1.get(wire.CACHES_ROUTE, summary="List the registered caches")
    def list_caches() -> dict[str, Any]:
        return handlers.list_caches(state)

    @v1.get(wire.CACHE_ROUTE, summary="One cache's summary")
    def cache_summary(name: str) -> dict[str, Any]:
        return handlers.cache_summary(state, name)

    @v1.get(wire.MANIFEST_ROUTE, summary="The exact manifest.json bytes (hash them to key local state)",
            response_class=Response, responses={200: {"content": {"application/json": {}}}})
    def manifest(name: str) -> Response:
        return handlers.manifest_response(state, name)

    @v1.get(wire.SHARD_ROUTE, response_class=Response, responses=_SHARD_RESPONSES,
            summary="Stored (compressed) bytes of one shard of one array; supports a single HTTP Range")
    def shard_bytes(request: Request, name: str, array: str,
                    shard_index: int = PathParam(ge=0, le=2**62)) -> Response:
        return handlers.shard_response(state, name, array, shard_index, request.headers.get("range"),
                                       request.headers.get("if-range"))

    @v1.get(wire.ROWS_ROUTE, response_class=StreamingResponse, responses=_ROWS_RESPONSES,
            summary="Decoded sequences [start, stop) as an Arrow IPC stream (FixedSizeList columns)")
    def rows(
        name: str,
        start: int = Query(ge=0, le=2**62, description="first sequence"),
        stop: int = Query(ge=0, le=2**62, description="one past the last sequence"),
        arrays: str | None = Query(
            None, max_length=4096, description="comma-separated array names (default: every array)"
        ),
    ) -> Response:
        return rows_response(state, name, start, stop, arrays)

    return v1
