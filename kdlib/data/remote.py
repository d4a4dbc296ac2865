"""Remote caches over HTTP: ``open_cache("http://host:port/v1/caches/NAME")`` → ``RemoteCache``.

Shape notation::

    n  sequences in a batch    T  positions per sequence    K  top-k entries per position

``RemoteCache`` IS a ``CacheReader`` (same ``read``, ``lookup``, ``sequence_stats``, same loader); only the
``ShardSource`` differs. ``HttpShardSource`` fetches stored (compressed) shard bytes from ``kdcache serve``
and checks every transfer against the manifest's size and sha256: a corrupt transfer is fetched again a
few times and never used; a persistent mismatch raises ``CorruptShardError`` naming the array and shard,
and so does a shard the server reports missing (404 ``X-Kdcache-Error: shard-missing``, at once, no retries).

Everything after the fetch is the shared reader code (``kdlib.data.cache``): decoding, the decoded ``.npy``
memory maps and their directory (``decode_dir``/<manifest hash>), and ``DecodedShardStore``'s size limit
(``shard_cache_bytes``, least recently used evicted first; file mtime is the recency, so processes sharing
the directory share one LRU), background prefetch and parallel decode of a batch's shards. Local and
remote caches use the same store.

What the remote case adds:

* retries with exponential backoff and jitter on connection errors, timeouts, 5xx/429 (``kdcache serve``
  answers 503 under overload), resuming a half-received shard with an HTTP Range request (``If-Range`` on
  the shard's ETag); bytes that all arrived before a connection dropped are used without another request;
* shards larger than ``piece_bytes`` (2 MiB) are fetched as Range pieces (bounded request latency on a
  shared server);
* fork/DataLoader safety: the httpx client is created lazily per process (``os.getpid()`` checked on use),
  and the reader pickles without it (spawn workers).
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import httpx

from cache_server import format as fmt
from cache_server.format import CacheError, CorruptShardError
from kdlib.data.cache import CacheReader

__all__ = [
    "RemoteCache",
    "HttpShardSource",
    "RemoteError",
    "DEFAULT_SHARD_CACHE_BYTES",
    "DEFAULT_PIECE_BYTES",
    "TOKEN_ENV",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "KDCACHE_TOKEN"
DEFAULT_SHARD_CACHE_BYTES = 20 << 30
DEFAULT_PIECE_BYTES = 2 << 20
# These must match cache_server.serve.app (kdlib needs no FastAPI).
CHECKSUM_HEADER = "x-checksum-sha256"
ERROR_HEADER = "x-kdcache-error"
SHARD_MISSING = "shard-missing"
_URL_RE = re.compile(r"^https?://[^/]+(/.*)?/v1/caches/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class RemoteError(CacheError):
    """The server refused a request (auth, unknown cache) or stayed unreachable through every retry."""


class _Retryable(Exception):
    pass


class _ShardMissing(RemoteError):
    """The server has the shard in its manifest but not on disk (``read_shard`` turns it into CorruptShardError)."""


class HttpShardSource:
    """A ``ShardSource`` reading a cache from ``kdcache serve`` (see the module docstring).

    Args:
        url: ``http(s)://host:port/v1/caches/NAME``.
        token: bearer token; default ``$KDCACHE_TOKEN``; None sends no Authorization header.
        timeout_s: read/write/pool timeout per request; ``connect_timeout_s`` for connecting.
        max_retries: retries after a transport error or a retryable status (exponential backoff from
            ``backoff_s``, capped at ``max_backoff_s``, with jitter).
        corrupt_retries: extra fetches of a shard whose bytes do not match the manifest.
        piece_bytes: shards larger than this are fetched as several Range requests of this size (bounded
            request latency and memory per request on a shared server); None fetches whole shards.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 8,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        corrupt_retries: int = 2,
        max_connections: int = 8,
        piece_bytes: int | None = DEFAULT_PIECE_BYTES,
    ) -> None:
        url = url.rstrip("/")
        if not _URL_RE.match(url):
            raise ValueError(
                f"{url!r} is not a cache URL; expected http(s)://HOST:PORT/v1/caches/NAME "
                "(GET http://HOST:PORT/v1/caches lists the names)"
            )
        self.url = url
        self.description = url
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.corrupt_retries = int(corrupt_retries)
        self.max_connections = int(max_connections)
        if piece_bytes is not None and piece_bytes <= 0:
            raise ValueError(f"piece_bytes must be positive or None, got {piece_bytes}")
        self.piece_bytes = piece_bytes
        self.manifest: dict[str, Any] | None = None
        self.stats = {"requests": 0, "retries": 0, "resumed": 0, "corrupt_transfers": 0, "bytes": 0}
        self._client: httpx.Client | None = None
        self._client_pid = -1
        self._client_lock = threading.Lock()

    # ------------------------------------------------------------------ process-local state

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_client_pid"] = -1
        del state["_client_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    def _http(self) -> httpx.Client:
        """The httpx client of THIS process (a forked DataLoader worker must not reuse the parent's sockets)."""
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:
            if self._client_pid != pid:
                self._client_lock = threading.Lock()  # a lock inherited through fork may be held forever
            with self._client_lock:
                if self._client is None or self._client_pid != pid:
                    # identity: shard bytes are already compressed, and Range offsets must be raw offsets
                    headers = {"Accept-Encoding": "identity"}
                    if self.token:
                        headers["Authorization"] = f"Bearer {self.token}"
                    self._client = httpx.Client(
                        timeout=self.timeout,
                        headers=headers,
                        limits=httpx.Limits(max_connections=self.max_connections,
                                            max_keepalive_connections=self.max_connections),
                        follow_redirects=False,
                    )
                    self._client_pid = pid
        return self._client

    def close(self) -> None:
        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        self._client = None

    # ------------------------------------------------------------------ HTTP with retries

    def _sleep_before_retry(self, attempt: int) -> None:
        delay_s = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        time.sleep(delay_s * (0.5 + random.random() / 2))

    def _get(
        self,
        path: str,
        what: str,
        byte_range: tuple[int, int] | None = None,
        if_range: str | None = None,
        size_bytes: int | None = None,
    ) -> tuple[bytearray, httpx.Headers]:
        """GET ``url + path`` (optionally bytes [start, end)) with retries.

        A body cut off mid-transfer is resumed from the first missing byte with a Range request, guarded by
        ``If-Range`` (the shard's ETag), so a file that changed on the server is fetched whole instead. When
        every expected byte arrived before the connection dropped (``size_bytes`` of a whole file, or the end of
        ``byte_range``), the body is returned as is: asking for the bytes after the end would be a 416.
        """
        url = self.url + path
        start, end = byte_range if byte_range is not None else (0, size_bytes)
        body = bytearray()
        received_headers: httpx.Headers | None = None
        etag = if_range
        attempt = 0
        while True:
            offset = start + len(body)
            if received_headers is not None and end is not None and offset >= end:
                self.stats["bytes"] += len(body)
                return body, received_headers
            headers: dict[str, str] = {}
            if byte_range is not None or (body and etag):
                headers["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
                if etag:
                    headers["If-Range"] = etag
            try:
                self.stats["requests"] += 1
                with self._http().stream("GET", url, headers=headers) as response:
                    status = response.status_code
                    if status in (401, 403):
                        raise RemoteError(
                            f"{url}: HTTP {status}, the server refused the token "
                            f"({'none sent' if not self.token else 'token sent'}); pass open_cache(url, "
                            f"token=...) or set {TOKEN_ENV}"
                        )
                    if status == 404 and response.headers.get(ERROR_HEADER) == SHARD_MISSING:
                        raise _ShardMissing(f"{url}: HTTP 404, {ERROR_HEADER}: {SHARD_MISSING}")
                    if status in _RETRY_STATUS:
                        raise _Retryable(f"HTTP {status}: {response.read()[:200]!r}")
                    if status == 416 and "Range" in headers:
                        # The file is shorter than the manifest says (or than what already arrived): hand back
                        # what arrived; the size/checksum check names the shard corrupt.
                        self.stats["bytes"] += len(body)
                        return body, response.headers
                    if status == 206 and "Range" in headers:
                        if not response.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                            body.clear()
                            received_headers = None
                            raise _Retryable(f"unexpected Content-Range {response.headers.get('content-range')}")
                        if body:
                            self.stats["resumed"] += 1
                    elif status == 200 and byte_range is None:
                        body.clear()  # a whole body (first try, or the file changed since the cut)
                        if size_bytes is None and "content-length" in response.headers:
                            end = int(response.headers["content-length"])  # lets a cut after the last byte end here
                    elif status == 200:
                        raise RemoteError(f"{url}: the server ignored the Range request for {what}; the file "
                                          "changed since this reader opened the cache (reopen it)")
                    else:
                        raise RemoteError(f"{url}: HTTP {status} fetching {what}: {response.read()[:300]!r}")
                    etag = response.headers.get("etag") or etag
                    received_headers = response.headers
                    # iter_raw without a chunk size hands over every network read at once, so a dropped
                    # connection keeps what arrived (iter_bytes(n) would lose its partial buffer).
                    for piece in response.iter_raw():
                        body += piece
                    self.stats["bytes"] += len(body)
                    return body, response.headers
            except (httpx.TransportError, _Retryable) as exc:
                attempt += 1
                if attempt > self.max_retries:
                    raise RemoteError(
                        f"{url}: could not fetch {what} after {attempt} attempts ({type(exc).__name__}: {exc}); "
                        "is `kdcache serve` running and reachable?"
                    ) from exc
                self.stats["retries"] += 1
                log.warning("kdcache remote: %s fetching %s (%s); retry %d/%d", type(exc).__name__, what, exc,
                            attempt, self.max_retries)
                self._sleep_before_retry(attempt)

    def _fetch_shard(self, array: str, shard_index: int, expected: Mapping[str, Any]) -> tuple[bytes, str | None]:
        """The stored bytes (whole, or in ``piece_bytes`` Range pieces) and the server's checksum header."""
        path = f"/shards/{array}/{int(shard_index)}"
        what = f"shard {shard_index} of {array!r}"
        nbytes = int(expected["nbytes"])
        etag = f'"{expected["sha256"]}"'
        if self.piece_bytes is None or nbytes <= self.piece_bytes:
            raw, headers = self._get(path, what, if_range=etag, size_bytes=nbytes)
            return bytes(raw), headers.get(CHECKSUM_HEADER)
        # Large shard: bounded requests (latency under load, server byte limits, cheaper retries).
        out = bytearray()
        claimed = None
        for lo in range(0, nbytes, self.piece_bytes):
            piece, headers = self._get(path, what, byte_range=(lo, min(lo + self.piece_bytes, nbytes)), if_range=etag)
            claimed = claimed or headers.get(CHECKSUM_HEADER)
            out += piece
        return bytes(out), claimed

    # ------------------------------------------------------------------ ShardSource

    def manifest_bytes(self) -> bytes:
        for _ in range(1 + self.corrupt_retries):
            raw, headers = self._get("/manifest", "the manifest")
            raw = bytes(raw)
            claimed = headers.get(CHECKSUM_HEADER)
            if claimed is None or fmt.shard_sha256(raw) == claimed:
                self.manifest = fmt.parse_manifest(raw, source=f"{self.url}/manifest")
                return raw
            self.stats["corrupt_transfers"] += 1
        raise RemoteError(f"{self.url}/manifest: received bytes never matched the server's checksum header")

    def read_shard(self, array: str, shard_index: int, ndim: int) -> bytes:
        """Stored bytes of one shard, verified against the manifest (refetched if a transfer is corrupt)."""
        if self.manifest is None:
            self.manifest_bytes()
        expected = self.manifest["shards"][array][shard_index]
        detail = ""
        for _ in range(1 + self.corrupt_retries):
            try:
                raw, claimed = self._fetch_shard(array, shard_index, expected)
            except _ShardMissing as exc:
                raise CorruptShardError(
                    array, shard_index, f"the shard file is missing on the server ({exc})", where=self.url,
                ) from None
            if claimed is not None and claimed != expected["sha256"]:
                raise RemoteError(
                    f"{self.url}: the server's shard {shard_index} of {array!r} has sha256 {claimed[:16]}…, but the "
                    f"manifest this reader opened says {expected['sha256'][:16]}…: the cache was rebuilt on the "
                    "server; open it again"
                )
            digest = fmt.shard_sha256(raw)
            if len(raw) == int(expected["nbytes"]) and digest == expected["sha256"]:
                return raw
            self.stats["corrupt_transfers"] += 1
            detail = f"{len(raw)} bytes with sha256 {digest[:16]}…, manifest says {expected['nbytes']} bytes, " \
                     f"sha256 {expected['sha256'][:16]}…"
            log.warning("kdcache remote: shard %d of %r failed its checksum (%s); fetching again",
                        shard_index, array, detail)
        raise CorruptShardError(
            array, shard_index, f"{1 + self.corrupt_retries} transfers never matched the manifest ({detail})",
            where=f"{self.url}/shards/{array}/{shard_index}",
        )


class RemoteCache(CacheReader):
    """A cache served by ``kdcache serve``, with the local reader's interface.

    Args:
        url: ``http(s)://host:port/v1/caches/NAME``.
        token: bearer token (default ``$KDCACHE_TOKEN``).
        shard_cache_dir: root of the local decoded-shard cache (alias of ``decode_dir``; default
            ``~/.cache/kdcache/decoded``); this cache uses ``<root>/<manifest hash>``.
        shard_cache_bytes: size limit of this cache's decoded shards on local disk (LRU); None = unlimited.
        timeout_s, connect_timeout_s, max_retries, backoff_s, corrupt_retries, piece_bytes: see
            ``HttpShardSource``.
        prefetch_workers: background fetch/decode threads.
        readahead: shards to prefetch ahead of a sequential reader (default 2).
        widen, decode_dir: as for the local reader.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        shard_cache_dir: str | os.PathLike | None = None,
        shard_cache_bytes: int | None = DEFAULT_SHARD_CACHE_BYTES,
        decode_dir: str | os.PathLike | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 8,
        backoff_s: float = 0.1,
        corrupt_retries: int = 2,
        prefetch_workers: int = 2,
        readahead: int = 2,
        piece_bytes: int | None = DEFAULT_PIECE_BYTES,
        widen: bool = False,
    ) -> None:
        if shard_cache_dir is not None and decode_dir is not None and Path(shard_cache_dir) != Path(decode_dir):
            raise ValueError("pass either shard_cache_dir or decode_dir (they name the same directory), not both")
        source = HttpShardSource(
            url, token=token, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_retries=max_retries,
            backoff_s=backoff_s, corrupt_retries=corrupt_retries, max_connections=max(4, 2 * prefetch_workers + 2),
            piece_bytes=piece_bytes,
        )
        super().__init__(
            source, decode_dir=shard_cache_dir or decode_dir, widen=widen, readahead=readahead,
            max_decoded_bytes=shard_cache_bytes, prefetch_workers=prefetch_workers,
        )
        self.url = source.url

    def close(self) -> None:
        """Stop background prefetching and close HTTP connections (the reader reopens them on use)."""
        super().close()
        self.source.close()
