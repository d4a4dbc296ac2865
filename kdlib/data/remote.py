"""Remote caches over HTTP: ``open_cache("http://host:port/v1/caches/NAME")`` → ``RemoteCache``.

Shape notation::

    n  sequences in a batch    T  positions per sequence    K  top-k entries per position

``RemoteCache`` IS a ``CacheReader`` (same ``read``, ``lookup``, ``sequence_stats``, same loader); only the
``ShardSource`` differs. ``HttpShardSource`` fetches stored (compressed) shard bytes from ``kdcache serve``
and checks every transfer against the manifest's size and sha256: a corrupt transfer is fetched again a
few times and never used; a persistent mismatch raises ``CorruptShardError`` naming the array and shard,
and so does a shard the server reports missing (404 ``X-Kdcache-Error: shard-missing``, at once, no retries).

Everything after the fetch is the shared reader code: decoding, the decoded ``.npy`` memory maps and their
directory (``decode_dir``/<manifest hash>), the size limit ``max_decoded_bytes`` (least recently used
evicted first; a remote cache defaults to ``DEFAULT_MAX_DECODED_BYTES`` because every shard it decodes was
also downloaded), background prefetch and parallel decode of a batch's shards (``kdlib.data.store``).

What the remote case adds:

* retries with exponential backoff and jitter on connection errors, timeouts, 5xx/429 (``kdcache serve``
  answers 503 under overload), resuming a half-received shard with an HTTP Range request (``If-Range`` on
  the shard's ETag); bytes that all arrived before a connection dropped are used without another request;
* shards larger than ``piece_bytes`` (2 MiB) are fetched as Range pieces (bounded request latency on a
  shared server);
* fork/DataLoader safety: the httpx client is created lazily per process (``os.getpid()`` checked on use),
  and the reader pickles without it (spawn workers), with its URL, token, timeouts and retry settings.

The URL scheme, header names and the shard-missing code come from ``cache_server.format.wire``, the one
definition the server shares.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import httpx

from cache_server import format as fmt
from cache_server.format import CacheError, CorruptShardError
from cache_server.format import wire
from cache_server.format.wire import TOKEN_ENV
from kdlib.data.cache import CacheReader
from kdlib.data.retry import RetryPolicy

__all__ = [
    "RemoteCache",
    "HttpShardSource",
    "RemoteError",
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_PIECE_BYTES",
    "TOKEN_ENV",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_DECODED_BYTES = 20 << 30
DEFAULT_PIECE_BYTES = 2 << 20
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


# Old names of module attributes, still importable with a DeprecationWarning.
_RENAMED = {"DEFAULT_SHARD_CACHE_BYTES": "DEFAULT_MAX_DECODED_BYTES"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        import warnings

        new = _RENAMED[name]
        warnings.warn(f"kdlib.data.remote.{name} is deprecated: it is now called {new} (same value)",
                      DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RemoteError(CacheError):
    """The server refused a request (auth, unknown cache) or stayed unreachable through every retry."""


class _Retryable(Exception):
    pass


class _ShardMissing(RemoteError):
    """The server has the shard in its manifest but not on disk (``read_shard`` turns it into CorruptShardError)."""


@dataclass
class _Transfer:
    """One GET across its retries: the bytes that arrived so far and how to ask for the rest."""

    start: int
    end: int | None  # exclusive; None until known
    etag: str | None
    ranged: bool  # the caller asked for a byte range (not a whole file)
    end_known: bool  # the caller gave the size (else it is learned from Content-Length)
    body: bytearray = field(default_factory=bytearray)
    headers: httpx.Headers | None = None

    @property
    def offset(self) -> int:
        return self.start + len(self.body)

    def complete(self) -> bool:
        """Every expected byte arrived (in an earlier, cut response)."""
        return self.headers is not None and self.end is not None and self.offset >= self.end

    def request_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.ranged or (self.body and self.etag):
            headers["Range"] = wire.range_header(self.offset, self.end)
            if self.etag:
                headers["If-Range"] = self.etag
        return headers


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

    checks_shards = True  # read_shard checks the bytes against self.manifest (and fetches a damaged one again)

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
        if not wire.CACHE_URL_RE.match(url):
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
        RetryPolicy(self.max_retries, self.backoff_s, self.max_backoff_s).sleep(attempt)

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
        transfer = _Transfer(start=start, end=end, etag=if_range, ranged=byte_range is not None,
                             end_known=end is not None)
        attempt = 0
        while True:
            if transfer.complete():
                self.stats["bytes"] += len(transfer.body)
                return transfer.body, transfer.headers
            try:
                self.stats["requests"] += 1
                return self._get_once(url, what, transfer)
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

    def _get_once(self, url: str, what: str, transfer: "_Transfer") -> tuple[bytearray, httpx.Headers]:
        """One request of a transfer: appends what arrives to ``transfer.body`` (kept if the connection drops)."""
        headers = transfer.request_headers()
        with self._http().stream("GET", url, headers=headers) as response:
            status = response.status_code
            self._raise_for_refusal(url, response)
            if status == 416 and "Range" in headers:
                # The file is shorter than the manifest says (or than what already arrived): hand back what
                # arrived; the size/checksum check names the shard corrupt.
                self.stats["bytes"] += len(transfer.body)
                return transfer.body, response.headers
            if status == 206 and "Range" in headers:
                if not response.headers.get("content-range", "").startswith(f"bytes {transfer.offset}-"):
                    transfer.body.clear()
                    transfer.headers = None
                    raise _Retryable(f"unexpected Content-Range {response.headers.get('content-range')}")
                if transfer.body:
                    self.stats["resumed"] += 1
            elif status == 200 and not transfer.ranged:
                transfer.body.clear()  # a whole body (first try, or the file changed since the cut)
                if not transfer.end_known and "content-length" in response.headers:
                    transfer.end = int(response.headers["content-length"])  # a cut after the last byte ends here
            elif status == 200:
                raise RemoteError(f"{url}: the server ignored the Range request for {what}; the file changed "
                                  "since this reader opened the cache (reopen it)")
            else:
                raise RemoteError(f"{url}: HTTP {status} fetching {what}: {response.read()[:300]!r}")
            transfer.etag = response.headers.get("etag") or transfer.etag
            transfer.headers = response.headers
            # iter_raw without a chunk size hands over every network read at once, so a dropped connection
            # keeps what arrived (iter_bytes(n) would lose its partial buffer).
            for piece in response.iter_raw():
                transfer.body += piece
            self.stats["bytes"] += len(transfer.body)
            return transfer.body, response.headers

    def _raise_for_refusal(self, url: str, response: httpx.Response) -> None:
        """Refused (auth), final (shard missing) or retryable (overload, 5xx) answers, as exceptions."""
        status = response.status_code
        if status in (401, 403):
            raise RemoteError(
                f"{url}: HTTP {status}, the server refused the token ({'none sent' if not self.token else 'token sent'}"
                f"); pass open_cache(url, token=...) or set {TOKEN_ENV}"
            )
        if status == 404 and response.headers.get(wire.ERROR_HEADER) == wire.SHARD_MISSING:
            raise _ShardMissing(f"{url}: HTTP 404, {wire.ERROR_HEADER}: {wire.SHARD_MISSING}")
        if status in _RETRY_STATUS:
            raise _Retryable(f"HTTP {status}: {response.read()[:200]!r}")

    def _fetch_shard(self, array: str, shard_index: int, expected: Mapping[str, Any]) -> tuple[bytes, str | None]:
        """The stored bytes (whole, or in ``piece_bytes`` Range pieces) and the server's checksum header."""
        path = wire.shard_suffix(array, shard_index)
        what = f"shard {shard_index} of {array!r}"
        nbytes = int(expected["nbytes"])
        etag = wire.quoted_etag(expected["sha256"])
        if self.piece_bytes is None or nbytes <= self.piece_bytes:
            raw, headers = self._get(path, what, if_range=etag, size_bytes=nbytes)
            return bytes(raw), headers.get(wire.CHECKSUM_HEADER)
        # Large shard: bounded requests (latency under load, server byte limits, cheaper retries).
        out = bytearray()
        claimed = None
        for lo in range(0, nbytes, self.piece_bytes):
            piece, headers = self._get(path, what, byte_range=(lo, min(lo + self.piece_bytes, nbytes)), if_range=etag)
            claimed = claimed or headers.get(wire.CHECKSUM_HEADER)
            out += piece
        return bytes(out), claimed

    # ------------------------------------------------------------------ ShardSource

    def manifest_bytes(self) -> bytes:
        for _ in range(1 + self.corrupt_retries):
            raw, headers = self._get(wire.MANIFEST_SUFFIX, "the manifest")
            raw = bytes(raw)
            claimed = headers.get(wire.CHECKSUM_HEADER)
            if claimed is None or fmt.shard_sha256(raw) == claimed:
                self.manifest = fmt.parse_manifest(raw, source=self.url + wire.MANIFEST_SUFFIX)
                return raw
            self.stats["corrupt_transfers"] += 1
        raise RemoteError(f"{self.url}{wire.MANIFEST_SUFFIX}: received bytes never matched the server's checksum "
                          "header")

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
            problem = fmt.shard_bytes_problem(raw, expected)
            if problem is None:
                return raw
            self.stats["corrupt_transfers"] += 1
            detail = f"{len(raw)} bytes received: {problem}"
            log.warning("kdcache remote: shard %d of %r failed its checksum (%s); fetching again",
                        shard_index, array, detail)
        raise CorruptShardError(
            array, shard_index, f"{1 + self.corrupt_retries} transfers never matched the manifest ({detail})",
            where=self.url + wire.shard_suffix(array, shard_index),
        )


