"""Aligning a student tokenization to the cached teacher positions by byte spans.

Shape notation::

    T    teacher positions per cache sequence      T_s  student positions per row (``student_seq_len``)
    L_s  tokens of the student stream

Student row of cache sequence i: the student tokens lying wholly inside the bytes teacher sequence i covers
(from the start of its first token to the end of its last), in order, first ``T_s`` of them, padded with
``pad_id`` (labels ``ignore_index``). ``labels[j] = ids[j + 1]``; the row's last token has no label.

Student position j predicts s_{j+1}, whose span starts where s_j ends (boundary ``b``) and ends at ``e``.
Teacher position t predicts teacher token t+1. Position j gets:

* ``EXACT`` (2): a teacher token t ends at ``b`` (t the last one that does), teacher token t+1 ends at ``e``
  (same span), and the vocabulary map sends teacher id t+1 to s_{j+1}: exact-id KD on the mapped top-k.
* ``ULD`` (1): a teacher token ends at ``b`` but the next spans or ids differ: ULD on sorted probabilities.
* ``NONE`` (0): no teacher boundary at ``b`` (or b is inside a multi-byte character): CE only.

``teacher_pos[j]`` is that t (-1 for NONE). Boundaries are compared as ``offsets.boundary_keys``, so an EOS
matches the other side's EOS and never the document's last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spans import TokenStream

__all__ = ["NONE", "ULD", "EXACT", "StudentRows", "align_sequence"]

NONE, ULD, EXACT = 0, 1, 2


@dataclass
class StudentRows:
    """Student rows and their alignment for a batch of cache sequences (numpy, [B, T_s] each)."""

    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64, ignore_index where no next token
    teacher_pos: np.ndarray  # int64, -1 where unaligned
    align: np.ndarray  # int8: NONE | ULD | EXACT


def _teacher_keys(token_doc: np.ndarray, token_bytes: np.ndarray, ids: np.ndarray, eos_id: int | None
                  ) -> TokenStream:
    is_eos = (token_bytes[:, 0] == token_bytes[:, 1]) & (ids == (-1 if eos_id is None else eos_id))
    return TokenStream(ids.astype(np.int64), token_doc, token_bytes, is_eos)


# long: one pass of vectorized index arithmetic over the row reads best in one place
def align_sequence(student: TokenStream, student_ends: np.ndarray, student_starts: np.ndarray,
                   teacher_ids: np.ndarray, token_doc: np.ndarray, token_bytes: np.ndarray, *,
                   teacher_eos: int | None, vocab_map: np.ndarray, student_seq_len: int, pad_id: int = 0,
                   ignore_index: int = -100) -> tuple[np.ndarray, ...]:
    """One cache sequence's student row: ``(input_ids, labels, teacher_pos, align)``, each [T_s].

    Args:
        student: the student stream of all documents; ``student_ends`` / ``student_starts`` its boundary
            keys [L_s] (``student.end_keys`` / ``student.start_keys``, computed once by the caller).
        teacher_ids: [T] the cache's ``input_ids`` of the sequence.
        token_doc: [T] and token_bytes: [T, 2]: the teacher's offsets of the sequence.
        teacher_eos: the teacher's EOS id (None if documents were joined without one).
        vocab_map: [V_t] teacher id → student id, -1 unmapped (``vocab_map.py``).
        student_seq_len: T_s.
        pad_id: the student id padding rows.
        ignore_index: the label of positions without a next token.
    """
    teacher = _teacher_keys(np.asarray(token_doc), np.asarray(token_bytes), np.asarray(teacher_ids), teacher_eos)
    t_ends = teacher.end_keys  # [T], non-decreasing
    first = int(np.searchsorted(student_starts, teacher.start_keys[0], side="left"))
    last = int(np.searchsorted(student_ends, t_ends[-1], side="right"))
    stop = min(last, first + student_seq_len)
    n = max(0, stop - first)
    ids = np.full(student_seq_len, pad_id, dtype=np.int64)
    labels = np.full(student_seq_len, ignore_index, dtype=np.int64)
    pos = np.full(student_seq_len, -1, dtype=np.int64)
    kind = np.zeros(student_seq_len, dtype=np.int8)
    if n == 0:
        return ids, labels, pos, kind
    ids[:n] = student.ids[first:stop]
    labels[: n - 1] = ids[1:n]
    ends = student_ends[first:stop]  # [n]
    b = ends[:-1]  # boundary before the predicted token s_{j+1}, j < n-1
    e = ends[1:]  # where s_{j+1} ends
    t = np.searchsorted(t_ends, b, side="right") - 1  # last teacher token ending at or before b
    hit = (t >= 0) & (t_ends[np.clip(t, 0, None)] == b) & (b < e)  # b < e: not inside one multi-byte character
    t = np.where(hit, t, -1)
    nxt = np.clip(t + 1, 0, len(t_ends) - 1)
    same_span = hit & (t + 1 < len(t_ends)) & (t_ends[nxt] == e)
    mapped = vocab_map[np.clip(teacher.ids[nxt], 0, len(vocab_map) - 1)]
    exact = same_span & (mapped == ids[1:n])
    pos[: n - 1] = t
    kind[: n - 1] = np.where(exact, EXACT, np.where(hit, ULD, NONE))
    return ids, labels, pos, kind
