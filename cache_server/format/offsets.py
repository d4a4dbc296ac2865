"""Text offsets of a cache built from text: which bytes of which document each teacher token covers.

The one definition of the optional offset arrays (``kdcache build --record-offsets``), used by the build
(which writes them) and by ``kdlib.crosstok`` (which aligns a student tokenizer to them, and recomputes them
for a cache built without the flag). docs/FORMAT.md ("Text offsets") is the specification.

Shape notation::

    N  sequences   T  positions per sequence   L  tokens of the whole stream (documents joined by EOS)
    n  tokens of one document                  D  documents of the input

Arrays (per cache position, like ``input_ids``)::

    token_doc    [N, T]     uint32  index of the document the token belongs to (input order, 0-based, counting
                                    every document of the input, also those that encode to no tokens)
    token_bytes  [N, T, 2]  uint32  [start, end) UTF-8 byte offsets of the token inside that document

Rules:

* Offsets are UTF-8 BYTES of the document's text (HF fast tokenizers report characters; they are converted).
* A token that holds part of a multi-byte character (byte-level BPE splits it) covers the whole character:
  consecutive tokens of one character share its byte span.
* The EOS that joins document d to the next one belongs to d and has the empty span [len_d, len_d), len_d the
  byte length of d; as a boundary it counts as one virtual byte after the document (:func:`boundary_keys`),
  so the last real token of d and the EOS after it end at different boundaries.
* Sequences are cut from the stream exactly as ``input_ids`` are, so a sequence may span documents: its
  ``token_doc`` then changes inside the row.
* Each document's fingerprint is ``"sha256:" + sha256(UTF-8 bytes)`` (:func:`document_fingerprint`); the
  manifest's ``dataset.documents_sha256`` lists them in document order, so a reader can check that the text
  it is given is the text the teacher saw.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "OFFSET_ARRAYS",
    "OFFSETS_DTYPE",
    "char_to_byte_spans",
    "document_fingerprint",
    "stream_offsets",
    "boundary_keys",
]

OFFSET_ARRAYS = ("token_doc", "token_bytes")
OFFSETS_DTYPE = np.dtype("uint32")
_EOS_BIT = 1  # the virtual byte an EOS occupies after its document, in boundary keys
_DOC_SHIFT = 33  # boundary key = doc << 33 | (byte end + eos), room for 2^32 bytes and the virtual one


def _utf8_widths(text: str) -> np.ndarray:
    """UTF-8 byte width of every character of ``text`` [len(text)] int64."""
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
    return 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)


def char_to_byte_spans(text: str, char_spans: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Character offsets of a tokenizer → UTF-8 byte offsets [n, 2] int64 of the same tokens.

    Args:
        text: the document the offsets refer to.
        char_spans: [n, 2] ``(start, end)`` character offsets (``Encoding.offsets`` of ``tokenizers``).

    Raises:
        ValueError: an offset outside the text, or end < start.
    """
    spans = np.asarray(char_spans, dtype=np.int64).reshape(-1, 2)
    if spans.size and (spans.min() < 0 or spans.max() > len(text) or (spans[:, 1] < spans[:, 0]).any()):
        raise ValueError(f"character offsets outside the text of {len(text)} characters (or end < start); "
                         "pass the offsets the tokenizer returned for this exact text")
    starts = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(_utf8_widths(text), out=starts[1:])
    return starts[spans]


def document_fingerprint(text: str) -> str:
    """``"sha256:" + sha256`` of a document's UTF-8 bytes (how the manifest names a document's text)."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def stream_offsets(documents: Iterable[tuple[int, np.ndarray, int]], eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of the token stream the documents make, joined like ``input_ids`` (EOS between documents).

    Args:
        documents: ``(document index, byte spans [n, 2], byte length)`` of each document in stream order;
            documents with no tokens (n = 0) are skipped, as the encoder skips them (no double EOS).
        eos: whether documents are joined by an EOS token (the tokenizer names one).

    Returns:
        ``(token_doc [L] uint32, token_bytes [L, 2] uint32)``.

    Raises:
        ValueError: a document over 2^32 - 1 bytes (the offsets are uint32).
    """
    docs: list[np.ndarray] = []
    spans: list[np.ndarray] = []
    previous: tuple[int, int] | None = None  # (index, byte length) of the last document with tokens
    for index, doc_spans, length in documents:
        if len(doc_spans) == 0:
            continue
        if length > np.iinfo(OFFSETS_DTYPE).max - 1:
            raise ValueError(f"document {index} has {length} bytes; --record-offsets stores uint32 offsets "
                             "(documents under 4 GiB): split the document")
        if previous is not None and eos:
            docs.append(np.asarray([previous[0]], dtype=np.int64))
            spans.append(np.asarray([[previous[1], previous[1]]], dtype=np.int64))
        docs.append(np.full(len(doc_spans), index, dtype=np.int64))
        spans.append(np.asarray(doc_spans, dtype=np.int64).reshape(-1, 2))
        previous = (index, length)
    if not docs:
        return np.zeros(0, OFFSETS_DTYPE), np.zeros((0, 2), OFFSETS_DTYPE)
    return np.concatenate(docs).astype(OFFSETS_DTYPE), np.concatenate(spans).astype(OFFSETS_DTYPE)


def boundary_keys(token_doc: np.ndarray, token_bytes: np.ndarray, is_eos: np.ndarray) -> np.ndarray:
    """A comparable int64 key of where each token ENDS: ``doc << 33 | (end byte + 1 if EOS)``.

    Two tokenizations of the same documents put a boundary at the same place exactly when the keys are
    equal; keys never decrease along a stream. [...] in, [...] out.
    """
    doc = np.asarray(token_doc, dtype=np.int64)
    end = np.asarray(token_bytes, dtype=np.int64)[..., 1]
    return (doc << _DOC_SHIFT) | (end + np.asarray(is_eos, dtype=np.int64) * _EOS_BIT)
