"""The teacher → student vocabulary map: which teacher ids are the same token string in the student's vocabulary.

Built once from the two ``tokenizer.json`` files and cached on disk (a ``.npy`` named by both files' sha256),
so every loader and loss of a run shares one map.

Shape notation::

    V_t  teacher vocabulary size     V_s  student vocabulary size

Rule: teacher id ``i`` maps to student id ``j`` when the two vocabularies hold the same token string
(``Tokenizer.get_vocab(with_added_tokens=True)``); both tokenizers' EOS tokens map to each other whatever their
strings. Strings are compared as stored, so two byte-level BPEs (same byte alphabet) map every token whose
bytes they share; tokenizers with different conventions (``Ġ`` vs ``▁`` prefixes) map fewer ids, and the loss
then falls back to ULD at those positions. Unmapped teacher ids are -1.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_tokenizer_file", "tokenizer_eos_id", "tokenizer_sha256", "build_vocab_map", "vocab_map"]

_CACHE_ENV = "KDCACHE_VOCAB_MAP_DIR"


def load_tokenizer_file(path: str | os.PathLike) -> tuple[Any, str]:
    """``(tokenizers.Tokenizer, sha256 hex)`` of ``tokenizer.json`` in a directory (or the file itself).

    Raises:
        FileNotFoundError: no tokenizer.json there, with how to make one.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}; pass a directory holding a fast tokenizer "
                                "(tokenizer.save_pretrained(DIR)) or the tokenizer.json file itself")
    raw = file.read_bytes()
    return Tokenizer.from_str(raw.decode()), hashlib.sha256(raw).hexdigest()


def tokenizer_eos_id(path: str | os.PathLike, tokenizer: Any) -> int | None:
    """The EOS id a tokenizer directory names (``tokenizer_config.json`` ``eos_token``, as ``kdcache build``
    reads it), or None."""
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return tokenizer.token_to_id(eos) if isinstance(eos, str) else None


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a tokenizer's ``tokenizer.json`` (how the map cache and the loader state name it)."""
    return load_tokenizer_file(path)[1]


def build_vocab_map(teacher: Any, student: Any, teacher_eos: int | None = None,
                    student_eos: int | None = None) -> np.ndarray:
    """Teacher id → student id (-1 where the student has no token with the same string): [V_t] int64.

    Args:
        teacher: the teacher's ``tokenizers.Tokenizer``.
        student: the student's ``tokenizers.Tokenizer``.
        teacher_eos: the teacher's EOS id (mapped to ``student_eos`` when both are given).
        student_eos: the student's EOS id.
    """
    teacher_vocab = teacher.get_vocab(with_added_tokens=True)
    student_vocab = student.get_vocab(with_added_tokens=True)
    size = max(teacher.get_vocab_size(with_added_tokens=True), max(teacher_vocab.values(), default=-1) + 1)
    mapping = np.full(size, -1, dtype=np.int64)
    for token, teacher_id in teacher_vocab.items():
        student_id = student_vocab.get(token)
        if student_id is not None:
            mapping[teacher_id] = student_id
    if teacher_eos is not None and student_eos is not None:
        mapping[mapping == student_eos] = -1  # the student's EOS stands for the teacher's EOS only
        mapping[teacher_eos] = student_eos
    return mapping


def vocab_map(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, *, teacher_eos: int | None = None,
              student_eos: int | None = None, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """:func:`build_vocab_map` of two tokenizer directories, cached on disk; [V_t] int64.

    Args:
        teacher_dir: the teacher's tokenizer (a directory with tokenizer.json, or the file).
        student_dir: the student's.
        teacher_eos: the teacher's EOS id; student_eos: the student's.
        cache_dir: where maps are kept (default ``$KDCACHE_VOCAB_MAP_DIR`` or ``~/.cache/kdcache/vocab_maps``);
            a map is named by both tokenizer hashes and the EOS ids, so a changed tokenizer gets a new map.
    """
    teacher, teacher_sha = load_tokenizer_file(teacher_dir)
    student, student_sha = load_tokenizer_file(student_dir)
    root = Path(cache_dir or os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "kdcache" / "vocab_maps")
    path = root / f"{teacher_sha[:16]}-{student_sha[:16]}-{teacher_eos}-{student_eos}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    mapping = build_vocab_map(teacher, student, teacher_eos, student_eos)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, mapping)
    os.replace(tmp, path)  # atomic: concurrent loaders never read a half-written map
    return mapping
