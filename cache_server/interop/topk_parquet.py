"""A plain top-k Parquet: read for ``kdcache import --from parquet`` (``export.py`` writes the same layout).

Columns (one row per sequence)::

    input_ids          list<int>         [L]     the tokens the teacher saw
    topk_ids           list<list<int>>   [L, K]  position t: the teacher's top-k for token t+1 (kdcache's
                                                 convention, ``cache_server.format.ALIGNMENT_CONVENTION``)
    topk_logprobs      list<list<float>> [L, K]  log p_teacher at temperature 1, normalized over the full vocabulary
    teacher_lse        list<float>       [L]     optional: logsumexp of the raw logits over the full vocabulary
    teacher_lse_t{tau} list<float>       [L]     optional, with teacher_lse: logsumexp(logits / tau)

With ``teacher_lse`` the tail mass is exact (kdcache's own export); without it, it is what the log-probs
imply (1 - sum p). The schema metadata key ``kdcache`` (JSON) may give ``vocab_size`` (kdcache's export
writes it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from cache_server.interop.positions import SourceRow
from cache_server.interop.source import Source
from cache_server.interop.tables import InteropError, column_names, iter_batches, list_rows, nested_rows, source_files

__all__ = ["TOPK_COLUMNS", "METADATA_KEY", "TopkParquetSource", "open_topk_parquet"]

TOPK_COLUMNS = ("input_ids", "topk_ids", "topk_logprobs")
METADATA_KEY = b"kdcache"
_LSE_T = re.compile(r"^teacher_lse_t(?P<tau>[0-9.e+-]+)$")


class TopkParquetSource(Source):
    """Plain top-k Parquet file(s) (module docstring)."""

    lse_t_columns: tuple[str, ...] = ()

    def rows(self) -> Iterator[SourceRow]:
        extra = (["teacher_lse"] if self.has_lse else []) + list(self.lse_t_columns)
        for batch in iter_batches(self.files, [*TOPK_COLUMNS, *extra]):
            tokens = list_rows(batch.column("input_ids"), "input_ids")
            ids = nested_rows(batch.column("topk_ids"), "topk_ids")
            logprobs = nested_rows(batch.column("topk_logprobs"), "topk_logprobs")
            lse = {name: list_rows(batch.column(name), name) for name in extra}
            for r, (x, i, lp) in enumerate(zip(tokens, ids, logprobs)):
                if i.shape != lp.shape or i.shape[0] != x.shape[0]:
                    raise ValueError(f"a row has {x.shape[0]} input_ids but topk_ids {i.shape} and topk_logprobs "
                                     f"{lp.shape}: each needs one row of K entries per token")
                lp = lp.astype(np.float32)
                yield SourceRow(x.astype(np.int64), i.astype(np.int64), lp, np.isfinite(lp).any(axis=1),
                                lse=lse["teacher_lse"][r].astype(np.float32) if self.has_lse else None,
                                lse_t={f"lse_t{_LSE_T.match(n)['tau']}": lse[n][r].astype(np.float32)
                                       for n in self.lse_t_columns})


def _metadata(path: Path) -> dict:
    import pyarrow.parquet as pq

    if path.suffix != ".parquet":
        return {}
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError as exc:
        raise InteropError(f"{path}: its {METADATA_KEY.decode()!r} schema metadata is not JSON ({exc})") from exc


def open_topk_parquet(src: str | Path) -> TopkParquetSource:
    """Open plain top-k Parquet file(s) (a file or a directory of them)."""
    files = source_files(src, (".parquet",))
    names = column_names(files[0])
    has_lse = "teacher_lse" in names
    lse_t = tuple(sorted((n for n in names if _LSE_T.match(n)), key=lambda n: float(_LSE_T.match(n)["tau"])))
    if lse_t and not has_lse:
        raise InteropError(f"{files[0]} has {lse_t[0]} but no teacher_lse; the tempered lse needs the plain one")
    meta = _metadata(files[0])
    source = TopkParquetSource(
        kind="parquet", path=Path(src), files=files, vocab_size=meta.get("vocab_size"), has_lse=has_lse,
        temperatures=tuple(float(_LSE_T.match(n)["tau"]) for n in lse_t),
        provenance={"lacks": "nothing: teacher_lse gives the exact tail" if has_lse else
                    "no teacher_lse column: the tail mass is what the log-probs imply (1 - sum p)"},
        shift_fix={-1: "Position t must hold the distribution over token t+1: shift topk_ids/topk_logprobs "
                       "one position earlier (drop the first row, append one at the end) and import again."})
    source.lse_t_columns = lse_t
    return source
