"""Where a cache's bytes live when they are not in a local directory: an object store behind an fsspec URL.

A cache location is either a local directory (``./cache``, ``/data/cache``: every existing code path, with
tmp+rename and ``flock``) or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``): then
:class:`ObjectStore` is the one way the build, the readers, the server and the CLI touch its bytes. An object
store has whole objects and no rename, so everything is written as one whole object (one PUT each): shard
files, journal entries and, last, ``manifest.json`` (see docs/FORMAT.md, "Object storage").

Credentials come the usual way for the filesystem (for S3: ``AWS_*`` environment variables, ``~/.aws``
profiles, instance roles; ``AWS_ENDPOINT_URL`` for an S3-compatible endpoint); extra fsspec options can be
given as a JSON object in ``$KDCACHE_STORAGE_OPTIONS`` (or ``--storage-options``). Neither is ever written
into a manifest, and messages name a location by :func:`redact_url` (no user info, no query string).

fsspec and the filesystem's package (``s3fs``: ``pip install kdcache[s3]``) are imported on first use only.
The filesystem object is made per process (fork safety: a forked DataLoader worker opens its own).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from cache_server.format.errors import CacheError

__all__ = [
    "STORAGE_OPTIONS_ENV",
    "ObjectStore",
    "StorageError",
    "is_url",
    "open_store",
    "parse_storage_options",
    "redact_url",
    "storage_options_from_env",
    "use_storage_options",
]

STORAGE_OPTIONS_ENV = "KDCACHE_STORAGE_OPTIONS"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Served caches (kdcache serve) have their own client; file:// is a local directory.
_NOT_OBJECT_STORES = ("http://", "https://", "file://")
_PACKAGES = {"s3": "s3fs (pip install kdcache[s3])", "s3a": "s3fs (pip install kdcache[s3])",
             "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class StorageError(CacheError):
    """An object-store location cannot be used (bad URL, missing package, bad storage options)."""


def is_url(location: Any) -> bool:
    """Whether ``location`` names an object store (an fsspec URL), not a local path or a served cache."""
    if not isinstance(location, str):
        return False
    return bool(_URL_RE.match(location)) and not location.lower().startswith(_NOT_OBJECT_STORES)


def redact_url(url: str) -> str:
    """``url`` without anything that may be a secret: user info (``s3://KEY:SECRET@bucket``) and the query."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    return f"{scheme}://{host}{slash}{path}"


def storage_options_from_env() -> dict[str, Any]:
    """The fsspec options in ``$KDCACHE_STORAGE_OPTIONS`` (a JSON object), or ``{}``.

    Raises:
        StorageError: the variable is not a JSON object.
    """
    raw = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    return parse_storage_options(raw, f"${STORAGE_OPTIONS_ENV}")


def use_storage_options(raw: str | None) -> None:
    """Make ``raw`` (a ``--storage-options`` JSON object) the default options of this process and its children
    (it is validated, then set as ``$KDCACHE_STORAGE_OPTIONS``); None leaves the default as it is."""
    if raw is not None:
        parse_storage_options(raw)
        os.environ[STORAGE_OPTIONS_ENV] = raw


def parse_storage_options(raw: str, source: str = "--storage-options") -> dict[str, Any]:
    """A JSON object of fsspec options (``{"client_kwargs": {"endpoint_url": ...}}``); StorageError if not."""
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"{source} is not valid JSON ({exc}); pass a JSON object such as "
                           "'{\"anon\": false, \"client_kwargs\": {\"region_name\": \"us-east-1\"}}'") from None
    if not isinstance(options, dict):
        raise StorageError(f"{source} must be a JSON object of fsspec storage options, got {type(options).__name__}")
    return options


