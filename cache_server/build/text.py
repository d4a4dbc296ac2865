"""Tokenizing text documents for ``kdcache build``: each document is encoded as ONE text, EOS between documents.

A document is whatever the input format calls one (see ``sources.py``: a whole ``.txt`` file, a paragraph or
a line of it, the ``text`` of one JSONL object, one row of a text column). Its ids are exactly
``tokenizer.encode(document, add_special_tokens=False).ids``, and documents are joined with the EOS id, so
EOS never appears inside a document (nor after the last one).

Long documents are encoded in chunks of about a million characters so that neither the text nor the
tokenizer's working set of a multi-gigabyte file has to be in memory at once. A chunk boundary must be
invisible to the tokenizer, so a chunk is cut only where encoding can restart without changing a token:

* encode the chunk (with character offsets); keep the tokens that end at least ``2 * margin`` characters
  before the chunk's end (far from the truncation, so they do not depend on what follows);
* the cut is the start of a token just after that point which begins at whitespace or a line start, and
  which passes a check: encoding a ``2 * margin`` window that starts at the cut reproduces the chunk's own
  tokens there (same ids, same offsets), so the tokenizer cannot tell the text was cut (no word is split,
  no prefix space is added, no normalizer sees a different start);
* the next chunk starts at the cut, and its first tokens must again equal the chunk's tokens up to
  ``margin`` characters before its end.

When no cut passes (a tokenizer that prepends a space to every input, one giant word), the document is
encoded whole instead: slower for huge inputs, never different.

With ``--record-offsets`` (:func:`encode_documents_with_offsets`) every document is encoded whole (the ids are
the same, see above) and each token's UTF-8 byte span in its document is kept, plus each document's
fingerprint; ``cache_server/format/offsets.py`` defines those arrays.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np

from cache_server.format import offsets as text_offsets

__all__ = ["Document", "TextOffsets", "encode_document", "encode_documents", "encode_documents_with_offsets"]

# A document: its text, or a function returning its text in pieces (read again if it must be encoded whole).
Document = Union[str, Callable[[], Iterable[str]]]

_CHUNK_CHARS = 1 << 20
_MARGIN_CHARS = 512
_CUT_CANDIDATES = 8  # cuts tried per chunk before encoding the document whole
_BATCH_DOCS = 256  # short documents are encoded in batches (the tokenizer parallelizes a batch)


class _Tokens:
    """The ids and character offsets of one encoding, converted to Python lists once."""

    def __init__(self, encoding: Any) -> None:
        self.ids: list[int] = encoding.ids
        self.offsets: list[tuple[int, int]] = encoding.offsets

    def array(self, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.ids[:stop], dtype=np.uint32)

    def starts_with(self, ids: list[int], offsets: list[tuple[int, int]]) -> bool:
        """Whether these are exactly the first tokens (same ids, same offsets)."""
        return self.ids[: len(ids)] == ids and self.offsets[: len(ids)] == offsets

    def span(self, first: int, shift: int, end_limit: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokens ``first``.. that end at or before ``end_limit``, their offsets shifted by ``-shift``."""
        stop = first
        while stop < len(self.ids) and self.offsets[stop][1] <= end_limit:
            stop += 1
        return self.ids[first:stop], [(start - shift, end - shift) for start, end in self.offsets[first:stop]]


def _encode(tokenizer: Any, text: str) -> _Tokens:
    return _Tokens(tokenizer.encode(text, add_special_tokens=False))


def _find_cut(text: str, tokens: _Tokens, tokenizer: Any, margin: int) -> tuple[int, int] | None:
    """(tokens kept, cut position) for a chunk ``text`` and its ``tokens``, or None if no cut is safe."""
    offsets = tokens.offsets
    first_dropped = bisect.bisect_right(offsets, len(text) - 2 * margin, key=lambda offset: offset[1])
    tried = 0
    for k in range(min(first_dropped, len(offsets) - 1), 0, -1):
        cut = offsets[k][0]
        if cut == 0 or offsets[k - 1][1] > cut or not (text[cut].isspace() or text[cut - 1].isspace()):
            continue  # inside a character split over tokens, or not at a word boundary
        window = tokens.span(k, cut, cut + margin)
        if window[0] and _encode(tokenizer, text[cut : cut + 2 * margin]).starts_with(*window):
            return k, cut
        tried += 1
        if tried == _CUT_CANDIDATES:
            return None
    return None


def _encode_in_chunks(pieces: Iterable[str], tokenizer: Any, chunk_chars: int, margin: int) -> list[np.ndarray] | None:
    """The ids of the text ``pieces`` make, chunk by chunk; None where no invisible cut was found."""
    pieces = iter(pieces)
    parts: list[np.ndarray] = []
    buffer, exhausted = "", False
    expected: tuple[list[int], list[tuple[int, int]]] | None = None  # the next chunk's first tokens
    while True:
        while not exhausted and len(buffer) < chunk_chars:
            piece = next(pieces, None)
            exhausted = piece is None
            buffer += piece or ""
        tokens = _encode(tokenizer, buffer)
        if expected is not None and not tokens.starts_with(*expected):
            return None
        if exhausted:
            parts.append(tokens.array())
            return parts
        cut = _find_cut(buffer, tokens, tokenizer, margin)
        if cut is None:
            return None
        kept, position = cut
        parts.append(tokens.array(kept))
        expected = tokens.span(kept, position, len(buffer) - margin)
        buffer = buffer[position:]


