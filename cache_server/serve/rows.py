"""The ``/rows`` endpoint: decoded sequences [start, stop) of chosen arrays as an Arrow IPC stream.

Shape notation::

    N  sequences in a cache    S  sequences per shard    n = stop - start  rows in the response

Every shard the rows touch is read, checksummed and decoded (``DecodedShardLRU``) before the status line
goes out, so a corrupt or missing shard is a clean error response instead of a truncated stream.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from fastapi import HTTPException
from fastapi.responses import Response, StreamingResponse

from cache_server import format as fmt
from cache_server.format import wire
from cache_server.serve.arrow import arrow_schema, stream_rows
from cache_server.serve.config import ServerLimits, ServerState
from cache_server.serve.decoded import DecodedShardLRU, MissingShardError
from cache_server.serve.handlers import find_cache, shard_missing_response, shown
from cache_server.serve.registry import RegisteredCache

__all__ = ["rows_response", "select_arrays", "check_row_limits"]


def select_arrays(cache: RegisteredCache, arrays: str | None) -> list[fmt.ArraySpec]:
    """Specs of the comma-separated array names (None: every array), else 400.

    Raises:
        HTTPException: 400 for unknown or repeated names, or an empty list.
    """
    names = [a.strip() for a in arrays.split(",") if a.strip()] if arrays is not None else list(cache.specs)
    unknown = [a for a in names if a not in cache.specs]
    if unknown or not names or len(set(names)) != len(names):
        raise HTTPException(
            400, f"arrays must be distinct names from {sorted(cache.specs)}; got "
            f"[{', '.join(shown(a[:128]) for a in names[:16])}]"
        )
    return [cache.specs[a] for a in names]


def check_row_limits(limits: ServerLimits, specs: Sequence[fmt.ArraySpec], num_rows: int) -> None:
    """413 when ``num_rows`` rows of ``specs`` exceed the row or byte limit (the message says what fits)."""
    row_bytes = sum(spec.bytes_per_sequence() for spec in specs)
    if num_rows > limits.max_rows or num_rows * row_bytes > limits.max_response_bytes:
        allowed = min(limits.max_rows, limits.max_response_bytes // max(1, row_bytes))
        raise HTTPException(
            413, f"{num_rows} rows of {[spec.name for spec in specs]} ({num_rows * row_bytes} bytes) exceed this "
            f"server's limits ({limits.max_rows} rows, {limits.max_response_bytes} bytes per request): ask for at "
            f"most {allowed} rows",
        )


def _decode_shards(decoded: DecodedShardLRU, cache: RegisteredCache, specs: Sequence[fmt.ArraySpec], start: int,
                   stop: int) -> dict[tuple[str, int], np.ndarray]:
    """``{(array, shard_index): decoded shard [S', ...]}`` for every shard rows [start, stop) touch."""
    S = cache.layout.shard_seqs
    shard_indices = range(start // S, (stop - 1) // S + 1) if stop > start else range(0)
    return {(spec.name, s): decoded.get(cache, spec.name, s) for s in shard_indices for spec in specs}


def rows_response(state: ServerState, name: str, start: int, stop: int, arrays: str | None) -> Response:
    """Decoded sequences [start, stop) of ``arrays`` (comma-separated; None: all) as an Arrow IPC stream.

    Returns:
        A streamed Arrow IPC response (ETag: the manifest's sha256); 404 + ``X-Kdcache-Error: shard-missing``
        when a shard file is gone from the server's disk.

    Raises:
        HTTPException: 404 unknown cache, 400 bad arrays or start > stop, 416 rows outside the cache,
            413 over the limits, 500 a stored shard that fails its manifest checksum.
    """
    cache = find_cache(state, name)
    if start > stop:
        raise HTTPException(400, f"start ({start}) must be <= stop ({stop})")
    if stop > cache.layout.num_sequences:
        raise HTTPException(
            416, f"rows [{start}, {stop}) are outside the cache's {cache.layout.num_sequences} sequences"
        )
    specs = select_arrays(cache, arrays)
    check_row_limits(state.limits, specs, stop - start)
    try:
        shards = _decode_shards(state.decoded, cache, specs, start, stop)
    except MissingShardError as exc:
        state.metrics.corrupt_shards.labels(name, exc.array).inc()
        return shard_missing_response(name, exc.array, exc.shard_index)
    except fmt.CorruptShardError as exc:
        state.metrics.corrupt_shards.labels(name, exc.array).inc()
        raise HTTPException(500, f"server-side {exc}")
    schema = arrow_schema(
        specs,
        {"kdcache.cache": name, "kdcache.manifest_sha256": cache.manifest_sha256,
         "kdcache.start": str(start), "kdcache.stop": str(stop)},
    )
    body = stream_rows(schema, specs, start, stop, cache.layout.shard_seqs, lambda a, s: shards[(a, s)])
    return StreamingResponse(
        body, media_type=wire.ARROW_STREAM_MEDIA_TYPE, headers={"ETag": wire.quoted_etag(cache.manifest_sha256)}
    )
