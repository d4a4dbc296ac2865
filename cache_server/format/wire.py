"""The HTTP wire protocol of ``kdcache serve``: the one definition the server and ``kdlib.data.remote`` share.

Standard library only (the client side needs neither FastAPI nor Arrow). Endpoints, relative to the server's
base URL (``http://HOST:PORT``, possibly behind a reverse-proxy path prefix)::

    GET /healthz                                          liveness, no auth
    GET /metrics                                          Prometheus text format
    GET /openapi.json                                     the schema of the endpoints below
    GET /v1/caches                                        registered caches (summaries)
    GET /v1/caches/{name}                                 one cache's summary
    GET /v1/caches/{name}/manifest                        the exact manifest.json bytes
    GET /v1/caches/{name}/shards/{array}/{shard_index}    stored (compressed) shard bytes; one HTTP Range
    GET /v1/caches/{name}/rows?start=&stop=&arrays=       decoded rows [start, stop) as an Arrow IPC stream

A cache's URL is ``BASE/v1/caches/NAME``; the client appends ``MANIFEST_SUFFIX`` or ``shard_suffix(...)`` to
it. ``*_ROUTE`` are the same paths as route templates (relative to ``API_PREFIX``) for the server's router.

Headers: the manifest and shard responses carry ``ETag: "<sha256>"`` (``quoted_etag``) and
``CHECKSUM_HEADER: <sha256>``; a shard the manifest lists but the server's disk lacks is
``404`` with ``ERROR_HEADER: SHARD_MISSING`` (final: a client stops retrying at once).
"""

from __future__ import annotations

import re
from urllib.parse import quote

__all__ = [
    "API_PREFIX",
    "HEALTHZ_PATH",
    "METRICS_PATH",
    "OPENAPI_PATH",
    "CACHES_ROUTE",
    "CACHE_ROUTE",
    "MANIFEST_ROUTE",
    "SHARD_ROUTE",
    "ROWS_ROUTE",
    "MANIFEST_SUFFIX",
    "ROWS_SUFFIX",
    "CHECKSUM_HEADER",
    "ERROR_HEADER",
    "SHARD_MISSING",
    "ARROW_STREAM_MEDIA_TYPE",
    "TOKEN_ENV",
    "CACHE_NAME_PATTERN",
    "CACHE_NAME_RE",
    "CACHE_URL_RE",
    "caches_path",
    "cache_path",
    "manifest_path",
    "shard_suffix",
    "shard_path",
    "rows_path",
    "quoted_etag",
    "range_header",
]

API_PREFIX = "/v1"
HEALTHZ_PATH = "/healthz"
METRICS_PATH = "/metrics"
OPENAPI_PATH = "/openapi.json"

# Route templates relative to API_PREFIX (FastAPI path syntax); the functions below fill them in.
CACHES_ROUTE = "/caches"
CACHE_ROUTE = "/caches/{name}"
MANIFEST_ROUTE = "/caches/{name}/manifest"
SHARD_ROUTE = "/caches/{name}/shards/{array}/{shard_index}"
ROWS_ROUTE = "/caches/{name}/rows"

# Relative to a cache's URL (BASE/v1/caches/NAME).
MANIFEST_SUFFIX = "/manifest"
ROWS_SUFFIX = "/rows"

CHECKSUM_HEADER = "X-Checksum-Sha256"
# Machine-readable reason on some error responses.
ERROR_HEADER = "X-Kdcache-Error"
# ERROR_HEADER value: the manifest lists the shard, the server's disk lacks it (retrying will not help).
SHARD_MISSING = "shard-missing"
ARROW_STREAM_MEDIA_TYPE = "application/vnd.apache.arrow.stream"
# Environment variable a client reads the bearer token from (named in the server's 401 message).
TOKEN_ENV = "KDCACHE_TOKEN"

# Cache names appear in URLs and metric labels: 1-64 letters, digits, '_', '.', '-', not starting with
# '_', '.' or '-' (the server also refuses '..').
CACHE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
CACHE_NAME_RE = re.compile(rf"^{CACHE_NAME_PATTERN}$")
# http(s)://HOST[:PORT][/proxy/prefix]/v1/caches/NAME
CACHE_URL_RE = re.compile(rf"^https?://[^/]+(/.*)?{API_PREFIX}{CACHES_ROUTE}/{CACHE_NAME_PATTERN}$")


def _part(text: str) -> str:
    # Valid names and arrays pass unchanged; anything else cannot smuggle a '/' or '..' segment into a path.
    return quote(str(text), safe="")


def caches_path() -> str:
    """``/v1/caches``: the list of registered caches."""
    return API_PREFIX + CACHES_ROUTE


def cache_path(name: str) -> str:
    """``/v1/caches/NAME``: one cache's summary, and the base every other cache path extends."""
    return API_PREFIX + CACHE_ROUTE.format(name=_part(name))


def manifest_path(name: str) -> str:
    """``/v1/caches/NAME/manifest``: the exact manifest.json bytes."""
    return API_PREFIX + MANIFEST_ROUTE.format(name=_part(name))


def shard_suffix(array: str, shard_index: int) -> str:
    """``/shards/ARRAY/I``, relative to a cache's URL."""
    return f"/shards/{_part(array)}/{int(shard_index)}"


def shard_path(name: str, array: str, shard_index: int) -> str:
    """``/v1/caches/NAME/shards/ARRAY/I``: stored (compressed) bytes of one shard."""
    return API_PREFIX + SHARD_ROUTE.format(name=_part(name), array=_part(array), shard_index=int(shard_index))


def rows_path(name: str) -> str:
    """``/v1/caches/NAME/rows``: decoded rows (query ``start``, ``stop``, optional ``arrays=a,b``)."""
    return API_PREFIX + ROWS_ROUTE.format(name=_part(name))


def quoted_etag(sha256: str) -> str:
    """The ETag of a manifest or shard: its sha256 hex digest in double quotes (a strong validator)."""
    return f'"{sha256}"'


def range_header(start: int, end: int | None) -> str:
    """``Range`` value for bytes [start, end) (``end`` None: to the end of the file)."""
    return f"bytes={int(start)}-{'' if end is None else int(end) - 1}"
