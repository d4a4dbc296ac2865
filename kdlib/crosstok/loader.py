"""Student-tokenized batches from a cache built with another tokenizer, with their alignment to the teacher.

Shape notation::

    B  sequences per batch   T  teacher positions   K  top-k   T_s  student positions per row

:class:`CrossTokLoader` wraps :class:`kdlib.CacheLoader` (its order, partition, shuffle, remainder and resume
are unchanged: one batch out per cache batch, made synchronously, so the inner loader's ``state_dict`` is the
position) and turns each batch of cache sequences into student rows (``align.py``). A batch::

    input_ids          [B, T_s]  int64   the student's tokens of the text teacher row b covers
    labels             [B, T_s]  int64   input_ids shifted left; ignore_index at padding and the row's end
    teacher_pos        [B, T_s]  int64   aligned teacher position in row b, -1 where none
    align              [B, T_s]  int8    NONE 0 | ULD 1 | EXACT 2
    topk_ids, topk_logprobs, lse, lse_t{tau:g}      the cache's teacher arrays of the same rows, [B, T, ...]
    teacher_input_ids  [B, T]            the cache's input_ids
    sample_indices     [B]               cache sequence indices (-1: a padding row, every label ignored)

The teacher's byte spans come from the cache (``--record-offsets``) or are recomputed from the documents and
checked against the cached ids (``spans.teacher_offsets``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from kdlib.batch import move_batch
from kdlib.data.open import open_cache
from kdlib.loader import make_loader, resolve_device

from .align import align_sequence
from .spans import check_documents, encode_stream, teacher_offsets
from .vocab_map import load_tokenizer_file, tokenizer_eos_id, vocab_map

__all__ = ["CrossTokLoader"]

_TEACHER_KEYS = ("topk_ids", "topk_logprobs", "lse")


class CrossTokLoader:
    """Iterable of student-tokenized, aligned batches for one rank (module docstring).

    Args:
        cache: a cache (``kdlib.open_cache``) or its path; built from ``documents`` with the teacher tokenizer.
        documents: the texts of the build's input, in order (one string per document, as the build split them).
        student_tokenizer: the student's tokenizer directory (tokenizer.json, tokenizer_config.json for EOS).
        batch_size: B.
        teacher_tokenizer: the teacher's tokenizer directory (default: the one the manifest records).
        student_seq_len: T_s (default: T times the student/teacher token ratio of the documents, +10 %,
            rounded up to a multiple of 8).
        pad_id: student id of padding (default the student's EOS, else 0).
        vocab_map_dir: where the teacher → student map is cached (``vocab_map.vocab_map``).
        device: move every student batch there (the alignment is made on the CPU first); None: CPU.
        **loader_kwargs: :class:`kdlib.CacheLoader` arguments (shuffle, seed, rank, world_size, drop_last, ...).

    Raises:
        ValueError: the documents are not the cache's (fingerprints or ids differ).
    """

    def __init__(self, cache: Any, documents: Sequence[str], student_tokenizer: str | os.PathLike, batch_size: int, *,
                 teacher_tokenizer: str | os.PathLike | None = None, student_seq_len: int | None = None,
                 pad_id: int | None = None, vocab_map_dir: str | os.PathLike | None = None,
                 ignore_index: int = -100, device: torch.device | str | None = None, **loader_kwargs: Any) -> None:
        self.cache = open_cache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        documents = list(documents)
        check_documents(documents, self.cache.manifest)
        teacher_dir = teacher_tokenizer or (self.cache.manifest.get("tokenizer") or {}).get("path")
        if teacher_dir is None:
            raise ValueError("the cache's manifest names no tokenizer; pass teacher_tokenizer=DIR (the tokenizer "
                             "the cache was built with)")
        teacher, _ = load_tokenizer_file(teacher_dir)
        student, self.student_sha256 = load_tokenizer_file(student_tokenizer)
        self.teacher_eos = tokenizer_eos_id(teacher_dir, teacher)
        self.student_eos = tokenizer_eos_id(student_tokenizer, student)
        self.vocab_map = torch.from_numpy(vocab_map(teacher_dir, student_tokenizer, teacher_eos=self.teacher_eos,
                                                    student_eos=self.student_eos, cache_dir=vocab_map_dir))
        self.student = encode_stream(documents, student, self.student_eos)
        self._ends, self._starts = self.student.end_keys, self.student.start_keys
        self._stored_offsets = "token_doc" in self.cache.position_arrays()
        self._offsets = None if self._stored_offsets else teacher_offsets(documents, teacher, self.teacher_eos,
                                                                          self.cache)
        T = int(self.cache.seq_len)
        teacher_tokens = (self.cache.manifest.get("dataset") or {}).get("tokens_total") or self.cache.num_sequences * T
        ratio = len(self.student.ids) / max(1, int(teacher_tokens))
        self.student_seq_len = student_seq_len or 8 * math.ceil(T * ratio * 1.1 / 8)
        self.pad_id = pad_id if pad_id is not None else (self.student_eos or 0)
        self.ignore_index = ignore_index
        self.device = resolve_device(device)
        self.inner = make_loader(self.cache, batch_size, ignore_index=ignore_index, **loader_kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        """As :meth:`kdlib.CacheLoader.set_epoch`."""
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The inner loader's state plus the student side it was made for (tokenizer hash, T_s)."""
        return {"loader": self.inner.state_dict(),
                "student": {"tokenizer_sha256": self.student_sha256, "seq_len": self.student_seq_len}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at a saved position (refused for another student tokenizer or T_s)."""
        want = {"tokenizer_sha256": self.student_sha256, "seq_len": self.student_seq_len}
        if dict(state.get("student") or {}) != want:
            raise ValueError(f"the loader state was saved for student {state.get('student')}, this loader is {want}: "
                             "resume with the same student tokenizer and student_seq_len")
        self.inner.load_state_dict(state["loader"])

    def student_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student batch (module docstring) of one cache batch."""
        indices = batch["sample_indices"].numpy()
        teacher_ids = batch["input_ids"].numpy()
        rows = []
        for b, index in enumerate(indices):
            if index < 0:
                rows.append(None)
                continue
            if self._stored_offsets:
                doc, spans = batch["token_doc"][b].numpy(), batch["token_bytes"][b].numpy()
            else:
                doc, spans = self._offsets[0][index], self._offsets[1][index]
            rows.append(align_sequence(self.student, self._ends, self._starts, teacher_ids[b], doc, spans,
                                       teacher_eos=self.teacher_eos, vocab_map=self.vocab_map.numpy(),
                                       student_seq_len=self.student_seq_len, pad_id=self.pad_id,
                                       ignore_index=self.ignore_index))
        out = _stack(rows, self.student_seq_len, self.pad_id, self.ignore_index)
        for key, value in batch.items():
            if key in _TEACHER_KEYS or key.startswith("lse_t") or key == "sample_indices":
                out[key] = value
        out["teacher_input_ids"] = batch["input_ids"]
        return out if self.device is None else move_batch(out, self.device)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.inner:
            yield self.student_batch(batch)


def _stack(rows: list, length: int, pad_id: int, ignore_index: int) -> dict[str, torch.Tensor]:
    empty = (np.full(length, pad_id, np.int64), np.full(length, ignore_index, np.int64), np.full(length, -1, np.int64),
             np.zeros(length, np.int8))
    rows = [empty if row is None else row for row in rows]
    names = ("input_ids", "labels", "teacher_pos", "align")
    return {name: torch.from_numpy(np.stack([row[i] for row in rows])) for i, name in enumerate(names)}