def _pieces(text: str, chunk_chars: int) -> Iterator[str]:
    for start in range(0, len(text), chunk_chars):
        yield text[start : start + chunk_chars]


def encode_document(
    document: Document, tokenizer: Any, chunk_chars: int = _CHUNK_CHARS, margin_chars: int = _MARGIN_CHARS
) -> np.ndarray:
    """``tokenizer.encode(text, add_special_tokens=False).ids`` of one document, as uint32, chunk by chunk.

    Args:
        document: the text, or a function returning it in pieces (called a second time if the document
            has to be encoded whole).
        tokenizer: a ``tokenizers.Tokenizer``.
        chunk_chars: characters encoded at once (a document up to this long is encoded in one call).
        margin_chars: how far from a chunk's end a cut may be (see the module docstring).
    """
    if isinstance(document, str):
        if len(document) <= chunk_chars:
            return _encode(tokenizer, document).array()
        parts = _encode_in_chunks(_pieces(document, chunk_chars), tokenizer, chunk_chars, margin_chars)
    else:
        parts = _encode_in_chunks(document(), tokenizer, chunk_chars, margin_chars)
    if parts is None:
        text = document if isinstance(document, str) else "".join(document())
        return _encode(tokenizer, text).array()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def encode_documents(documents: Iterable[Document], tokenizer: Any, eos_id: int | None) -> tuple[np.ndarray, int]:
    """Encode every document and join them with ``eos_id`` (None: no separator); returns (ids, documents).

    Short documents are encoded in batches, long ones (and document sources) with :func:`encode_document`;
    the result is the same either way. Documents that encode to no tokens are skipped (no double EOS).
    """
    parts: list[np.ndarray] = []
    separator = np.asarray([] if eos_id is None else [eos_id], dtype=np.uint32)
    batch: list[str] = []
    count = 0

    def add(ids: np.ndarray) -> None:
        nonlocal count
        if ids.size:
            parts.extend([separator, ids] if count else [ids])
            count += 1

    def flush() -> None:
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False) if batch else ():
            add(np.asarray(encoding.ids, dtype=np.uint32))
        batch.clear()

    for document in documents:
        if isinstance(document, str) and len(document) <= _CHUNK_CHARS:
            batch.append(document)
            if len(batch) == _BATCH_DOCS:
                flush()
        else:
            flush()
            add(encode_document(document, tokenizer))
    flush()
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return ids, count


@dataclass
class TextOffsets:
    """The offsets of a token stream (``cache_server/format/offsets.py``): [L] and [L, 2] uint32, one per id."""

    token_doc: np.ndarray  # [L] uint32
    token_bytes: np.ndarray  # [L, 2] uint32
    documents_sha256: list[str]  # one per input document, in input order

    def cut(self, sequences: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``sequences`` rows of T tokens, cut like the ids: [N, T] and [N, T, 2]."""
        stop = sequences * seq_len
        return (self.token_doc[:stop].reshape(sequences, seq_len),
                self.token_bytes[:stop].reshape(sequences, seq_len, 2))


def encode_documents_with_offsets(documents: Iterable[Document], tokenizer: Any,
                                  eos_id: int | None) -> tuple[np.ndarray, int, TextOffsets]:
    """:func:`encode_documents` plus each token's document and UTF-8 byte span (each document encoded whole).

    Returns:
        ``(ids [L] uint32, documents with tokens, offsets)``; ``ids`` equal :func:`encode_documents`'.
    """
    parts: list[np.ndarray] = []
    spans: list[tuple[int, np.ndarray, int]] = []
    fingerprints: list[str] = []
    separator = np.asarray([] if eos_id is None else [eos_id], dtype=np.uint32)
    batch: list[tuple[int, str]] = []

    def flush() -> None:
        encodings = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False) if batch else ()
        for (index, text), encoding in zip(batch, encodings):
            if encoding.ids:
                parts.extend([separator, np.asarray(encoding.ids, dtype=np.uint32)] if spans else
                             [np.asarray(encoding.ids, dtype=np.uint32)])
                spans.append((index, text_offsets.char_to_byte_spans(text, encoding.offsets),
                              len(text.encode("utf-8", "surrogatepass"))))
        batch.clear()

    for index, document in enumerate(documents):
        text = document if isinstance(document, str) else "".join(document())
        fingerprints.append(text_offsets.document_fingerprint(text))
        batch.append((index, text))
        if len(batch) == _BATCH_DOCS or len(text) > _CHUNK_CHARS:
            flush()
    flush()
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    token_doc, token_bytes = text_offsets.stream_offsets(spans, eos=eos_id is not None)
    return ids, len(spans), TextOffsets(token_doc, token_bytes, fingerprints)
