"""Text inputs of ``kdcache build``: the local tokenizer, and what one document is in each text format.

Documents (each tokenized as one text by ``text.py``, EOS between documents):

* ``.txt`` with ``--text-documents file`` (the default): the whole file, read in pieces;
* ``.txt`` with ``blank-line``: each run of non-blank lines, without the newline ending its last line;
* ``.txt`` with ``line``: each non-blank line, without its newline;
* ``.jsonl``: the ``text`` field of each JSON object (blank lines skipped);
* a Parquet / Arrow / ``datasets`` string column ``text``: each row.

Files are read as UTF-8 with universal newlines (``\\r\\n`` reads as ``\\n``), like ``Path.read_text``.
Documents that encode to no tokens (an empty ``text``) are skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from cache_server.build.errors import DataError
from cache_server.build.text import Document, TextOffsets, encode_documents, encode_documents_with_offsets

__all__ = [
    "TEXT_DOCUMENT_MODES",
    "TokenizerInfo",
    "load_tokenizer",
    "txt_documents",
    "jsonl_documents",
    "text_column_documents",
    "tokenize_documents",
]

TEXT_DOCUMENT_MODES = ("file", "blank-line", "line")
_TEXT_PIECE_CHARS = 1 << 20  # characters read at once from a .txt file that is one document


@dataclass
class TokenizerInfo:
    """A tokenizer loaded from a local ``tokenizer.json`` (never downloaded)."""

    path: str
    fingerprint: str  # sha256 of tokenizer.json
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int | None

    def manifest_entry(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": "sha256:" + self.fingerprint}


def load_tokenizer(path: str | os.PathLike) -> TokenizerInfo:
    """Load ``tokenizer.json`` from a directory (or the file itself) with the ``tokenizers`` library."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"no tokenizer.json at {path}; pass --tokenizer DIR pointing to a directory with a fast-tokenizer "
            "tokenizer.json (save it with tokenizer.save_pretrained(DIR))"
        )
    raw = file.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(raw.decode())
    except Exception as exc:
        raise DataError(f"cannot load tokenizer {file}: {exc}") from exc
    eos_id = None
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                eos_id = tokenizer.token_to_id(eos)
        except (json.JSONDecodeError, OSError):
            pass
    return TokenizerInfo(str(file.parent.resolve()), hashlib.sha256(raw).hexdigest(), tokenizer, eos_id)


def _text_file_pieces(path: Path, piece_chars: int | None) -> Iterator[str]:
    """The text of ``path`` (universal newlines, like ``Path.read_text``) in pieces, or line by line."""
    try:
        with open(path, encoding="utf-8") as fh:
            if piece_chars is None:
                yield from fh
            else:
                while piece := fh.read(piece_chars):
                    yield piece
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8 first") from exc


def _paragraph(lines: list[str]) -> str:
    text = "".join(lines)
    return text[:-1] if text.endswith("\n") else text


def txt_documents(path: Path, mode: str) -> Iterator[Document]:
    """The documents of a .txt file for ``--text-documents mode`` (see the module docstring)."""
    if mode == "file":
        yield lambda: _text_file_pieces(path, _TEXT_PIECE_CHARS)
        return
    paragraph: list[str] = []
    for line in _text_file_pieces(path, None):
        blank = not line.strip()
        if mode == "line":
            if not blank:
                yield line[:-1] if line.endswith("\n") else line
        elif not blank:
            paragraph.append(line)
        elif paragraph:
            yield _paragraph(paragraph)
            paragraph = []
    if paragraph:
        yield _paragraph(paragraph)


def jsonl_documents(path: Path) -> Iterator[str]:
    for lineno, line in enumerate(_text_file_pieces(path, None), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{lineno}: each JSONL line must be an object with a string \"text\" field")
        yield obj["text"]


def tokenize_documents(
    documents: Iterable[Document], tokenizer: TokenizerInfo | None, source: str, record_offsets: bool = False
) -> tuple[np.ndarray, int, list[str], TextOffsets | None]:
    """(ids, number of documents, notes, offsets) of text documents: each encoded as one text, EOS between them.

    ``offsets`` (``--record-offsets``; else None) holds each token's document and byte span, and each
    document's fingerprint (``cache_server/format/offsets.py``).
    """
    if tokenizer is None:
        raise DataError(
            f"{source} is text; pass --tokenizer DIR (a directory with tokenizer.json, usually the teacher's)"
        )
    documents = iter(documents)
    first = next(documents, None)  # reading starts, and reports bad input, before the tokenizer runs
    if first is None:
        raise DataError(f"{source} holds no documents (no text); nothing to build")
    documents = itertools.chain([first], documents)
    offsets = None
    if record_offsets:
        ids, count, offsets = encode_documents_with_offsets(documents, tokenizer.tokenizer, tokenizer.eos_id)
    else:
        ids, count = encode_documents(documents, tokenizer.tokenizer, tokenizer.eos_id)
    notes = []
    if tokenizer.eos_id is None and count > 1:
        notes.append(
            f"the tokenizer at {tokenizer.path} names no EOS token (tokenizer_config.json eos_token), so the "
            f"{count} documents were joined without a separator"
        )
    return ids, count, notes, offsets


def text_column_documents(column, source: str) -> Iterator[str]:
    """One document per row of a string column (nulls refused; empty strings are skipped by the encoder)."""
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{source}: column 'text' has type {column.type}; expected strings")
    if column.null_count:
        raise DataError(f"{source}: column 'text' has {column.null_count} null rows; drop them first")
    for chunk in column.chunks:
        yield from chunk.to_pylist()
