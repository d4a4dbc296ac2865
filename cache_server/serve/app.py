"""Read-only HTTP server for kdcache caches (FastAPI app factory).

Shape notation::

    N  sequences in a cache    S  sequences per shard    T  positions    K  top-k entries

Endpoints (all but ``/healthz`` need ``Authorization: Bearer TOKEN`` when the server has a token)::

    GET /healthz                                          liveness, no auth
    GET /metrics                                          Prometheus text format
    GET /openapi.json                                     the schema of the endpoints below
    GET /v1/caches                                        registered caches (summaries)
    GET /v1/caches/{name}                                 one cache's summary
    GET /v1/caches/{name}/manifest                        the exact manifest.json bytes
    GET /v1/caches/{name}/shards/{array}/{shard_index}    stored (compressed) shard bytes; HTTP Range,
                                                          ETag = the shard's manifest sha256; a shard file
                                                          missing on disk is 404 + ``X-Kdcache-Error: shard-missing``
    GET /v1/caches/{name}/rows?start=&stop=&arrays=       decoded rows [start, stop) as an Arrow IPC stream

The shard endpoint is the fast path (``kdlib.data.remote`` decodes and verifies on the client: least server CPU,
fewest bytes on the wire). Every endpoint touching the disk is a plain ``def`` (FastAPI's thread pool) and
file bytes are read in the thread pool too, so the event loop never blocks on disk.

The server parses ``Range`` itself and sends exactly the byte window it validated (``_ByteWindowResponse``);
it never hands the request's ``Range`` to Starlette's ``FileResponse``, whose Range support depends on the
installed version (none before 0.39, multi-range, ``If-Range`` by date): the per-request byte limit holds
whatever Starlette does. Error bodies name caches, arrays and shards, never filesystem paths.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cache_server import format as fmt
from cache_server.serve.arrow import ARROW_STREAM_MEDIA_TYPE, arrow_schema, stream_rows
from cache_server.serve.decoded import DecodedShardLRU, MissingShardError
from cache_server.serve.metrics import MetricsMiddleware, ServerMetrics
from cache_server.serve.registry import RegisteredCache, register_caches

__all__ = [
    "create_app",
    "API_PREFIX",
    "CHECKSUM_HEADER",
    "ERROR_HEADER",
    "SHARD_MISSING",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "parse_single_range",
    "RangeNotSatisfiable",
]

API_PREFIX = "/v1"
CHECKSUM_HEADER = "X-Checksum-Sha256"
# Machine-readable reason on some error responses; kdlib.data.remote treats SHARD_MISSING as final (no retries).
ERROR_HEADER = "X-Kdcache-Error"
SHARD_MISSING = "shard-missing"
DEFAULT_MAX_ROWS = 65536
DEFAULT_MAX_RESPONSE_BYTES = 256 << 20
DEFAULT_DECODED_CACHE_BYTES = 512 << 20

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*$", re.IGNORECASE)
_SAFE_ECHO_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SEND_PIECE_BYTES = 1 << 20  # ~1 MB body messages: few thread-pool hops per request, bounded memory

log = logging.getLogger(__name__)


class RangeNotSatisfiable(ValueError):
    """A Range header this server will not serve (malformed, multi-range, or outside the file)."""


def parse_single_range(header: str, size_bytes: int) -> tuple[int, int]:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → [start, end) within a file of ``size_bytes``.

    Only single byte ranges are served (a shard client never needs more); anything else is 416 rather than
    being silently ignored, so a client bug shows up instead of a full-body download.
    """
    match = _RANGE_RE.match(header)
    if match is None or (not match[1] and not match[2]):
        raise RangeNotSatisfiable(f"unsupported Range {header[:80]!r}: send one range, e.g. 'bytes=0-1023'")
    if not match[1]:  # suffix: the last n bytes
        suffix = int(match[2])
        if suffix == 0:
            raise RangeNotSatisfiable("Range 'bytes=-0' selects no bytes")
        return max(0, size_bytes - suffix), size_bytes
    start = int(match[1])
    if start >= size_bytes:
        raise RangeNotSatisfiable(f"Range starts at byte {start}, but the shard has {size_bytes} bytes")
    if match[2]:
        last = int(match[2])
        if last < start:
            raise RangeNotSatisfiable(f"Range end {last} is before its start {start}")
        return start, min(last + 1, size_bytes)
    return start, size_bytes


