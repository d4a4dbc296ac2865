"""Rows of a cache as an Arrow IPC stream (media type ``cache_server.format.wire.ARROW_STREAM_MEDIA_TYPE``).

Shape notation::

    n  rows (sequences) in a record batch    T  positions per sequence    K  top-k entries

Columns (one row per sequence)::

    sequence_index   int64
    input_ids        fixed_size_list<uint16|uint32>[T]
    topk_ids         fixed_size_list<fixed_size_list<uint16|uint32>[K]>[T]
    topk_logprobs    fixed_size_list<fixed_size_list<float16|float32>[K]>[T]
    lse, lse_t{tau}  fixed_size_list<float32>[T]
    seq_nll, ...     float32

A consumer gets a flat [n, T, K] view with ``col.values.values.to_numpy().reshape(n, T, K)``.
"""

from __future__ import annotations

import io
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from cache_server import format as fmt

__all__ = ["arrow_schema", "record_batch", "stream_rows"]


def _arrow_type(spec: fmt.ArraySpec) -> pa.DataType:
    arrow_type = pa.from_numpy_dtype(spec.dtype)
    for dim in reversed(spec.trailing_shape):
        arrow_type = pa.list_(arrow_type, dim)
    return arrow_type


def arrow_schema(specs: Sequence[fmt.ArraySpec], metadata: dict[str, str]) -> pa.Schema:
    """``sequence_index`` then one non-null column per array (nested fixed-size lists), with ``metadata``."""
    fields = [pa.field("sequence_index", pa.int64(), nullable=False)]
    fields += [pa.field(spec.name, _arrow_type(spec), nullable=False) for spec in specs]
    return pa.schema(fields, metadata=metadata)


def _column(data: np.ndarray) -> pa.Array:
    # data [n, *trailing], C-contiguous: the flat values are wrapped without a copy, then nested.
    values = pa.array(np.ascontiguousarray(data).reshape(-1))
    for dim in reversed(data.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, dim)
    return values


def record_batch(schema: pa.Schema, start: int, columns: Sequence[np.ndarray]) -> pa.RecordBatch:
    """Rows start.. of ``columns`` (each [n, *trailing], in the schema's order) as one record batch."""
    n = columns[0].shape[0]
    arrays = [pa.array(np.arange(start, start + n, dtype=np.int64))] + [_column(c) for c in columns]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def stream_rows(
    schema: pa.Schema,
    specs: Sequence[fmt.ArraySpec],
    start: int,
    stop: int,
    shard_seqs: int,
    get_shard: Callable[[str, int], np.ndarray],
    batch_bytes: int = 1 << 20,
) -> Iterator[bytes]:
    """Yield the IPC stream in pieces of about ``batch_bytes`` (one record batch each).

    Each piece is written into a reused BytesIO and yielded; measured ~2x faster than one big buffer.
    """
    row_bytes = max(1, sum(spec.bytes_per_sequence() for spec in specs))
    rows_per_batch = max(1, batch_bytes // row_bytes)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as writer:
        piece = sink.getvalue()
        sink.seek(0)
        sink.truncate()
        yield piece
        row = start
        while row < stop:
            shard = row // shard_seqs
            hi = min(stop, (shard + 1) * shard_seqs, row + rows_per_batch)
            lo_in, hi_in = row - shard * shard_seqs, hi - shard * shard_seqs
            columns = [get_shard(spec.name, shard)[lo_in:hi_in] for spec in specs]
            writer.write_batch(record_batch(schema, row, columns))
            piece = sink.getvalue()
            sink.seek(0)
            sink.truncate()
            yield piece
            row = hi
    tail = sink.getvalue()  # end-of-stream marker
    if tail:
        yield tail
