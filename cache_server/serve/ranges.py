"""HTTP byte ranges of stored shard files: parse one ``Range`` and send exactly the window it validated.

The server parses ``Range`` itself and never hands the request's ``Range`` to Starlette's ``FileResponse``,
whose Range support depends on the installed version (none before 0.39, multi-range, ``If-Range`` by date):
the per-request byte limit holds whatever Starlette does.
"""

from __future__ import annotations

import re
from typing import IO, Iterator

from fastapi.responses import StreamingResponse

__all__ = ["RangeNotSatisfiable", "parse_single_range", "ByteWindowResponse", "SEND_PIECE_BYTES"]

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*$", re.IGNORECASE)
SEND_PIECE_BYTES = 1 << 20  # ~1 MB body messages: few thread-pool hops per request, bounded memory


class RangeNotSatisfiable(ValueError):
    """A Range header this server will not serve (malformed, multi-range, or outside the file)."""


def parse_single_range(header: str, size_bytes: int) -> tuple[int, int]:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → [start, end) within a file of ``size_bytes``.

    Only single byte ranges are served (a shard client never needs more); anything else is 416 rather than
    being silently ignored, so a client bug shows up instead of a full-body download.

    Args:
        header: the request's ``Range`` value.
        size_bytes: size of the file the range applies to.

    Returns:
        (start, end): the byte window [start, end), clipped to the file.

    Raises:
        RangeNotSatisfiable: malformed, multi-part, empty, or starting past the end of the file.
    """
    match = _RANGE_RE.match(header)
    if match is None or (not match[1] and not match[2]):
        raise RangeNotSatisfiable(f"unsupported Range {header[:80]!r}: send one range, e.g. 'bytes=0-1023'")
    if not match[1]:  # suffix: the last n bytes
        suffix = int(match[2])
        if suffix == 0:
            raise RangeNotSatisfiable("Range 'bytes=-0' selects no bytes")
        return max(0, size_bytes - suffix), size_bytes
    start = int(match[1])
    if start >= size_bytes:
        raise RangeNotSatisfiable(f"Range starts at byte {start}, but the shard has {size_bytes} bytes")
    if match[2]:
        last = int(match[2])
        if last < start:
            raise RangeNotSatisfiable(f"Range end {last} is before its start {start}")
        return start, min(last + 1, size_bytes)
    return start, size_bytes


def _read_window(file: IO[bytes], start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of an open file, in pieces; closes the file. Runs in the thread pool."""
    with file:
        file.seek(start)
        remaining = end - start
        while remaining > 0:
            piece = file.read(min(SEND_PIECE_BYTES, remaining))
            if not piece:
                # The file shrank after the headers went out: end the response short (the client resumes or
                # refetches) rather than pad it.
                raise OSError(f"shard file ended {remaining} bytes early while being sent")
            remaining -= len(piece)
            yield piece


class ByteWindowResponse(StreamingResponse):
    """Exactly bytes [start, end) of an open file: 206 with Content-Range when it answers a Range, else 200.

    The window is fixed before the status line goes out and is checked against the byte limit here, so no
    request header can make the body larger (unlike ``FileResponse``, which re-reads ``Range``/``If-Range``).
    The response takes the file over and closes it once sent.
    """

    def __init__(self, file: IO[bytes], start: int, end: int, size_bytes: int, max_bytes: int,
                 headers: dict[str, str], *, is_range: bool) -> None:
        whole_or_range = is_range or (start, end) == (0, size_bytes)
        if not (0 <= start <= end <= size_bytes and end - start <= max_bytes and whole_or_range):
            raise ValueError(f"byte window [{start}, {end}) of {size_bytes} bytes breaks the {max_bytes}-byte limit")
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start)}
        if is_range:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size_bytes}"
        super().__init__(_read_window(file, start, end), status_code=206 if is_range else 200, headers=headers,
                         media_type="application/octet-stream")