def _quoted_etag(sha256: str) -> str:
    return f'"{sha256}"'


def _shown(text: str) -> str:
    """Request text echoed in an error message only when it is a plain name (never a path or control chars)."""
    return repr(text) if _SAFE_ECHO_RE.match(text) and ".." not in text else "(not a valid name)"


def _read_window(file: IO[bytes], start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of an open file, in pieces; closes the file. Runs in the thread pool."""
    with file:
        file.seek(start)
        remaining = end - start
        while remaining > 0:
            piece = file.read(min(_SEND_PIECE_BYTES, remaining))
            if not piece:
                # The file shrank after the headers went out: end the response short (the client resumes or
                # refetches) rather than pad it.
                raise OSError(f"shard file ended {remaining} bytes early while being sent")
            remaining -= len(piece)
            yield piece


class _ByteWindowResponse(StreamingResponse):
    """Exactly bytes [start, end) of an open file: 206 with Content-Range when it answers a Range, else 200.

    The window is fixed before the status line goes out and is checked against the byte limit here, so no
    request header can make the body larger (unlike ``FileResponse``, which re-reads ``Range``/``If-Range``).
    """

    def __init__(self, file: IO[bytes], start: int, end: int, size_bytes: int, max_bytes: int,
                 headers: dict[str, str], *, is_range: bool) -> None:
        whole_or_range = is_range or (start, end) == (0, size_bytes)
        if not (0 <= start <= end <= size_bytes and end - start <= max_bytes and whole_or_range):
            raise ValueError(f"byte window [{start}, {end}) of {size_bytes} bytes breaks the {max_bytes}-byte limit")
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start)}
        if is_range:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size_bytes}"
        super().__init__(_read_window(file, start, end), status_code=206 if is_range else 200, headers=headers,
                         media_type="application/octet-stream")


def _shard_missing_response(name: str, array: str, shard_index: int) -> JSONResponse:
    """404 with a machine-readable reason: a missing file will not appear by retrying, so clients stop at once."""
    detail = str(fmt.CorruptShardError(array, shard_index, "the shard file is missing on the server",
                                       where=f"cache {name!r}"))
    return JSONResponse(
        {"detail": detail, "cache": name, "array": array, "shard_index": shard_index},
        status_code=404, headers={ERROR_HEADER: SHARD_MISSING},
    )


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
    """
    if token is not None and not token:
        raise ValueError("token must be a non-empty string or None")
    if max_rows <= 0 or max_response_bytes <= 0:
        raise ValueError("max_rows and max_response_bytes must be positive")
    registry: dict[str, RegisteredCache] = {}
    to_register = []
    for name, value in caches.items():
        if isinstance(value, RegisteredCache):
            registry[name] = value
        else:
            to_register.append((name, value))
    if to_register:
        registry.update(register_caches(to_register))
    token_bytes = token.encode() if token is not None else None
    metrics = ServerMetrics(registry)
    decoded = DecodedShardLRU(decoded_cache_bytes)

    app = FastAPI(
        title="kdcache server",
        version="1",
        description="Read-only access to offline teacher-logit caches (kdcache format v1).",
        openapi_url=None,  # served below, behind auth
        docs_url=None,
        redoc_url=None,
    )
    app.state.caches = registry
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    bearer = HTTPBearer(auto_error=False, description="the server's token (`kdcache serve --token-file`)")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token_bytes is None:
            return
        given = credentials.credentials.encode("utf-8", "surrogateescape") if credentials is not None else b""
        if credentials is None or not hmac.compare_digest(given, token_bytes):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                "(kdlib: open_cache(url, token=...) or set KDCACHE_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def get_cache(name: str) -> RegisteredCache:
        cache = registry.get(name)
        if cache is None:
            raise HTTPException(404, f"no cache named {_shown(name)}; GET {API_PREFIX}/caches lists them")
        return cache

    # ------------------------------------------------------------------ unauthenticated

    @app.get("/healthz", tags=["ops"], summary="Liveness probe (no auth)")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "caches": len(registry)}

    # ------------------------------------------------------------------ authenticated ops

    ops = APIRouter(dependencies=[Depends(require_token)])

    @ops.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    def prometheus_metrics() -> Response:
        metrics.decoded_bytes.set(decoded.nbytes)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @ops.get("/openapi.json", include_in_schema=False)
    def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    # ------------------------------------------------------------------ /v1

    v1 = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_token)], tags=["caches"])

    @v1.get("/caches", summary="List the registered caches")
    def list_caches() -> dict[str, Any]:
        return {"caches": [cache.summary() for cache in registry.values()]}

    @v1.get("/caches/{name}", summary="One cache's summary")
    def cache_summary(name: str) -> dict[str, Any]:
        return get_cache(name).summary()

    @v1.get(
        "/caches/{name}/manifest",
        summary="The exact manifest.json bytes (hash them to key local state)",
        response_class=Response,
        responses={200: {"content": {"application/json": {}}}},
    )
    def manifest(name: str) -> Response:
        cache = get_cache(name)
        return Response(
            cache.manifest_raw,
            media_type="application/json",
            headers={"ETag": _quoted_etag(cache.manifest_sha256), CHECKSUM_HEADER: cache.manifest_sha256},
        )

    @v1.get(
        "/caches/{name}/shards/{array}/{shard_index}",
        summary="Stored (compressed) bytes of one shard of one array; supports a single HTTP Range",
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "the whole shard file"},
            206: {"content": {"application/octet-stream": {}}, "description": "the requested byte range"},
            403: {"description": "the shard file cannot be served (outside the cache directory, unreadable)"},
            404: {"description": "unknown cache, array or shard index; or the shard file is missing on the "
                                 f"server ({ERROR_HEADER}: {SHARD_MISSING})"},
            413: {"description": "larger than the server's per-request byte limit: use Range"},
            416: {"description": "malformed, multi-part or unsatisfiable Range"},
        },
    )
    def shard_bytes(
        request: Request,
        name: str,
        array: str,
        shard_index: int = PathParam(ge=0, le=2**62),
    ) -> Response:
        cache = get_cache(name)
        if array not in cache.specs:
            raise HTTPException(
                404, f"cache {name!r} has no array {_shown(array[:128])}; arrays: {sorted(cache.specs)}"
            )
        if shard_index >= cache.num_shards:
            raise HTTPException(404, f"array {array!r} has shards 0..{cache.num_shards - 1}, not {shard_index}")
        entry = cache.shard_entry(array, shard_index)
        try:
            file = cache.shard_path(array, shard_index).open("rb")
        except FileNotFoundError:
            metrics.corrupt_shards.labels(name, array).inc()
            return _shard_missing_response(name, array, shard_index)
        except (PermissionError, IsADirectoryError) as exc:
            log.warning("kdcache serve: refusing shard %d of %r in cache %r: %s", shard_index, array, name, exc)
            raise HTTPException(403, f"shard {shard_index} of array {array!r} in cache {name!r} cannot be served "
                                "(it leads outside the cache directory or is not readable); see the server log")
        try:
            size_bytes = os.fstat(file.fileno()).st_size  # of the file actually opened
            etag = _quoted_etag(entry["sha256"])
            headers = {"ETag": etag, CHECKSUM_HEADER: entry["sha256"], "Cache-Control": "private, max-age=3600"}
            range_header = request.headers.get("range")
            if_range = request.headers.get("if-range")
            start, end = 0, size_bytes
            is_range = range_header is not None and (if_range is None or if_range == etag)
            if is_range:
                try:
                    start, end = parse_single_range(range_header, size_bytes)
                except RangeNotSatisfiable as exc:
                    file.close()
                    return JSONResponse(
                        {"detail": str(exc)}, status_code=416, headers={"Content-Range": f"bytes */{size_bytes}"}
                    )
            if end - start > max_response_bytes:
                raise HTTPException(
                    413, f"{end - start} bytes exceed this server's limit of {max_response_bytes} bytes per request; "
                    "fetch the shard in pieces with a Range header",
                )
            return _ByteWindowResponse(file, start, end, size_bytes, max_response_bytes, headers, is_range=is_range)
        except BaseException:
            file.close()  # the response did not take the file over
            raise

    @v1.get(
        "/caches/{name}/rows",
        summary="Decoded sequences [start, stop) as an Arrow IPC stream (FixedSizeList columns)",
        response_class=StreamingResponse,
        responses={
            200: {"content": {ARROW_STREAM_MEDIA_TYPE: {}}, "description": "Arrow IPC stream, one row per sequence"},
            400: {"description": "bad arrays or start > stop"},
            413: {"description": "more rows or bytes than the server allows per request"},
            404: {"description": f"unknown cache, or a shard file is missing on the server ({ERROR_HEADER})"},
            416: {"description": "rows outside the cache"},
            500: {"description": "a stored shard failed its manifest checksum (named in the detail)"},
        },
    )
    def rows(
        name: str,
        start: int = Query(ge=0, le=2**62, description="first sequence"),
        stop: int = Query(ge=0, le=2**62, description="one past the last sequence"),
        arrays: str | None = Query(
            None, max_length=4096, description="comma-separated array names (default: every array)"
        ),
    ) -> Response:
        cache = get_cache(name)
        if start > stop:
            raise HTTPException(400, f"start ({start}) must be <= stop ({stop})")
        if stop > cache.layout.num_sequences:
            raise HTTPException(
                416, f"rows [{start}, {stop}) are outside the cache's {cache.layout.num_sequences} sequences"
            )
        names = [a.strip() for a in arrays.split(",") if a.strip()] if arrays is not None else list(cache.specs)
        unknown = [a for a in names if a not in cache.specs]
        if unknown or not names or len(set(names)) != len(names):
            raise HTTPException(
                400, f"arrays must be distinct names from {sorted(cache.specs)}; got "
                f"[{', '.join(_shown(a[:128]) for a in names[:16])}]"
            )
        specs = [cache.specs[a] for a in names]
        num_rows = stop - start
        row_bytes = sum(spec.bytes_per_sequence() for spec in specs)
        if num_rows > max_rows or num_rows * row_bytes > max_response_bytes:
            allowed = min(max_rows, max_response_bytes // max(1, row_bytes))
            raise HTTPException(
                413, f"{num_rows} rows of {names} ({num_rows * row_bytes} bytes) exceed this server's limits "
                f"({max_rows} rows, {max_response_bytes} bytes per request): ask for at most {allowed} rows",
            )
        S = cache.layout.shard_seqs
        # Decode (and checksum) every shard involved before the status line goes out, so a corrupt shard is a
        # clean error response instead of a truncated stream.
        shards: dict[tuple[str, int], Any] = {}
        for s in range(start // S, (max(start, stop - 1) // S) + 1 if num_rows else start // S):
            for spec in specs:
                try:
                    shards[(spec.name, s)] = decoded.get(cache, spec.name, s)
                except MissingShardError:
                    metrics.corrupt_shards.labels(name, spec.name).inc()
                    return _shard_missing_response(name, spec.name, s)
                except fmt.CorruptShardError as exc:
                    metrics.corrupt_shards.labels(name, spec.name).inc()
                    raise HTTPException(500, f"server-side {exc}")
        schema = arrow_schema(
            specs,
            {"kdcache.cache": name, "kdcache.manifest_sha256": cache.manifest_sha256,
             "kdcache.start": str(start), "kdcache.stop": str(stop)},
        )
        body = stream_rows(schema, specs, start, stop, S, lambda a, s: shards[(a, s)])
        return StreamingResponse(
            body, media_type=ARROW_STREAM_MEDIA_TYPE, headers={"ETag": _quoted_etag(cache.manifest_sha256)}
        )

    app.include_router(ops)
    app.include_router(v1)
    return app
