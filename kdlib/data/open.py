"""``open_cache``: one entry point for a cache directory or a ``kdcache serve`` URL.

It lives in its own module because it is the one place that knows both kinds of cache: the local classes
(``kdlib.data.cache``) and the remote ones (``kdlib.data.remote``, which builds on the local ones) never
import each other the other way round.
"""

from __future__ import annotations

import os
from typing import Any

from kdlib.data.cache import CacheReader, LocalCache
from kdlib.data.remote import RemoteCache

__all__ = ["open_cache", "as_cache"]


def open_cache(path_or_url: str | os.PathLike, **kwargs: Any) -> CacheReader:
    """Open a cache directory or an ``http(s)://host:port/v1/caches/NAME`` URL with the same interface.

    Args:
        path_or_url: a cache directory, or the URL of a cache served by ``kdcache serve``.
        **kwargs: options of ``LocalCache`` / ``RemoteCache``: ``decode_dir``, ``max_decoded_bytes``,
            ``widen``, ``readahead``, ``prefetch_workers``; remote caches also take ``token``, ``timeout_s``,
            ``max_retries``... (``shard_cache_dir`` / ``shard_cache_bytes`` are deprecated names of
            ``decode_dir`` / ``max_decoded_bytes``).

    Returns:
        A ``LocalCache`` or a ``RemoteCache`` (both ``CacheReader``).
    """
    text = os.fspath(path_or_url)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        return RemoteCache(text, **kwargs)
    return LocalCache(text, **kwargs)


def as_cache(cache: Any, open_kwargs: Any = None) -> Any:
    """``cache`` itself when it is already open, else ``open_cache(cache, **open_kwargs)`` for a path or URL.

    The one rule for APIs that take "a cache or where to find one" (loaders, scoring); an open cache is
    passed through unchanged (worker processes receive it by pickling).
    """
    if isinstance(cache, (str, os.PathLike)):
        return open_cache(cache, **dict(open_kwargs or {}))
    return cache
