"""Read a kdcache cache: ``open_cache(path or URL)`` → ``read(start, stop)`` / ``lookup(indices)``.

Shape notation::

    n  sequences in a batch        T  positions per sequence
    K  top-k entries per position  V  teacher vocabulary size

A batch is a ``dict`` of torch tensors::

    input_ids      [n, T]     int32 (int64 with widen=True)
    topk_ids       [n, T, K]  int32; zero-copy when stored as uint32 (int64 with widen=True)
    topk_logprobs  [n, T, K]  float16 as stored (float32 with widen=True)
    lse            [n, T]     float32  teacher full-vocab logsumexp
    lse_t{tau:g}   [n, T]     float32  logsumexp(logits/tau) for each build temperature

The hot path never decodes through zarr: each shard is fetched from its source once, checked against the
manifest's sha256, decoded once into an uncompressed ``.npy`` file under the decode directory, and from then
on memory-mapped. A batch inside one shard is a zero-copy view of that mapping. The decode directory is keyed
by the manifest's hash, so a rebuilt cache never sees stale decoded data; concurrent processes (DataLoader
workers, several ranks) may share it because each decoded file appears atomically (write + rename).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch

from cache_server import format as fmt
from cache_server.format import CacheError, CorruptShardError

__all__ = [
    "open_cache",
    "CacheReader",
    "LocalCache",
    "ShardSource",
    "LocalShardSource",
    "DecodedShardStore",
    "default_decode_root",
    "CacheError",
    "CorruptShardError",
]

PER_SEQUENCE_ARRAYS = ("seq_nll", "seq_entropy")


class ShardSource(Protocol):
    """Where stored (compressed) shard bytes come from: a local directory or an HTTP server."""

    description: str

    def manifest_bytes(self) -> bytes: ...

    def read_shard(self, array: str, shard_index: int, ndim: int) -> bytes: ...


class LocalShardSource:
    """Stored shards of a cache directory on a local (or mounted) filesystem."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.description = str(self.cache_dir)

    def manifest_bytes(self) -> bytes:
        fmt.load_manifest(self.cache_dir)  # raises the helpful errors (missing, unfinished, not a dir)
        return (self.cache_dir / fmt.MANIFEST_NAME).read_bytes()

    def read_shard(self, array: str, shard_index: int, ndim: int) -> bytes:
        path = self.cache_dir / fmt.shard_relpath(array, shard_index, ndim)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise CorruptShardError(array, shard_index, "shard file is missing", where=str(path)) from None


