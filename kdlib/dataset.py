"""Map-style ``torch.utils.data.Dataset`` over a cache's sequences, for users with their own samplers.

Shape notation::

    B  sequences in a batch   T  positions per sequence   K  top-k entries per position

A sample (``dataset[i]``) is a dict of tensors::

    input_ids           [T]     int32
    labels              [T]     int64   input_ids shifted left, last = ignore_index (the cache convention)
    topk_ids            [T, K]  int32
    topk_logprobs       [T, K]  float16
    lse, lse_t{tau:g}   [T]     float32
    sample_indices      []      int64   i
    teacher_vocab_size  []      int64

Every cached top-k id is checked against the teacher's vocabulary here, on the CPU, so
:func:`kdlib.check_alignment` does not have to scan them on the device.

With a ``DataLoader(batch_size=B)`` the default collate stacks these to the batch layout of
:func:`kdlib.make_loader`. Batched fetching (``__getitems__``, torch >= 2.2) reads a whole batch with one
``cache.lookup`` instead of B single reads. Users whose own loader already yields sequence indices can call
``kdlib.batch.read_batch(cache, indices)`` directly (the same batch assembly as here and in the loader).

Prefer :func:`kdlib.make_loader` for training: it shuffles shard-aware (reads stay sequential), partitions
ranks and workers, and resumes mid-epoch. A random sampler over this dataset touches every shard every batch.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .batch import DEFAULT_IGNORE_INDEX, read_batch

__all__ = ["CacheDataset"]


class CacheDataset(torch.utils.data.Dataset):
    """The cache's sequences by index.

    Args:
        cache: a reader from ``kdlib.open_cache`` or a cache path/URL (opened here with ``open_kwargs``); a
            DataLoader worker gets it by pickling (it reopens the same cache with the same options).
        arrays: per-position arrays to return (default all; ``input_ids`` is always included).
        ignore_index: label of the last position.
        open_kwargs: keyword arguments for ``open_cache`` when ``cache`` is a path/URL.
    """

    def __init__(self, cache: Any, *, arrays: Sequence[str] | None = None,
                 ignore_index: int = DEFAULT_IGNORE_INDEX, open_kwargs: Mapping[str, Any] | None = None) -> None:
        if isinstance(cache, (str, os.PathLike)):
            from .data.open import open_cache

            cache = open_cache(cache, **dict(open_kwargs or {}))
        self.cache = cache
        self.num_sequences = cache.num_sequences
        self.vocab_size = cache.vocab_size
        if arrays is not None and "input_ids" not in arrays:
            arrays = ("input_ids", *arrays)
        self.arrays = tuple(arrays) if arrays is not None else None
        self.ignore_index = int(ignore_index)

    def __len__(self) -> int:
        return self.num_sequences

    def _index(self, index: Any) -> int:
        i = int(index)
        if i < 0:
            i += self.num_sequences
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence index {index} outside [0, {self.num_sequences})")
        return i

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Sequences at ``indices`` as one batch ([B, ...] tensors), in the order given."""
        idx = np.asarray(indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        idx = np.array([self._index(i) for i in idx.reshape(-1)], dtype=np.int64)
        return read_batch(self.cache, idx, self.arrays, self.ignore_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.batch([index])
        scalars = _pop_scalars(batch)
        return {**{k: v[0] for k, v in batch.items()}, **scalars}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """One lookup for a whole sampler batch; the default collate stacks the rows back."""
        batch = self.batch(list(indices))
        scalars = _pop_scalars(batch)
        return [{**{k: v[r] for k, v in batch.items()}, **scalars} for r in range(len(indices))]


def _pop_scalars(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's 0-dim entries (``teacher_vocab_size``, ``sample_temperature``): the same for every row."""
    return {k: batch.pop(k) for k in [k for k, v in batch.items() if v.dim() == 0]}
