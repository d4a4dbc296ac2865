"""Caches a server exposes, registered by name at start-up.

Shape notation::

    N  sequences in a cache        S  sequences per shard
    T  positions per sequence      K  top-k entries per position

The registry is the only place where the server turns a request into a filesystem path, and it does so
from the registered manifest alone: a request names a cache (looked up in a dict), an array (must be one
of the manifest's arrays) and an integer shard index (must be in [0, num_shards)). Request text never
becomes part of a path, and every resolved shard path is checked to stay inside its cache directory.

A cache on an object store (``kdcache serve s3://bucket/prefix``) is served from a local copy of its stored
shards (``root`` is then a temporary directory): a shard is downloaded whole on its first request, kept
only when its bytes match the manifest's sha256, and from then on served like a local file (byte ranges,
ETags). Damaged bytes are served as they are, from a separate file, so the client's checksum check names them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from cache_server import format as fmt
from cache_server.format import storage, wire

__all__ = ["RegisteredCache", "RegistryError", "parse_cache_args", "register_cache", "register_caches"]


class RegistryError(fmt.CacheError):
    """A cache given to ``kdcache serve`` cannot be registered (bad name, duplicate, unfinished cache)."""


@dataclass
class RegisteredCache:
    """One served cache: its directory, the exact manifest bytes and what the server derives from them."""

    name: str
    root: Path  # resolved cache directory
    manifest_raw: bytes
    manifest: dict[str, Any]
    layout: fmt.CacheLayout
    manifest_sha256: str = ""
    specs: dict[str, fmt.ArraySpec] = field(default_factory=dict)
    store: storage.ObjectStore | None = None  # a cache on an object store: ``root`` holds downloaded shards
    location: str = ""  # the directory, or the redacted URL (for messages)

    def __post_init__(self) -> None:
        self.manifest_sha256 = hashlib.sha256(self.manifest_raw).hexdigest()
        self.specs = {spec.name: spec for spec in self.layout.arrays()}
        self.location = self.location or str(self.root)
        self._download_lock = threading.Lock()

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    def shard_entry(self, array: str, shard_index: int) -> Mapping[str, Any]:
        """The manifest's ``{"sha256", "nbytes"}`` of a shard; KeyError/IndexError when unknown."""
        if array not in self.specs:
            raise KeyError(array)
        if not 0 <= shard_index < self.num_shards:
            raise IndexError(shard_index)
        return self.manifest["shards"][array][shard_index]

    def shard_path(self, array: str, shard_index: int) -> Path:
        """Filesystem path of a stored shard, from validated parts only (raises KeyError/IndexError)."""
        self.shard_entry(array, shard_index)
        spec = self.specs[array]
        path = self.root / fmt.shard_relpath(array, int(shard_index), 1 + len(spec.trailing_shape))
        if self.store is not None:
            return self._downloaded(array, int(shard_index), path)
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            # A symlink inside the cache pointing elsewhere: never follow it out of the registered directory.
            raise PermissionError(f"shard path {path} resolves outside the cache directory {self.root}")
        return resolved

    def _downloaded(self, array: str, shard_index: int, path: Path) -> Path:
        """The local copy of a shard of an object-store cache, downloaded first if needed.

        Raises:
            FileNotFoundError: the object is missing (the handlers answer shard-missing).
        """
        if path.exists():
            return path
        relpath = path.relative_to(self.root).as_posix()
        raw = self.store.read_bytes(relpath)
        try:
            fmt.verify_shard_bytes(raw, self.shard_entry(array, shard_index), array, shard_index)
        except fmt.CorruptShardError:
            path = self.root / ".unverified" / relpath  # served once as is; the client names it corrupt
        with self._download_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, path)
        return path

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_sequences": self.layout.num_sequences,
            "seq_len": self.layout.seq_len,
            "topk": self.layout.topk,
            "vocab_size": self.layout.vocab_size,
            "temperatures": list(self.layout.temperatures),
            "shard_seqs": self.layout.shard_seqs,
            "num_shards": self.layout.num_shards,
            "arrays": {
                name: {"dtype": spec.dtype.name, "shape": list(spec.shape(self.layout.num_sequences))}
                for name, spec in self.specs.items()
            },
            "manifest_sha256": self.manifest_sha256,
        }


