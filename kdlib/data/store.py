"""The decoded-shard store: each stored shard decoded at most once into a memory-mapped ``.npy`` copy.

Shape notation::

    n  sequences in a shard (S, fewer in the last shard)

Decoding a compressed shard costs far more than slicing an uncompressed file, and training reads every
shard many times (epochs, several DataLoader workers, several ranks), so a reader decodes each shard once
into a file under the decode directory and memory-maps that file from then on. The store is shared by
local and remote caches: the source decides where the stored bytes come from, the store checks them
against the manifest's digest (``format.shard_bytes_problem``: XXH3-128 where the manifest records it, else
sha256; in a hashing thread, beside the decode; nothing is published before the check passed), decodes them
an inner chunk at a time (on ``decode_threads`` threads: Blosc, zstd, numpy's
sort and the digests release the GIL, so this pays even on two cores) into memory, serves reads from that
memory at once while a writer thread writes the copy with its crc32c, publishes it atomically
(``cache_server.format.decoded``) and maps it in place of the memory (``wait_writes`` waits for that; ``close``
and ``CacheReader.prepare`` do), checks that crc32c once per process per file version (the first time the
process maps a copy with that device, inode and mtime, whatever cache object maps it), keeps the
directory within a byte limit (least recently used copies evicted; file mtime is the recency, so
processes sharing the directory share one LRU) and decodes ahead in background threads on request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cache_server import format as fmt
from cache_server.format import CacheError
from cache_server.format import decoded as decoded_fmt
from cache_server.format import slots
from kdlib.data.sources import ShardSource

__all__ = ["DecodedShardStore"]

log = logging.getLogger(__name__)

_MAP_ATTEMPTS = 3


# (st_dev, st_ino, st_mtime_ns) of decoded copies whose crc32c this process has checked or written.
_KNOWN_GOOD_DECODED: set[tuple[int, int, int]] = set()


class DecodedShardStore:
    """Decoded shards of one cache, each decoded at most once into a memory-mapped ``.npy`` file.

    Args:
        source: where stored shard bytes come from.
        manifest: the cache manifest (checksums, shapes).
        decode_dir: directory for this cache's decoded shards (``decoded_cache_dir(root, manifest bytes)``).
        max_bytes: limit on this cache's decoded files (None: unlimited). The shard just decoded is never
            evicted, so the directory may briefly exceed the limit by one shard.
        prefetch_workers: threads decoding ahead (``prefetch`` returns at once).
        max_open: memory maps kept open in this process (LRU); files stay on disk regardless.
        decode_threads: threads that decode the inner chunks of one shard together (None: one per CPU core,
            at most 8; 1: in the decoding thread alone). Blosc, zstd, numpy's sort and the digests release the GIL.
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
        decode_threads: int | None = None,
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
        if decode_threads is not None and (not isinstance(decode_threads, int) or decode_threads < 1):
            raise ValueError(f"decode_threads must be a positive integer or None, got {decode_threads!r}")
        self.decode_threads = decode_threads if decode_threads is not None else min(8, os.cpu_count() or 1)
        # One full shard of every array, decoded: what may wait in memory for the writer before a decode ahead.
        self._shard_bytes = sum(int(np.prod(spec.shape(self.layout.shard_seqs))) * spec.dtype.itemsize
                                for spec in self.specs.values())
        self.evicted = 0
        self.redecoded = 0  # damaged copies found (crc32c mismatch) and decoded again by this process
        self._reset_process_state()

    # ------------------------------------------------------------------ process safety

    _PROCESS_STATE = ("_maps", "_lock", "_executor", "_hasher", "_chunk_pool", "_writer", "_inflight",
                      "_inflight_lock", "_unwritten", "_writes", "_write_error", "_evict_lock", "_touched_s",
                      "_known_good", "_stale_tmp_checked", "_pid")

    def _reset_process_state(self) -> None:
        """Maps, locks and threads belong to one process: a forked or unpickled copy starts afresh."""
        self._maps: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._hasher: ThreadPoolExecutor | None = None  # digest checks beside the decodes
        self._chunk_pool: ThreadPoolExecutor | None = None  # the inner chunks of a shard, decoded together
        self._writer: ThreadPoolExecutor | None = None  # decoded copies written behind the reads
        # Decoded and checked, its copy not on disk yet: reads are served from this memory meanwhile.
        self._unwritten: dict[tuple[str, int], np.ndarray] = {}
        self._writes: set[Future] = set()
        # (shard, error) of a copy that could not be written: raised by the next decode of another shard (not of
        # the same one, whose other arrays' decodes are part of the very read that the failed write was behind).
        self._write_error: tuple[int, OSError] | None = None
        self._inflight: dict[tuple[str, int], Future] = {}
        self._inflight_lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._touched_s: dict[tuple[str, int], float] = {}
        # Files this process checked or wrote itself: a copy is checked once per process, not per map or per
        # cache object (a forked child keeps its parent's set: those checks were made on the same files).
        self._known_good = _KNOWN_GOOD_DECODED
        self._stale_tmp_checked = False
        self._pid = os.getpid()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked into a DataLoader worker
            self._reset_process_state()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._PROCESS_STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    # ------------------------------------------------------------------ reading

    def path(self, array: str, shard_index: int) -> Path:
        """Where the decoded copy of a shard lives (whether or not it exists yet)."""
        return decoded_fmt.decoded_shard_path(self.decode_dir, array, shard_index)

    def is_decoded(self, array: str, shard_index: int) -> bool:
        """Whether the shard is decoded: its copy on disk (checked or not), or being written from this process."""
        return (array, shard_index) in self._unwritten or self.path(array, shard_index).exists()

    def get(self, array: str, shard_index: int) -> np.ndarray:
        """The decoded shard [n, *trailing] as a read-only memory map (decoded first if needed)."""
        self._check_process()
        key = (array, shard_index)
        with self._lock:
            cached = self._maps.get(key)
            if cached is not None:
                self._maps.move_to_end(key)
                return cached
        future = self._inflight.get(self._decode_key(array, shard_index))
        if future is not None:
            # A background decode of this very shard is under way: its error is this read's error.
            future.result()
        mm = self._map(array, shard_index)
        with self._lock:
            if key in self._maps and key not in self._unwritten:
                mm = self._maps[key]  # its copy was written and mapped while this read was served from memory
            self._remember(key, mm)
        self._touch(key)
        return mm

    def _map(self, array: str, shard_index: int) -> np.ndarray:
        """Map the decoded copy, decoding it when absent, damaged or of the wrong shape."""
        path = self.path(array, shard_index)
        spec = self.specs[array]
        start, stop = self.layout.shard_range(shard_index)
        expected_shape = tuple(spec.shape(stop - start))
        for _ in range(_MAP_ATTEMPTS):
            unwritten = self._unwritten.get((array, shard_index))
            if unwritten is not None:
                return unwritten
            if not path.exists():
                return self._decode_to(array, shard_index)  # a read waits for this one
            try:
                mm, problem = decoded_fmt.map_decoded_copy(path, known_good=self._known_good)
            except FileNotFoundError:
                continue  # evicted by another process between decode and map: decode again
            if problem is None and (mm.shape != expected_shape or mm.dtype != spec.dtype):
                problem = f"holds {mm.dtype}{list(mm.shape)}, expected {spec.dtype}{list(expected_shape)}"
            if problem is None:
                return mm.view(np.ndarray)  # the map stays alive as its base; plain indexing skips memmap's hooks
            self._discard_damaged(path, array, shard_index, problem)
        raise CacheError(f"decoded shard {path} keeps disappearing or failing its check: is the decoded-shard "
                         "size limit too small, or is the disk under the decode directory failing?")

    def _remember(self, key: tuple[str, int], data: np.ndarray) -> None:
        """Keep a shard's array for the next reads, within ``max_open`` (least recently used dropped); under
        ``self._lock``."""
        self._maps[key] = data
        self._maps.move_to_end(key)
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)

    def _discard_damaged(self, path: Path, array: str, shard_index: int, problem: str) -> None:
        log.warning("kdcache: decoded copy of %r shard %d at %s %s; decoding it again from the stored shard",
                    array, shard_index, path, problem)
        self.redecoded += 1
        path.unlink(missing_ok=True)
        with self._lock:
            self._maps.pop((array, shard_index), None)

    def _decode_to(self, array: str, shard_index: int) -> np.ndarray:
        """Decode a shard and return it (read-only, in memory); a format v2 slot group is decoded whole (one
        sort per position), and its other members not decoded yet too.

        The stored bytes' digest is checked in the hashing thread while this thread decodes them, and nothing
        is served or published before it passed. The shard is decoded into memory and its copy written with
        its crc32c taken from that memory (``decoded.write_decoded_copy``: no writable map to fault in, no
        msync, no re-read); the map of the copy then replaces the memory. The writer thread writes the copy
        while reads are served from that memory, so neither a read waiting for this shard nor one waiting for a
        background decode of it (the loader's lookahead decodes the first shard too) waits for the write.
        """
        failed = self._write_error
        if failed is not None and failed[0] != shard_index:  # a copy written behind an earlier read failed
            self._write_error = None
            raise failed[1]
        targets = [array] + [name for name in slots.group_arrays(self.layout, array)[1:]
                             if not self.is_decoded(name, shard_index)]
        inputs = dict.fromkeys([*targets, *fmt.decode_inputs(self.layout, array)])
        raws = {name: self._read_stored(name, shard_index) for name in inputs}
        hasher = self._pool("_hasher", max(1, self.prefetch_workers), "kdcache-digest")
        checks = [hasher.submit(self._verify_stored, raw, name, shard_index) for name, raw in raws.items()
                  if not self._checked_by_source(name, shard_index)]
        start, stop = self.layout.shard_range(shard_index)
        self._remove_stale_tmp_files()
        try:
            outs = {name: np.empty(self.specs[name].shape(stop - start), self.specs[name].dtype) for name in targets}
            pool = self._pool("_chunk_pool", self.decode_threads, "kdcache-decode") if self.decode_threads > 1 else None
            if len(raws) == 1 and slots.slot_group(self.layout, array) is None:
                fmt.decode_shard(raws[array], self.specs[array], self.layout, shard_index, out=outs[array],
                                 executor=pool)
            else:
                fmt.decode_shard_group(raws, self.layout, shard_index, outs=outs, executor=pool)
        except CacheError:
            for check in checks:
                check.result()  # bytes that fail their digest are reported as such, not as a decode failure
            raise
        finally:
            futures_wait(checks)  # every check is over before anything is published (or the error raised)
        for check in checks:
            check.result()
        for name, data in outs.items():
            data.flags.writeable = False  # a batch copies out of it, like out of a read-only map
            with self._lock:
                self._unwritten[(name, shard_index)] = data
            future = self._pool("_writer", 1, "kdcache-write").submit(self._write_copy, name, shard_index, data)
            with self._inflight_lock:
                self._writes.add(future)
            future.add_done_callback(self._write_done)
        return outs[array]

    def _write_copy(self, name: str, shard_index: int, data: np.ndarray) -> None:
        """Publish the decoded copy of a shard held in memory, then map it in place of that memory."""
        key, final = (name, shard_index), self.path(name, shard_index)
        mapped = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            decoded_fmt.write_decoded_copy(self._tmp_path(final), final, data)
            self._known_good.add(decoded_fmt.file_identity(final))  # written here: no need to check it again
            self._touched_s[key] = time.monotonic()
            mm, problem = decoded_fmt.map_decoded_copy(final, known_good=self._known_good)
            mapped = mm.view(np.ndarray) if problem is None else None
        except FileNotFoundError:
            pass  # evicted already by another process: this process keeps the memory until it lets go of it
        except OSError as exc:
            log.warning("kdcache: the decoded copy of %r shard %d could not be written (%s)", name, shard_index, exc)
            self._write_error = (shard_index, exc)
        with self._lock:
            if mapped is not None and self._maps.get(key, data) is data:
                self._remember(key, mapped)  # the page cache's copy in place of this process's memory
            self._unwritten.pop(key, None)
        if self.max_bytes is not None:
            self._evict(keep=final)

    def _write_done(self, future: Future) -> None:
        with self._inflight_lock:
            self._writes.discard(future)

    def _wait_for_writer(self, limit_bytes: int) -> None:
        """Block until the decoded arrays waiting for the writer hold at most ``limit_bytes`` (-1: until no write is
        pending)."""
        while True:
            with self._lock:
                pending_bytes = sum(data.nbytes for data in self._unwritten.values())
            with self._inflight_lock:
                pending = list(self._writes)
            if pending_bytes <= limit_bytes or not pending:
                return
            futures_wait(pending, return_when=FIRST_COMPLETED)

    def wait_writes(self) -> None:
        """Block until every decoded copy this process is writing is on disk (or failed to be written)."""
        self._wait_for_writer(-1)

    def _read_stored(self, array: str, shard_index: int) -> bytes:
        """A stored shard's bytes from the source (not checked yet: ``_verify_stored``)."""
        return self.source.read_shard(array, shard_index, 1 + len(self.specs[array].trailing_shape))

    def _checked_by_source(self, array: str, shard_index: int) -> bool:
        """Whether the source already checked this shard's bytes against this very manifest entry (remote
        sources do, to fetch a damaged transfer again): then they are not hashed a second time here."""
        if not getattr(self.source, "checks_shards", False):
            return False
        theirs = getattr(self.source, "manifest", None)
        try:
            return theirs is not None and (theirs["shards"][array][shard_index]
                                           == self.manifest["shards"][array][shard_index])
        except (KeyError, IndexError, TypeError):
            return False

    def _verify_stored(self, raw: bytes, array: str, shard_index: int) -> None:
        """Raise CorruptShardError unless the bytes match the manifest's size and digest (hashlib and xxhash
        release the GIL on large buffers, so this runs beside the decode)."""
        fmt.verify_shard_bytes(raw, self.manifest["shards"][array][shard_index], array, shard_index)

    def _pool(self, attribute: str, threads: int, name: str) -> ThreadPoolExecutor:
        """This process's thread pool kept in ``attribute`` (made on first use; ``close`` stops it)."""
        with self._inflight_lock:
            pool = getattr(self, attribute)
            if pool is None:
                pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
                setattr(self, attribute, pool)
            return pool

    @staticmethod
    def _tmp_path(path: Path) -> Path:
        return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")

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
        if (array, shard_index) in self._maps:  # mapped here already: no path to build, no stat (a per-batch call)
            return
        if not 0 <= shard_index < self.layout.num_shards or self.is_decoded(array, shard_index):
            return
        key = self._decode_key(array, shard_index)
        with self._inflight_lock:
            if key in self._inflight:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max(1, self.prefetch_workers),
                                                    thread_name_prefix="kdcache-prefetch")
            future = self._executor.submit(self._prefetch_one, array, shard_index)
            self._inflight[key] = future
        future.add_done_callback(lambda _f, key=key: self._inflight.pop(key, None))

    def _decode_key(self, array: str, shard_index: int) -> tuple[str, int]:
        """What one decode produces: a format v2 slot group is decoded whole, so its members share a key."""
        group = slots.slot_group(self.layout, array)
        return (f"group:{group.name}" if group is not None else array, shard_index)

    def _prefetch_one(self, array: str, shard_index: int) -> None:
        # Errors stay in the future: a read waiting for this shard raises them; nobody else sees them.
        # Decodes ahead of the reads do not pile up in memory behind the writer: one starts once at most one
        # shard's worth of copies is still waiting to be written (not none: the lookahead queues every array of
        # the first shard, and the batch that needs them should not wait for the copies of the others).
        self._wait_for_writer(self._shard_bytes)
        if not self.is_decoded(array, shard_index):
            self._decode_to(array, shard_index)

    def wait_prefetch(self) -> None:
        """Block until background decodes finish and their copies are on disk (their errors surface on the
        reads that need them)."""
        for future in list(self._inflight.values()):
            try:
                future.result()
            except Exception:
                pass
        self.wait_writes()

    def close(self) -> None:
        """Stop the background threads of this process (they restart on the next prefetch)."""
        if self._pid == os.getpid():
            for pool in (self._executor, self._hasher, self._chunk_pool):  # decodes first: they use the others
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            if self._writer is not None:
                self._writer.shutdown(wait=True)  # copies decoded so far are finished, not dropped
        self._executor = self._hasher = self._chunk_pool = self._writer = None

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
            os.utime(self.path(*key))
        except FileNotFoundError:
            pass

    def decoded_bytes(self) -> int:
        """Bytes of this cache's decoded copies on disk (all processes' together), once this process's
        pending copies are written."""
        self.wait_writes()
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

