"""What every importer reader provides: its files, what it knows and lacks, and its rows in kdcache's convention."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cache_server.interop.positions import SourceRow

__all__ = ["Source"]


@dataclass
class Source:
    """A peer's KD dataset opened for import (subclasses implement :meth:`rows`).

    Attributes:
        kind: the ``--from`` name.
        path: what the user passed.
        files: the data files read, in order (their sha256 decide whether a rerun resumes).
        vocab_size: the teacher vocabulary when the source records it (DistillKit's ``d``), else None.
        has_lse: the rows carry the full-vocabulary logsumexp (the tail is then exact).
        provenance: what the source is and lacks, copied into the manifest's ``provenance``.
        shift_fix: per content-detected shift d (see ``alignment.py``), the option that imports it right.
    """

    kind: str
    path: Path
    files: list[Path]
    vocab_size: int | None = None
    has_lse: bool = False
    temperatures: tuple[float, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    shift_fix: dict[int, str] = field(default_factory=dict)

    def rows(self) -> Iterator[SourceRow]:
        raise NotImplementedError