def parse_cache_args(items: Iterable[str]) -> list[tuple[str, Path | str]]:
    """``DIR``, ``URL``, ``NAME=DIR`` or ``NAME=URL`` → (name, dir or URL). The default name is the basename."""
    out: list[tuple[str, Path | str]] = []
    for item in items:
        name, sep, directory = item.partition("=")
        if storage.is_url(item) or (sep and storage.is_url(directory)):
            url = directory if sep and storage.is_url(directory) else item
            out.append((name if url is directory else url.rstrip("/").rsplit("/", 1)[-1], url))
            continue
        if not sep or not name or os.sep in name:
            name, directory = Path(item.rstrip("/\\") or item).name, item
        out.append((name, Path(directory)))
    return out


def register_cache(name: str, cache_dir: str | os.PathLike) -> RegisteredCache:
    """Check a cache name and a finished cache directory, and read its manifest once.

    The manifest itself (array names, shard table, counts) is validated by ``cache_server.format``; what is
    checked here is the server's own business: the name the cache is served under.

    Raises:
        RegistryError: the name is not allowed.
        CacheError: the directory is missing, unfinished, not a cache, or its manifest is damaged.
    """
    if not wire.CACHE_NAME_RE.match(name) or ".." in name:
        shown = storage.redact_url(cache_dir) if storage.is_url(cache_dir) else cache_dir
        raise RegistryError(
            f"cache name {name!r} is not allowed: use 1-64 letters, digits, '_', '.', '-' (no '..'), "
            f"e.g. kdcache serve mycache={shown}"
        )
    if storage.is_url(cache_dir):
        return _register_object_cache(name, str(cache_dir))
    root = Path(cache_dir).resolve()
    path = root / fmt.MANIFEST_NAME
    raw = fmt.read_manifest_bytes(root)  # refuses, saying why: missing, unfinished, a build running, not a cache
    manifest = fmt.parse_manifest(raw, source=str(path))  # the exact bytes served are the bytes validated
    return RegisteredCache(name=name, root=root, manifest_raw=raw, manifest=manifest,
                           layout=fmt.layout_from_manifest(manifest))


def _register_object_cache(name: str, url: str) -> RegisteredCache:
    """An object-store cache: its manifest read once, its shards downloaded on demand into a temporary root."""
    store = storage.open_store(url)
    raw = fmt.read_object_manifest(store)
    manifest = fmt.parse_manifest(raw, source=store.child_url(fmt.MANIFEST_NAME))
    root = Path(tempfile.mkdtemp(prefix=f"kdcache-serve-{name}-")).resolve()
    cache = RegisteredCache(name=name, root=root, manifest_raw=raw, manifest=manifest,
                            layout=fmt.layout_from_manifest(manifest), store=store, location=store.description)
    weakref.finalize(cache, shutil.rmtree, str(root), True)
    return cache


def register_caches(items: Iterable[tuple[str, str | os.PathLike]]) -> dict[str, RegisteredCache]:
    """Register several caches; duplicate names are refused."""
    caches: dict[str, RegisteredCache] = {}
    for name, directory in items:
        if name in caches:
            raise RegistryError(
                f"two caches are named {name!r} ({caches[name].location} and {_shown(directory)}); "
                "pick names with NAME=DIR"
            )
        caches[name] = register_cache(name, directory)
    if not caches:
        raise RegistryError("no caches to serve: pass at least one cache directory")
    return caches


def _shown(location: str | os.PathLike) -> str:
    return storage.redact_url(location) if storage.is_url(location) else str(Path(location).resolve())
