"""``open_cache``: one entry point for a cache directory or a ``kdcache serve`` URL.

It lives in its own module because it is the one place that knows both kinds of cache: the local classes
(``kdlib.data.cache``) and the remote ones (``kdlib.data.remote``, which builds on the local ones) never
import each other the other way round.
"""

from __future__ import annotations

import os
from typing import Any

from cache_server.format import storage
from kdlib.data.cache import CacheReader, LocalCache
from kdlib.data.remote import DEFAULT_MAX_DECODED_BYTES, RemoteCache
from kdlib.data.sources import FsspecShardSource

__all__ = ["open_cache", "as_cache", "ObjectStoreCache"]

_SOURCE_OPTIONS = ("storage_options", "max_retries", "backoff_s", "max_backoff_s", "corrupt_retries")


class ObjectStoreCache(CacheReader):
    """A cache on an object store (``s3://bucket/prefix``, any fsspec URL), with the local reader's interface.

    Shards are read whole through ``FsspecShardSource`` (retries, checksum check) and decoded once into the
    decode directory like a remote cache's; ``max_decoded_bytes`` defaults to ``DEFAULT_MAX_DECODED_BYTES``.

    Args:
        url: the cache's URL.
        storage_options, max_retries, backoff_s, max_backoff_s, corrupt_retries: see ``FsspecShardSource``.
        **kwargs: ``CacheReader`` options (``decode_dir``, ``max_decoded_bytes``, ``readahead``,
            ``prefetch_workers``, ``widen``).
    """

    DEFAULT_MAX_DECODED_BYTES = DEFAULT_MAX_DECODED_BYTES

    def __init__(self, url: str, **kwargs: Any) -> None:
        source_kwargs = {k: kwargs.pop(k) for k in _SOURCE_OPTIONS if k in kwargs}
        kwargs.setdefault("max_decoded_bytes", DEFAULT_MAX_DECODED_BYTES)
        kwargs.setdefault("prefetch_workers", 2)
        kwargs.setdefault("readahead", 2)
        super().__init__(FsspecShardSource(url, **source_kwargs), **kwargs)
        self.url = self.source.description


def open_cache(path_or_url: str | os.PathLike, **kwargs: Any) -> CacheReader:
    """Open a cache directory, an ``http(s)://host:port/v1/caches/NAME`` URL or an object-store URL alike.

    Args:
        path_or_url: a cache directory, the URL of a cache served by ``kdcache serve``, or an fsspec URL of a
            cache on an object store (``s3://bucket/prefix``; options ``storage_options``, ``max_retries``...).
        **kwargs: options of ``LocalCache`` / ``RemoteCache``: ``decode_dir``, ``max_decoded_bytes``,
            ``widen``, ``readahead``, ``prefetch_workers``; remote caches also take ``token``, ``timeout_s``,
            ``max_retries``... (``shard_cache_dir`` / ``shard_cache_bytes`` are deprecated names of
            ``decode_dir`` / ``max_decoded_bytes``).

    Returns:
        A ``LocalCache``, ``RemoteCache`` or ``ObjectStoreCache`` (all ``CacheReader``).
    """
    text = os.fspath(path_or_url)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        return RemoteCache(text, **kwargs)
    if storage.is_url(text):
        return ObjectStoreCache(text, **kwargs)
    return LocalCache(text, **kwargs)


def as_cache(cache: Any, open_kwargs: Any = None) -> Any:
    """``cache`` itself when it is already open, else ``open_cache(cache, **open_kwargs)`` for a path or URL.

    The one rule for APIs that take "a cache or where to find one" (loaders, scoring); an open cache is
    passed through unchanged (worker processes receive it by pickling).
    """
    if isinstance(cache, (str, os.PathLike)):
        return open_cache(cache, **dict(open_kwargs or {}))
    return cache