class ObjectStore:
    """The objects under one fsspec URL prefix, named by paths relative to it (``manifest.json``, ``lse/c/0``).

    Args:
        url: ``scheme://bucket/prefix`` (a trailing ``/`` is ignored).
        storage_options: fsspec options for the filesystem; default ``$KDCACHE_STORAGE_OPTIONS``.

    Attributes:
        url: the URL as given (may hold secrets: never print it); ``description``: the redacted URL.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not is_url(url):
            raise StorageError(f"{url!r} is not an object-store URL (scheme://bucket/prefix)")
        self.url = url.rstrip("/")
        self.description = redact_url(self.url)
        self.storage_options = dict(storage_options if storage_options is not None else storage_options_from_env())
        self._fs: Any = None
        self._root = ""
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fs=None, _pid=-1)
        return state

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None or self._pid != os.getpid():
            try:
                import fsspec

                # Not fsspec's instance cache: it is keyed by the options only, not by the environment that also
                # configures the filesystem (AWS_ENDPOINT_URL, AWS_PROFILE), so it could hand back another endpoint.
                options = {"skip_instance_cache": True, **self.storage_options}
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **options)
            except ImportError as exc:
                scheme = self.url.split("://", 1)[0].lower()
                package = _PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
                raise StorageError(f"reading or writing {self.description} needs {package}: {exc}") from None
            except (TypeError, ValueError) as exc:
                raise StorageError(f"cannot open {self.description} with these storage options ({exc}); check "
                                   f"${STORAGE_OPTIONS_ENV} / --storage-options") from None
            self._root = self._root.rstrip("/")
            self._pid = os.getpid()
        return self._fs, self._root

    def child_url(self, relpath: str) -> str:
        """The redacted URL of one object (for messages)."""
        return f"{self.description}/{relpath}"

    def _path(self, relpath: str) -> str:
        return f"{self._filesystem()[1]}/{relpath}"

    def read_bytes(self, relpath: str) -> bytes:
        """The whole object; ``FileNotFoundError`` when it does not exist."""
        fs, _ = self._filesystem()
        return fs.cat_file(self._path(relpath))

    def read_many(self, relpaths: list[str]) -> dict[str, bytes]:
        """``{relative path: bytes}`` of these objects, fetched concurrently; missing ones are left out."""
        if not relpaths:
            return {}
        fs, root = self._filesystem()
        found = fs.cat([f"{root}/{p}" for p in relpaths], on_error="omit")
        return {p[len(root) + 1:]: raw for p, raw in found.items() if isinstance(raw, bytes)}

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write one whole object in one PUT: readers see the old object or the whole new one, never a part."""
        fs, _ = self._filesystem()
        fs.pipe_file(self._path(relpath), bytes(data))

    def exists(self, relpath: str) -> bool:
        fs, _ = self._filesystem()
        fs.invalidate_cache()
        return bool(fs.exists(self._path(relpath)))

    def list(self, prefix: str = "") -> list[str]:
        """Every object under ``prefix`` (relative paths, sorted); ``[]`` when there are none."""
        fs, root = self._filesystem()
        fs.invalidate_cache()
        base = f"{root}/{prefix}".rstrip("/")
        try:
            found = fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(p[len(root) + 1:] for p in found if p.startswith(root + "/"))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """``{relative path: size in bytes}`` of every object under ``prefix``."""
        fs, root = self._filesystem()
        fs.invalidate_cache()
        try:
            found = fs.find(f"{root}/{prefix}".rstrip("/"), detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in found.items()
                if p.startswith(root + "/")}

    def delete(self, relpaths: list[str]) -> None:
        """Delete these objects (missing ones are ignored)."""
        if not relpaths:
            return
        fs, _ = self._filesystem()
        for relpath in relpaths:
            try:
                fs.rm_file(self._path(relpath))
            except FileNotFoundError:
                continue


def open_store(url: str, storage_options: Mapping[str, Any] | None = None) -> ObjectStore:
    """The :class:`ObjectStore` of ``url`` (``storage_options`` default: ``$KDCACHE_STORAGE_OPTIONS``)."""
    return ObjectStore(url, storage_options)