def default_decode_root() -> Path:
    """``$KDCACHE_DECODE_DIR`` or ``$XDG_CACHE_HOME/kdcache/decoded`` (``~/.cache/kdcache/decoded``)."""
    env = os.environ.get("KDCACHE_DECODE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdcache" / "decoded"


class DecodedShardStore:
    """Decoded shards, each decoded at most once into a memory-mapped ``.npy`` file.

    Used by local and remote caches alike: the source decides where stored bytes come from, this store
    checks them against the manifest, decodes them once, keeps the decode directory within ``max_bytes``
    (least recently used shards evicted) and decodes ahead in background threads on request.

    Args:
        source: where stored shard bytes come from.
        manifest: the cache manifest (checksums, shapes).
        decode_dir: directory for this cache's decoded shards.
        max_bytes: limit on this cache's decoded ``.npy`` files (None: unlimited). The shard just decoded is
            never evicted, so the directory may briefly exceed the limit by one shard.
        prefetch_workers: threads decoding ahead (``prefetch`` returns at once).
        max_open: memory maps kept open in this process (LRU); files stay on disk regardless.
    """

    _TOUCH_EVERY_S = 5.0

    def __init__(
        self,
        source: ShardSource,
        manifest: Mapping[str, Any],
        decode_dir: Path,
        *,
        max_bytes: int | None = None,
        prefetch_workers: int = 1,
        max_open: int = 256,
    ) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"the decoded-shard size limit must be positive or None, got {max_bytes}")
        self.source = source
        self.manifest = manifest
        self.layout = fmt.layout_from_manifest(manifest)
        self.specs = {spec.name: spec for spec in self.layout.arrays()}
        self.decode_dir = Path(decode_dir)
        self.max_bytes = max_bytes
        self.prefetch_workers = int(prefetch_workers)
        self.max_open = max_open
        self.evicted = 0
        self._reset_process_state()

    # ------------------------------------------------------------------ process safety

    def _reset_process_state(self) -> None:
        """Maps, locks and threads belong to one process: a forked or unpickled copy starts afresh."""
        self._maps: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: dict[tuple[str, int], Future] = {}
        self._inflight_lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._touched_s: dict[tuple[str, int], float] = {}
        self._stale_tmp_checked = False
        self._pid = os.getpid()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked into a DataLoader worker
            self._reset_process_state()

    _PROCESS_STATE = ("_maps", "_lock", "_executor", "_inflight", "_inflight_lock", "_evict_lock", "_touched_s")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._PROCESS_STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    # ------------------------------------------------------------------ reading

    def _path(self, array: str, shard_index: int) -> Path:
        return self.decode_dir / array / f"{shard_index}.npy"

    def is_decoded(self, array: str, shard_index: int) -> bool:
        return self._path(array, shard_index).exists()

    def get(self, array: str, shard_index: int) -> np.ndarray:
        """The decoded shard [rows, *trailing] as a (copy-on-write) memory map."""
        self._check_process()
        key = (array, shard_index)
        with self._lock:
            cached = self._maps.get(key)
            if cached is not None:
                self._maps.move_to_end(key)
                return cached
        future = self._inflight.get(key)
        if future is not None:
            # A background decode of this very shard is under way: its error is this read's error.
            future.result()
        path = self._path(array, shard_index)
        for _ in range(3):
            if not path.exists():
                self._decode_to(path, array, shard_index)
            try:
                mm = np.load(path, mmap_mode="c", allow_pickle=False)
                break
            except FileNotFoundError:
                continue  # evicted by another process between decode and map: decode again
        else:
            raise CacheError(f"decoded shard {path} keeps disappearing: is the decoded-shard size limit too small?")
        with self._lock:
            self._maps[key] = mm
            while len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        self._touch(key)
        return mm

    def _decode_to(self, path: Path, array: str, shard_index: int) -> None:
        spec = self.specs[array]
        ndim = 1 + len(spec.trailing_shape)
        raw = self.source.read_shard(array, shard_index, ndim)
        expected = self.manifest["shards"][array][shard_index]
        fmt.verify_shard_bytes(raw, expected, array, shard_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        start, stop = self.layout.shard_range(shard_index)
        self._remove_stale_tmp_files()
        # Decode straight into the file's memory map: one pass, no intermediate buffer.
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=spec.dtype, shape=spec.shape(stop - start))
        try:
            _allocate(tmp)  # a full disk is a clean OSError here, not a SIGBUS while writing the map
            fmt.decode_shard(raw, spec, self.layout, shard_index, out=out)
            out.flush()  # msync: the data is on disk before the rename makes the file visible
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            del out  # unmap before the rename
        os.replace(tmp, path)
        self._touched_s[(array, shard_index)] = time.monotonic()
        if self.max_bytes is not None:
            self._evict(keep=path)

    def _remove_stale_tmp_files(self, max_age_s: float = 3600.0) -> None:
        """Once per process: delete temporary files that a killed decoder left (decodes take well under a
        second, so an hour-old one is abandoned; a younger one may belong to another live process)."""
        if self._stale_tmp_checked:
            return
        self._stale_tmp_checked = True
        now_s = time.time()
        for tmp in self.decode_dir.glob("*/.*.tmp"):
            try:
                if now_s - tmp.stat().st_mtime > max_age_s:
                    tmp.unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ background decoding

    def prefetch(self, array: str, shard_index: int) -> None:
        """Fetch and decode a shard in the background; returns at once (duplicates are dropped)."""
        self._check_process()
        if not 0 <= shard_index < self.layout.num_shards or self.is_decoded(array, shard_index):
            return
        key = (array, shard_index)
        with self._inflight_lock:
            if key in self._inflight:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max(1, self.prefetch_workers), thread_name_prefix="kdcache-prefetch")
            future = self._executor.submit(self._prefetch_one, array, shard_index)
            self._inflight[key] = future
        future.add_done_callback(lambda _f, key=key: self._inflight.pop(key, None))

    def _prefetch_one(self, array: str, shard_index: int) -> None:
        # Errors stay in the future: a read waiting for this shard raises them; nobody else sees them.
        if not self.is_decoded(array, shard_index):
            self._decode_to(self._path(array, shard_index), array, shard_index)

    def wait_prefetch(self) -> None:
        """Block until background decodes finish (their errors surface on the reads that need them)."""
        for future in list(self._inflight.values()):
            try:
                future.result()
            except Exception:
                pass

    def close(self) -> None:
        if self._executor is not None and self._pid == os.getpid():
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None

    # ------------------------------------------------------------------ size limit

    def _touch(self, key: tuple[str, int]) -> None:
        """Mark a shard recently used on disk for LRU eviction (one utime per shard per few seconds)."""
        if self.max_bytes is None:
            return
        now_s = time.monotonic()
        if now_s - self._touched_s.get(key, -1e9) < self._TOUCH_EVERY_S:
            return
        self._touched_s[key] = now_s
        try:
            os.utime(self._path(*key))
        except FileNotFoundError:
            pass

    def decoded_bytes(self) -> int:
        return sum(size for _, size, _ in self._decoded_files())

    def _decoded_files(self) -> list[tuple[float, int, Path]]:
        files: list[tuple[float, int, Path]] = []
        if not self.decode_dir.exists():
            return files
        for array_dir in os.scandir(self.decode_dir):
            if not array_dir.is_dir():
                continue
            for entry in os.scandir(array_dir.path):
                if entry.name.endswith(".npy") and not entry.name.startswith("."):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime, st.st_size, Path(entry.path)))
        return files

    def _evict(self, keep: Path) -> None:
        """Delete least-recently-used decoded shards until the directory fits ``max_bytes``.

        Unlinking a file another reader has memory-mapped is safe on POSIX: its mapping stays valid and the
        space is returned when the mapping closes.
        """
        with self._evict_lock:
            files = self._decoded_files()
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files, key=lambda f: f[0]):
                if total <= self.max_bytes:
                    break
                if path == keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size
                self.evicted += 1
                key = (path.parent.name, int(path.stem))
                with self._lock:
                    self._maps.pop(key, None)
                self._touched_s.pop(key, None)