class RemoteCache(CacheReader):
    """A cache served by ``kdcache serve``, with the local reader's interface.

    Args:
        url: ``http(s)://host:port/v1/caches/NAME``.
        token: bearer token (default ``$KDCACHE_TOKEN``).
        decode_dir: root of the local decoded shards (default ``default_decode_root()``); this cache uses
            ``<root>/<manifest hash>``.
        max_decoded_bytes: size limit of this cache's decoded shards on local disk (LRU); None = unlimited.
        timeout_s, connect_timeout_s, max_retries, backoff_s, corrupt_retries, piece_bytes: see
            ``HttpShardSource``.
        prefetch_workers: background fetch/decode threads.
        readahead: shards to prefetch ahead of a sequential reader.
        widen: as for the local reader.
        **deprecated: ``shard_cache_dir`` / ``shard_cache_bytes``, old names of ``decode_dir`` /
            ``max_decoded_bytes`` (DeprecationWarning).
    """

    DEFAULT_MAX_DECODED_BYTES = DEFAULT_MAX_DECODED_BYTES

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        decode_dir: str | os.PathLike | None = None,
        max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 8,
        backoff_s: float = 0.1,
        corrupt_retries: int = 2,
        prefetch_workers: int = 2,
        readahead: int = 2,
        piece_bytes: int | None = DEFAULT_PIECE_BYTES,
        widen: bool = False,
        **deprecated: Any,
    ) -> None:
        source = HttpShardSource(
            url, token=token, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_retries=max_retries,
            backoff_s=backoff_s, corrupt_retries=corrupt_retries, max_connections=max(4, 2 * prefetch_workers + 2),
            piece_bytes=piece_bytes,
        )
        super().__init__(source, decode_dir=decode_dir, widen=widen, readahead=readahead,
                         max_decoded_bytes=max_decoded_bytes, prefetch_workers=prefetch_workers, **deprecated)
        self.url = source.url
