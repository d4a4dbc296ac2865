"""Token streams with byte spans: the student's tokenization of the documents, and the teacher's from the cache.

Both sides follow ``cache_server/format/offsets.py`` (the one definition of the offset arrays): each document
is encoded whole with ``add_special_tokens=False``, documents are joined by the tokenizer's EOS, and every token
carries its document index and UTF-8 byte span. The teacher's spans come from the cache when it was built with
``--record-offsets``; otherwise :func:`teacher_offsets` recomputes them from the documents and the teacher's
tokenizer and checks that the ids it gets are exactly the cache's ``input_ids``.

Shape notation::

    L  tokens of a stream   N  cache sequences   T  positions per sequence   D  documents
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cache_server.format import offsets as fmt_offsets

__all__ = ["TokenStream", "encode_stream", "check_documents", "teacher_offsets"]


@dataclass(frozen=True)
class TokenStream:
    """One tokenization of the documents, with the boundary keys alignment compares."""

    ids: np.ndarray  # [L] int64
    token_doc: np.ndarray  # [L] uint32
    token_bytes: np.ndarray  # [L, 2] uint32
    is_eos: np.ndarray  # [L] bool

    @property
    def end_keys(self) -> np.ndarray:
        """[L] int64: where each token ends (``offsets.boundary_keys``)."""
        return fmt_offsets.boundary_keys(self.token_doc, self.token_bytes, self.is_eos)

    @property
    def start_keys(self) -> np.ndarray:
        """[L] int64: where each token starts, on the same scale (an EOS starts where its document ends)."""
        starts = np.stack([self.token_bytes[:, 0], self.token_bytes[:, 0]], axis=-1)
        return fmt_offsets.boundary_keys(self.token_doc, starts, np.zeros(len(self.ids), dtype=bool))


def encode_stream(documents: Sequence[str], tokenizer: Any, eos_id: int | None) -> TokenStream:
    """The stream ``documents`` make with ``tokenizer`` (a ``tokenizers.Tokenizer``), EOS between documents."""
    spans, parts = [], []
    for index, encoding in enumerate(tokenizer.encode_batch(list(documents), add_special_tokens=False)):
        if not encoding.ids:
            continue
        text = documents[index]
        if parts and eos_id is not None:
            parts.append(np.asarray([eos_id], dtype=np.int64))
        parts.append(np.asarray(encoding.ids, dtype=np.int64))
        spans.append((index, fmt_offsets.char_to_byte_spans(text, encoding.offsets),
                      len(text.encode("utf-8", "surrogatepass"))))
    token_doc, token_bytes = fmt_offsets.stream_offsets(spans, eos=eos_id is not None)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    is_eos = np.zeros(len(ids), dtype=bool)
    if eos_id is not None and len(ids):
        is_eos = (token_bytes[:, 0] == token_bytes[:, 1]) & (ids == eos_id)
    return TokenStream(ids, token_doc, token_bytes, is_eos)


def check_documents(documents: Sequence[str], manifest: dict[str, Any]) -> None:
    """Raise ValueError unless ``documents`` are the texts the cache was built from (when it recorded them).

    A cache built with ``--record-offsets`` lists each document's fingerprint (``dataset.documents_sha256``);
    other caches are checked later, token by token (:func:`teacher_offsets`).
    """
    recorded = (manifest.get("dataset") or {}).get("documents_sha256")
    if recorded is None:
        return
    if len(recorded) != len(documents):
        raise ValueError(f"the cache was built from {len(recorded)} documents, but {len(documents)} were given; pass "
                         "the same documents, in the same order, as the build's --data")
    for index, (text, want) in enumerate(zip(documents, recorded)):
        if fmt_offsets.document_fingerprint(text) != want:
            raise ValueError(f"document {index} is not the text the cache was built from (its sha256 differs from "
                             f"the manifest's {want}); pass the build's documents unchanged, in the same order")


def teacher_offsets(documents: Sequence[str], teacher_tokenizer: Any, eos_id: int | None, cache: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's ``token_doc`` [N, T] and ``token_bytes`` [N, T, 2] of a cache built without offsets.

    Re-encodes ``documents`` with the teacher's tokenizer exactly as ``kdcache build`` does and checks that the
    first N·T ids are the cache's ``input_ids`` (so the spans belong to the cached positions).

    Raises:
        ValueError: the ids differ (other documents, order, tokenizer or EOS), or the stream is too short.
    """
    stream = encode_stream(documents, teacher_tokenizer, eos_id)
    n, t = int(cache.num_sequences), int(cache.seq_len)
    if len(stream.ids) < n * t:
        raise ValueError(f"the documents make {len(stream.ids)} teacher tokens, fewer than the cache's {n} x {t}; "
                         "pass the documents the cache was built from")
    step = max(1, (1 << 20) // t)
    for start in range(0, n, step):
        stop = min(n, start + step)
        cached = cache.read(start, stop, arrays=["input_ids"])["input_ids"].numpy().astype(np.int64)
        mine = stream.ids[start * t : stop * t].reshape(stop - start, t)
        if not np.array_equal(cached, mine):
            row, col = (int(v) for v in np.argwhere(cached != mine)[0])
            raise ValueError(f"the teacher tokenizer's ids of these documents differ from the cache's at sequence "
                             f"{start + row}, position {col}; pass the build's documents, in order, and the "
                             "tokenizer (and EOS) the cache was built with")
    return (stream.token_doc[: n * t].reshape(n, t), stream.token_bytes[: n * t].reshape(n, t, 2))