def _allocate(path: Path) -> None:
    """Reserve the blocks of a freshly created (sparse) file."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot preallocate; carry on
            return
        raise OSError(exc.errno, f"cannot allocate {os.fstat(fd).st_size} bytes for a decoded shard in "
                      f"{path.parent} ({exc.strerror}); free space or set KDCACHE_DECODE_DIR / "
                      "max_decoded_bytes") from exc
    finally:
        os.close(fd)


def _manifest_key(raw_manifest: bytes) -> str:
    return hashlib.sha256(raw_manifest).hexdigest()[:24]


class CacheReader:
    """A cache, local or remote, with the same interface either way.

    Args:
        source: stored shard bytes (LocalShardSource, or kdlib.data.remote's HTTP source).
        decode_dir: root for decoded shards (default: ``default_decode_root()``); this cache uses a
            subdirectory named by its manifest hash.
        widen: default for ``read(..., widen=)``: int64 ids and float32 values instead of compact dtypes.
        readahead: shards to decode ahead in the background when reading sequentially (0 disables).
        max_decoded_bytes: size limit of this cache's decoded shards on local disk (LRU); None = unlimited.
        prefetch_workers: background decode (and, remotely, fetch) threads.
    """

    def __init__(
        self,
        source: ShardSource,
        *,
        decode_dir: str | os.PathLike | None = None,
        widen: bool = False,
        readahead: int = 1,
        max_decoded_bytes: int | None = None,
        prefetch_workers: int = 1,
    ) -> None:
        raw = source.manifest_bytes()
        self.source = source
        self.manifest: dict[str, Any] = fmt.parse_manifest(raw, source=f"{source.description}/{fmt.MANIFEST_NAME}")
        self.layout = fmt.layout_from_manifest(self.manifest)
        root = Path(decode_dir) if decode_dir is not None else default_decode_root()
        self.decode_dir = root / _manifest_key(raw)
        self.store = DecodedShardStore(
            source, self.manifest, self.decode_dir, max_bytes=max_decoded_bytes, prefetch_workers=prefetch_workers
        )
        self.widen = widen
        self.readahead = readahead
        self._last_shard = -1

    # ------------------------------------------------------------------ properties

    @property
    def num_sequences(self) -> int:
        return self.layout.num_sequences

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def topk(self) -> int:
        return self.layout.topk

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def temperatures(self) -> tuple[float, ...]:
        return self.layout.temperatures

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    @property
    def shard_seqs(self) -> int:
        return self.layout.shard_seqs

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source.description!r}, num_sequences={self.num_sequences}, "
            f"seq_len={self.seq_len}, topk={self.topk}, vocab_size={self.vocab_size})"
        )

    def position_arrays(self) -> list[str]:
        """Names of the per-position arrays a batch carries."""
        return [name for name in self.store.specs if name not in PER_SEQUENCE_ARRAYS]

    # ------------------------------------------------------------------ reading

    def _check_arrays(self, arrays: Sequence[str] | None) -> list[str]:
        if arrays is None:
            return self.position_arrays()
        unknown = [a for a in arrays if a not in self.store.specs]
        if unknown:
            raise KeyError(f"unknown arrays {unknown}; this cache has {sorted(self.store.specs)}")
        return list(arrays)

    def read(
        self, start: int, stop: int, *, arrays: Sequence[str] | None = None, widen: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Sequences [start, stop) as a dict of torch tensors (see the module docstring for dtypes)."""
        if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))):
            raise TypeError(f"read(start, stop) takes integers, got {type(start).__name__}, {type(stop).__name__}")
        if not 0 <= start <= stop <= self.num_sequences:
            raise IndexError(f"read({start}, {stop}) is outside [0, {self.num_sequences}]")
        names = self._check_arrays(arrays)
        widen = self.widen if widen is None else widen
        if start == stop:
            return {name: self._empty(name, widen) for name in names}
        S = self.layout.shard_seqs
        first, last = start // S, (stop - 1) // S
        if last > first:
            # Shards of this batch not decoded yet are fetched/decoded in parallel with the first one.
            for s in range(first + 1, last + 1):
                for name in names:
                    self.store.prefetch(name, s)
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if first == last:
                mm = self.store.get(name, first)
                data = mm[start - first * S : stop - first * S]
            else:
                parts = [
                    self.store.get(name, s)[max(start, s * S) - s * S : min(stop, (s + 1) * S) - s * S]
                    for s in range(first, last + 1)
                ]
                data = np.concatenate(parts)
            out[name] = self._to_tensor(name, data, widen)
        self._maybe_readahead(last, names)
        return out

    def lookup(
        self, sequence_indices: Sequence[int] | np.ndarray | torch.Tensor, *, arrays: Sequence[str] | None = None,
        widen: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sequences at arbitrary indices, in the order given."""
        idx = np.asarray(
            sequence_indices.cpu().numpy() if isinstance(sequence_indices, torch.Tensor) else sequence_indices,
            dtype=np.int64,
        ).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sequences):
            raise IndexError(f"sequence indices must be in [0, {self.num_sequences}), got {idx.min()}..{idx.max()}")
        names = self._check_arrays(arrays)
        S = self.layout.shard_seqs
        shard_of = idx // S
        shards = np.unique(shard_of)
        for s in shards[1:]:  # decoded in parallel with the first one (fetched, for a remote cache)
            for name in names:
                self.store.prefetch(name, int(s))
        out: dict[str, torch.Tensor] = {}
        for name in names:
            spec = self.store.specs[name]
            data = np.empty((idx.size, *spec.trailing_shape), dtype=spec.dtype)
            for s in shards:
                mask = shard_of == s
                data[mask] = self.store.get(name, int(s))[idx[mask] - s * S]
            out[name] = self._to_tensor(name, data, self.widen if widen is None else widen)
        return out

    def sequence_stats(self) -> dict[str, torch.Tensor]:
        """Per-sequence teacher statistics ``seq_nll`` and ``seq_entropy``, [N] float32 each."""
        return self.read(0, self.num_sequences, arrays=list(PER_SEQUENCE_ARRAYS))

    def _to_tensor(self, name: str, data: np.ndarray, widen: bool) -> torch.Tensor:
        if widen:
            # numpy's casts are vectorized for every dtype pair; torch's uint16 casts are not (~300x slower).
            data = data.astype(np.float32 if data.dtype.kind == "f" else np.int64)
        elif data.dtype == np.uint32:
            # Token ids are < 2**31, so uint32 bits read as int32 are the same numbers: zero-copy.
            data = data.view(np.int32)
        elif data.dtype == np.uint16:
            # torch's uint16 lacks comparisons, min/max and indexing; int32 costs one small copy per batch.
            data = data.astype(np.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # copy-on-write maps are writable; belt and braces
            return torch.from_numpy(data)

    def _empty(self, name: str, widen: bool) -> torch.Tensor:
        spec = self.store.specs[name]
        return self._to_tensor(name, np.empty((0, *spec.trailing_shape), dtype=spec.dtype), widen)

    def _maybe_readahead(self, last_shard: int, names: list[str]) -> None:
        """When reading forward, decode the next shard(s) in the background (cold reads overlap decoding)."""
        if self.readahead <= 0 or last_shard == self._last_shard:
            return
        sequential = last_shard == self._last_shard + 1
        self._last_shard = last_shard
        if not sequential:
            return
        for s in range(last_shard + 1, min(last_shard + 1 + self.readahead, self.num_shards)):
            for name in names:
                self.store.prefetch(name, s)

    def prepare(self, progress: bool = False) -> None:
        """Decode every shard now (e.g. before timing, or before forking workers)."""
        items = [(name, s) for s in range(self.num_shards) for name in self.store.specs]
        iterator = items
        if progress:
            from tqdm import tqdm

            iterator = tqdm(items, desc="decoding shards", unit="shard")
        for name, s in iterator:
            self.store.get(name, s)

    def close(self) -> None:
        """Stop background decoding (the reader stays usable; threads restart on demand)."""
        self.store.close()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalCache(CacheReader):
    """A cache directory on a local or mounted filesystem."""

    def __init__(self, cache_dir: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(LocalShardSource(cache_dir), **kwargs)
        self.path = Path(cache_dir)


def open_cache(path_or_url: str | os.PathLike, **kwargs: Any) -> CacheReader:
    """Open a cache directory or an ``http(s)://host:port/v1/caches/NAME`` URL with the same interface.

    Keyword arguments go to the reader (``decode_dir``, ``widen``, ``readahead``; remote caches also take
    ``token``, ``shard_cache_dir``, ``shard_cache_bytes``, ``timeout_s``...).
    """
    text = os.fspath(path_or_url)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        from kdlib.data.remote import RemoteCache

        return RemoteCache(text, **kwargs)
    return LocalCache(text, **kwargs)
