"""The cache classes: ``CacheReader`` (any source) and ``LocalCache`` (a directory), read as torch batches.

Shape notation::

    n  sequences in a batch        T  positions per sequence
    K  top-k entries per position  V  teacher vocabulary size

A batch is a ``dict`` of torch tensors::

    input_ids      [n, T]     int32 (int64 with widen=True)
    topk_ids       [n, T, K]  int32 (int64 with widen=True)
    topk_logprobs  [n, T, K]  float16 as stored (float32 with widen=True)
    lse            [n, T]     float32  teacher full-vocab logsumexp
    lse_t{tau:g}   [n, T]     float32  logsumexp(logits/tau) for each build temperature

Every tensor of a batch owns its memory: it is a copy out of the decoded shard's memory map, never a view
of it, so a training step may edit a batch in place (``batch["topk_logprobs"].mul_(0.5)``) without
changing what any later read returns. The decoding itself (once per shard, into a memory-mapped ``.npy``
copy under the decode directory) is ``kdlib.data.store.DecodedShardStore``'s job; where stored bytes come
from is the source's (``kdlib.data.sources``, ``kdlib.data.remote``).

A cache object pickles: the copy in another process (a spawn DataLoader worker) reads the same manifest
with the same options and opens its own memory maps, threads and connections there; a forked copy
notices the new process id and does the same.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from cache_server import format as fmt
from cache_server.format import CacheError, CorruptShardError
from cache_server.format.decoded import decoded_cache_dir, default_decode_root
from kdlib.data.sources import LocalShardSource, ShardSource
from kdlib.data.store import DecodedShardStore

__all__ = [
    "CacheReader",
    "LocalCache",
    "PER_SEQUENCE_ARRAYS",
    "RENAMED_OPTIONS",
    "default_decode_root",
    "CacheError",
    "CorruptShardError",
]

PER_SEQUENCE_ARRAYS = ("seq_nll", "seq_entropy")

# Old option name -> its one name now. The old names keep working, with a DeprecationWarning.
RENAMED_OPTIONS = {"shard_cache_dir": "decode_dir", "shard_cache_bytes": "max_decoded_bytes"}


def _resolve_renamed_options(
    owner: str, options: dict[str, Any], deprecated: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Fold old option names (``RENAMED_OPTIONS``) into their new names, warning once per old name used.

    Args:
        owner: the class named in messages.
        options: the new-named options as the caller passed them (defaults filled in); updated and returned.
        deprecated: the remaining keyword arguments (old names; anything else is a TypeError).
        defaults: each new name's default, to tell "not passed" from a conflicting value.

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: an old and a new name both given, with different values.
    """
    unknown = sorted(set(deprecated) - set(RENAMED_OPTIONS))
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments {unknown}")
    for old, value in deprecated.items():
        new = RENAMED_OPTIONS[old]
        warnings.warn(f"{owner}({old}=...) is deprecated: it is now called {new}=... (same meaning)",
                      DeprecationWarning, stacklevel=4)
        current = options[new]
        if current != defaults[new] and _as_path(current) != _as_path(value):
            raise ValueError(f"{owner}() got both {old}={value!r} and {new}={current!r}: they name the same "
                             f"setting; pass only {new}")
        options[new] = value
    return options


def _as_path(value: Any) -> Any:
    return Path(value) if isinstance(value, (str, os.PathLike)) else value


