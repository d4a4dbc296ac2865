"""The server's endpoints as plain functions of the shared state and the request's parts (no FastAPI routing).

Shape notation::

    N  sequences in a cache    S  sequences per shard

``create_app`` (``cache_server.serve.app``) routes each endpoint to one function here; each returns a
response or JSON-able dict, or raises ``HTTPException`` with the status and a message for the client. Error
messages name caches, arrays and shards, never filesystem paths, and echo request text only when it is a
plain name. Every function touching the disk runs in FastAPI's thread pool (the routes are plain ``def``).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from typing import IO, Any, Mapping

from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cache_server import format as fmt
from cache_server.format import wire
from cache_server.serve.config import ServerState
from cache_server.serve.ranges import ByteWindowResponse, RangeNotSatisfiable, parse_single_range
from cache_server.serve.registry import RegisteredCache

__all__ = [
    "check_bearer_token",
    "shown",
    "find_cache",
    "healthz",
    "list_caches",
    "cache_summary",
    "metrics_response",
    "manifest_response",
    "shard_missing_response",
    "shard_response",
]

_SAFE_ECHO_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SHARD_CACHE_CONTROL = "private, max-age=3600"

log = logging.getLogger(__name__)


def check_bearer_token(expected: bytes | None, given: str | None) -> None:
    """Refuse a request without the server's token (401); ``expected`` None means auth is off.

    Args:
        expected: the server's token as bytes, or None when the server has no token.
        given: the credentials of the request's ``Authorization: Bearer`` header; None when absent.

    Raises:
        HTTPException: 401 with ``WWW-Authenticate: Bearer``.
    """
    if expected is None:
        return
    # compare_digest: the time taken does not tell an attacker how many leading bytes were right
    if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong bearer token: send 'Authorization: Bearer <token>' "
            f"(kdlib: open_cache(url, token=...) or set {wire.TOKEN_ENV})",
            headers={"WWW-Authenticate": "Bearer"},
        )


def shown(text: str) -> str:
    """Request text echoed in an error message only when it is a plain name (never a path or control chars)."""
    return repr(text) if _SAFE_ECHO_RE.match(text) and ".." not in text else "(not a valid name)"


def find_cache(state: ServerState, name: str) -> RegisteredCache:
    """The registered cache called ``name``, else 404."""
    cache = state.caches.get(name)
    if cache is None:
        raise HTTPException(404, f"no cache named {shown(name)}; GET {wire.caches_path()} lists them")
    return cache


def healthz(state: ServerState) -> dict[str, Any]:
    """Liveness: the server answers and how many caches it serves."""
    return {"status": "ok", "caches": len(state.caches)}


def list_caches(state: ServerState) -> dict[str, Any]:
    """Summaries of every registered cache."""
    return {"caches": [cache.summary() for cache in state.caches.values()]}


def cache_summary(state: ServerState, name: str) -> dict[str, Any]:
    """One cache's summary (layout, arrays, manifest hash)."""
    return find_cache(state, name).summary()


def metrics_response(state: ServerState) -> Response:
    """The Prometheus text exposition of this server's metrics."""
    state.metrics.decoded_bytes.set(state.decoded.nbytes)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def manifest_response(state: ServerState, name: str) -> Response:
    """The exact manifest.json bytes, with their sha256 as ETag and checksum header."""
    cache = find_cache(state, name)
    return Response(
        cache.manifest_raw,
        media_type="application/json",
        headers={"ETag": wire.quoted_etag(cache.manifest_sha256), wire.CHECKSUM_HEADER: cache.manifest_sha256},
    )


def shard_missing_response(name: str, array: str, shard_index: int) -> JSONResponse:
    """404 with a machine-readable reason: a missing file will not appear by retrying, so clients stop at once."""
    detail = str(fmt.CorruptShardError(array, shard_index, "the shard file is missing on the server",
                                       where=f"cache {name!r}"))
    return JSONResponse(
        {"detail": detail, "cache": name, "array": array, "shard_index": shard_index},
        status_code=404, headers={wire.ERROR_HEADER: wire.SHARD_MISSING},
    )


def _shard_entry(cache: RegisteredCache, array: str, shard_index: int) -> Mapping[str, Any]:
    """The manifest entry of a requested shard, else 404 naming what the cache has."""
    if array not in cache.specs:
        raise HTTPException(
            404, f"cache {cache.name!r} has no array {shown(array[:128])}; arrays: {sorted(cache.specs)}"
        )
    if shard_index >= cache.num_shards:
        raise HTTPException(404, f"array {array!r} has shards 0..{cache.num_shards - 1}, not {shard_index}")
    return cache.shard_entry(array, shard_index)


def shard_response(state: ServerState, name: str, array: str, shard_index: int, range_header: str | None = None,
                   if_range: str | None = None) -> Response:
    """Stored (compressed) bytes of one shard: whole (200) or one validated byte range (206).

    Args:
        state: the server's state.
        name, array, shard_index: the shard, from the URL.
        range_header: the request's ``Range`` value, if any.
        if_range: the request's ``If-Range`` value; a Range is honoured only when it equals the shard's ETag
            (any other validator, e.g. a date, means "send the whole file", RFC 9110).

    Returns:
        The byte window response; 404 + ``X-Kdcache-Error: shard-missing`` when the file is gone; 416 (with
        ``Content-Range: bytes */SIZE``) for a Range that cannot be served.

    Raises:
        HTTPException: 404 unknown cache/array/shard, 403 a file that leads outside the cache or cannot be
            read, 413 more bytes than ``max_response_bytes``.
    """
    cache = find_cache(state, name)
    entry = _shard_entry(cache, array, shard_index)
    try:
        file = cache.shard_path(array, shard_index).open("rb")
    except FileNotFoundError:
        state.metrics.corrupt_shards.labels(name, array).inc()
        return shard_missing_response(name, array, shard_index)
    except (PermissionError, IsADirectoryError) as exc:
        log.warning("kdcache serve: refusing shard %d of %r in cache %r: %s", shard_index, array, name, exc)
        raise HTTPException(403, f"shard {shard_index} of array {array!r} in cache {name!r} cannot be served "
                            "(it leads outside the cache directory or is not readable); see the server log")
    try:
        return _window_response(file, entry["sha256"], range_header, if_range, state.limits.max_response_bytes)
    except BaseException:
        file.close()  # the response did not take the file over
        raise


def _window_response(file: IO[bytes], sha256: str, range_header: str | None, if_range: str | None,
                     max_bytes: int) -> Response:
    """The response for an open shard file: the window the request's Range selects, within ``max_bytes``."""
    size_bytes = os.fstat(file.fileno()).st_size  # of the file actually opened
    etag = wire.quoted_etag(sha256)
    headers = {"ETag": etag, wire.CHECKSUM_HEADER: sha256, "Cache-Control": _SHARD_CACHE_CONTROL}
    start, end = 0, size_bytes
    is_range = range_header is not None and (if_range is None or if_range == etag)
    if is_range:
        try:
            start, end = parse_single_range(range_header, size_bytes)
        except RangeNotSatisfiable as exc:
            file.close()
            return JSONResponse({"detail": str(exc)}, status_code=416,
                                headers={"Content-Range": f"bytes */{size_bytes}"})
    if end - start > max_bytes:
        raise HTTPException(
            413, f"{end - start} bytes exceed this server's limit of {max_bytes} bytes per request; "
            "fetch the shard in pieces with a Range header",
        )
    return ByteWindowResponse(file, start, end, size_bytes, max_bytes, headers, is_range=is_range)
