"""Arrow tables of peers' KD datasets, read batch by batch: Parquet files, directories of them, and
``datasets.save_to_disk`` directories (their Arrow stream files, read with pyarrow alone).

Shape notation::

    L  positions of one row      K  entries per position
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from cache_server.format.errors import CacheError

__all__ = ["InteropError", "source_files", "iter_batches", "files_fingerprint", "list_rows", "nested_rows",
           "column_names"]

BATCH_ROWS = 256


class InteropError(CacheError):
    """A source dataset that cannot be imported as given (the message says what is wrong and what to do)."""


def source_files(src: str | Path, suffixes: Sequence[str] = (".parquet",)) -> list[Path]:
    """The data files of ``src``: the file itself, a ``save_to_disk`` directory's Arrow files (``state.json``
    order), or a directory's files with one of ``suffixes`` in name order."""
    path = Path(src)
    if not path.exists():
        raise InteropError(f"source {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    state = path / "state.json"
    if state.exists():
        try:
            meta = json.loads(state.read_text())
            files = [path / entry["filename"] for entry in meta["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InteropError(f"{state} is not a `datasets.save_to_disk` state file ({exc})") from exc
        if meta.get("_indices_data_files"):
            raise InteropError(f"{path} holds an indices mapping (a shuffled or selected view); save it with "
                               "`ds.flatten_indices().save_to_disk(...)` first")
        return files
    if (path / "dataset_dict.json").exists():
        raise InteropError(f"{path} holds several splits; pass one split's directory (e.g. {path / 'train'})")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(tuple(suffixes)))
    if not files:
        raise InteropError(f"{path} holds no {'/'.join(suffixes)} file and no datasets `state.json`")
    return files


def files_fingerprint(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Name, size and sha256 of each source file: what a resumed import is compared on."""
    out = []
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        out.append({"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
    return out


def _open(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.ParquetFile(path)
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r"))


def column_names(path: Path) -> list[str]:
    """The column names of one data file."""
    handle = _open(path)
    return list(handle.schema_arrow.names if hasattr(handle, "schema_arrow") else handle.schema.names)


def iter_batches(files: Sequence[Path], columns: Sequence[str]) -> Iterator[Any]:
    """``pyarrow.RecordBatch`` es of ``columns`` over ``files``, in order (InteropError naming a missing column)."""
    import pyarrow as pa

    for path in files:
        names = column_names(path)
        missing = [c for c in columns if c not in names]
        if missing:
            raise InteropError(f"{path} has no column {missing[0]!r} (its columns: {names})")
        try:
            handle = _open(path)
            if hasattr(handle, "iter_batches"):  # Parquet
                yield from handle.iter_batches(batch_size=BATCH_ROWS, columns=list(columns))
            elif hasattr(handle, "num_record_batches"):  # Arrow IPC file
                for index in range(handle.num_record_batches):
                    yield handle.get_batch(index).select(list(columns))
            else:  # Arrow IPC stream (datasets.save_to_disk)
                for batch in handle:
                    yield batch.select(list(columns))
        except (pa.ArrowException, OSError) as exc:
            raise InteropError(f"cannot read {path} ({exc}); is it damaged or of another format?") from exc


def _offsets(array) -> np.ndarray:
    return np.asarray(array.offsets, dtype=np.int64)


def list_rows(column, name: str) -> list[np.ndarray]:
    """A list column of one batch -> per row a 1-D numpy array [L] (InteropError for nulls)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if column.null_count:
        raise InteropError(f"column {name!r} has null rows; drop or fill them before importing")
    offsets = _offsets(column)
    values = column.values.to_numpy(zero_copy_only=False)
    values = values[offsets[0]:offsets[-1]]
    return np.split(values, offsets[1:-1] - offsets[0])


def nested_rows(column, name: str) -> list[np.ndarray]:
    """A list-of-lists column of one batch -> per row a 2-D array [L, K] (InteropError if K varies in a row)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if column.null_count or column.values.null_count:
        raise InteropError(f"column {name!r} has null entries; drop or fill them before importing")
    outer = _offsets(column)
    inner = _offsets(column.values)
    flat = column.values.values.to_numpy(zero_copy_only=False)
    rows = []
    for r in range(len(column)):
        lo, hi = outer[r], outer[r + 1]
        starts = inner[lo:hi + 1]
        widths = np.diff(starts)
        if widths.size and (widths != widths[0]).any():
            bad = int(np.argmax(widths != widths[0]))
            raise InteropError(f"column {name!r} row {r} of its batch has {widths[0]} entries at position 0 but "
                               f"{widths[bad]} at position {bad}; every position needs the same top-k")
        width = int(widths[0]) if widths.size else 0
        rows.append(flat[starts[0]:starts[-1]].reshape(hi - lo, width))
    return rows