class CacheReader:
    """A cache, local or remote, with the same interface either way.

    Args:
        source: stored shard bytes (``LocalShardSource``, or ``kdlib.data.remote.HttpShardSource``).
        decode_dir: root for decoded shards (default: ``default_decode_root()``); this cache uses a
            subdirectory named by its manifest hash (``self.decode_dir``; the root is ``self.decode_root``).
        widen: default for ``read(..., widen=)``: int64 ids and float32 values instead of compact dtypes.
        readahead: shards to decode ahead in the background when reading sequentially (0 disables).
        max_decoded_bytes: size limit of this cache's decoded shards on local disk (LRU); None = unlimited.
        prefetch_workers: background decode (and, remotely, fetch) threads.
        decode_threads: threads decoding the inner chunks of one shard together (None: one per CPU core, at
            most 8; 1: none besides the decoding thread). The values are the same either way.
        **deprecated: ``shard_cache_dir`` / ``shard_cache_bytes``, old names of ``decode_dir`` /
            ``max_decoded_bytes`` (DeprecationWarning).
    """

    # Each class's default size limit (a remote cache has one: what it decodes, it also downloaded).
    DEFAULT_MAX_DECODED_BYTES: int | None = None

    def __init__(
        self,
        source: ShardSource,
        *,
        decode_dir: str | os.PathLike | None = None,
        widen: bool = False,
        readahead: int = 1,
        max_decoded_bytes: int | None = None,
        prefetch_workers: int = 1,
        decode_threads: int | None = None,
        **deprecated: Any,
    ) -> None:
        if deprecated:
            renamed = _resolve_renamed_options(
                type(self).__name__, {"decode_dir": decode_dir, "max_decoded_bytes": max_decoded_bytes}, deprecated,
                {"decode_dir": None, "max_decoded_bytes": self.DEFAULT_MAX_DECODED_BYTES},
            )
            decode_dir, max_decoded_bytes = renamed["decode_dir"], renamed["max_decoded_bytes"]
        raw = source.manifest_bytes()
        self.source = source
        self.manifest: dict[str, Any] = fmt.parse_manifest(raw, source=f"{source.description}/{fmt.MANIFEST_NAME}")
        self.layout = fmt.layout_from_manifest(self.manifest)
        self.decode_root = Path(decode_dir) if decode_dir is not None else default_decode_root()
        self.decode_dir = decoded_cache_dir(self.decode_root, raw)
        self.store = DecodedShardStore(
            source, self.manifest, self.decode_dir, max_bytes=max_decoded_bytes, prefetch_workers=prefetch_workers,
            decode_threads=decode_threads,
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

    @property
    def max_decoded_bytes(self) -> int | None:
        """The size limit of this cache's decoded shards (None: unlimited)."""
        return self.store.max_bytes

    @property
    def prefetch_workers(self) -> int:
        """Background decode (and, remotely, fetch) threads."""
        return self.store.prefetch_workers

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

    # ------------------------------------------------------------------ pickling (worker processes)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but process-local state: the store and the source drop their maps, threads, locks and
        connections themselves, and the copy starts with no readahead history."""
        state = self.__dict__.copy()
        state["_last_shard"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ reading

    def _check_arrays(self, arrays: Sequence[str] | None) -> list[str]:
        if arrays is None:
            return self.position_arrays()
        if isinstance(arrays, str):
            raise TypeError(f"arrays= takes a list of array names, got the string {arrays!r}; pass [{arrays!r}]")
        unknown = [a for a in arrays if a not in self.store.specs]
        if unknown:
            raise KeyError(f"unknown arrays {unknown}; this cache has {sorted(self.store.specs)}")
        return list(arrays)

    def read(
        self, start: int, stop: int, *, arrays: Sequence[str] | None = None, widen: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Sequences [start, stop) as a dict of torch tensors (see the module docstring for dtypes).

        Each tensor owns its memory (a copy out of the decoded shard), so editing it in place is safe.
        """
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
        # Shards of this batch not decoded yet are fetched/decoded in parallel with the first one.
        self.prefetch_shards(range(first + 1, last + 1), names)
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if first == last:
                data = self.store.get(name, first)[start - first * S : stop - first * S]  # a view of the map
                out[name] = self._to_tensor(data, widen, owned=False)
            else:
                parts = [
                    self.store.get(name, s)[max(start, s * S) - s * S : min(stop, (s + 1) * S) - s * S]
                    for s in range(first, last + 1)
                ]
                out[name] = self._to_tensor(np.concatenate(parts), widen, owned=True)
        self._maybe_readahead(last, names)
        return out

    def lookup(
        self, sequence_indices: Sequence[int] | np.ndarray | torch.Tensor, *, arrays: Sequence[str] | None = None,
        widen: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sequences at arbitrary indices, in the order given (each tensor owns its memory, like ``read``)."""
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
        self.prefetch_shards(shards[1:].tolist(), names)  # decoded in parallel with the first one
        # Batches of a shuffle window span several shards: per shard, where its rows go and which rows they are
        # (computed once for every array).
        positions = [np.flatnonzero(shard_of == s) for s in shards] if shards.size > 1 else []
        parts = [(int(s), pos, idx[pos] - s * S) for s, pos in zip(shards, positions)]
        out: dict[str, torch.Tensor] = {}
        for name in names:
            spec = self.store.specs[name]
            data = np.empty((idx.size, *spec.trailing_shape), dtype=spec.dtype)
            if shards.size == 1:  # gather straight into the batch, no temporary
                np.take(self.store.get(name, int(shards[0])), idx - shards[0] * S, axis=0, out=data)
            else:
                for s, pos, rows in parts:
                    data[pos] = np.take(self.store.get(name, s), rows, axis=0)
            out[name] = self._to_tensor(data, self.widen if widen is None else widen, owned=True)
        return out

    def prefetch_shards(self, shard_indices: Iterable[int], arrays: Sequence[str] | None = None) -> None:
        """Fetch and decode these shards of these arrays in the background, then return at once.

        Shards already decoded (or already being decoded) are skipped. A failure (a corrupt or missing shard,
        an unreachable server) is never raised here, on the caller's thread: it is raised by the later
        ``read``/``lookup`` that needs the shard.

        Args:
            shard_indices: shard numbers, each in ``[0, num_shards)``.
            arrays: array names (default: ``position_arrays()``, what a batch carries).

        Raises:
            KeyError: an unknown array name.
            IndexError: a shard number outside ``[0, num_shards)``.
        """
        names = self._check_arrays(arrays)
        for shard_index in shard_indices:
            shard_index = int(shard_index)
            if not 0 <= shard_index < self.num_shards:
                raise IndexError(f"shard {shard_index} is outside [0, {self.num_shards}) for prefetch_shards")
            for name in names:
                self.store.prefetch(name, shard_index)

    def sequence_stats(self) -> dict[str, torch.Tensor]:
        """Per-sequence teacher statistics ``seq_nll`` and ``seq_entropy``, [N] float32 each."""
        return self.read(0, self.num_sequences, arrays=list(PER_SEQUENCE_ARRAYS))

    @staticmethod
    def _to_tensor(data: np.ndarray, widen: bool, *, owned: bool) -> torch.Tensor:
        """A tensor owning its memory; ``owned`` says whether ``data`` already is a fresh array (not a map view)."""
        if widen:
            # numpy's casts are vectorized for every dtype pair; torch's uint16 casts are not (~300x slower).
            data = data.astype(np.float32 if data.dtype.kind == "f" else np.int64)
        elif data.dtype == np.uint16:
            # torch's uint16 lacks comparisons, min/max and indexing; the cast to int32 is the copy.
            data = data.astype(np.int32)
        else:
            if data.dtype == np.uint32:
                data = data.view(np.int32)  # token ids are < 2**31: the same numbers as int32
            if not owned:
                data = np.array(data)  # out of the read-only map: a batch never aliases the decoded copy
        return torch.from_numpy(data)

    def _empty(self, name: str, widen: bool) -> torch.Tensor:
        spec = self.store.specs[name]
        return self._to_tensor(np.empty((0, *spec.trailing_shape), dtype=spec.dtype), widen, owned=True)

    def _maybe_readahead(self, last_shard: int, names: list[str]) -> None:
        """When reading forward, decode the next shard(s) in the background (cold reads overlap decoding)."""
        if self.readahead <= 0 or last_shard == self._last_shard:
            return
        sequential = last_shard == self._last_shard + 1
        self._last_shard = last_shard
        if sequential:
            self.prefetch_shards(range(last_shard + 1, min(last_shard + 1 + self.readahead, self.num_shards)), names)

    def prepare(self, progress: bool = False) -> None:
        """Decode every shard now and wait until their copies are on disk (e.g. before timing, or before forking
        workers)."""
        items = [(name, s) for s in range(self.num_shards) for name in self.store.specs]
        iterator = items
        if progress:
            from tqdm import tqdm

            iterator = tqdm(items, desc="decoding shards", unit="shard")
        for name, s in iterator:
            self.store.get(name, s)
        self.store.wait_writes()  # every copy on disk: workers forked next map them instead of decoding again

    def close(self) -> None:
        """Stop background decoding and release the source's connections (both restart on demand)."""
        self.store.close()
        self.source.close()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalCache(CacheReader):
    """A cache directory on a local or mounted filesystem.

    Args:
        cache_dir: the cache directory.
        **options: ``decode_dir``, ``widen``, ``readahead``, ``max_decoded_bytes``, ``prefetch_workers``,
            ``decode_threads``: see ``CacheReader``.
    """

    def __init__(self, cache_dir: str | os.PathLike, **options: Any) -> None:
        super().__init__(LocalShardSource(cache_dir), **options)
        self.path = Path(cache_dir)
