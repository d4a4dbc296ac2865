"""Counting fresh tensor allocations of the ops a block of code runs (for memory-shape tests)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["FreshAllocations"]


class FreshAllocations(TorchDispatchMode):
    """Records (numel, dtype) of every op output that does not alias one of the op's inputs."""

    def __init__(self):
        super().__init__()
        self.allocs: list[tuple[int, torch.dtype]] = []

    @property
    def numels(self) -> list[int]:
        return [numel for numel, _ in self.allocs]

    @property
    def largest(self) -> int:
        return max(self.numels, default=0)

    def count(self, numel: int) -> int:
        """How many fresh outputs had exactly ``numel`` elements."""
        return sum(n == numel for n, _ in self.allocs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocs.append((t.numel(), t.dtype))
        return out
