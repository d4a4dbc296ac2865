"""Token data inputs of ``kdcache build``: every supported file format → a [N, T] view of token ids.

Shape notation::

    N  number of sequences used (after cutting a stream and --max-sequences)
    T  sequence length (--seq-len)

Supported inputs (chosen by suffix / directory content, see :func:`detect_format`):

* ``.npy``: 1-D token stream or 2-D ``[sequences, T]`` integer array (``np.load(allow_pickle=False,
  mmap_mode="r")``, never copied whole into memory).
* ``.bin``: raw little-endian token stream, nanoGPT style; ``--data-dtype uint16|uint32``.
* ``.parquet``, ``.arrow`` / ``.feather`` (Arrow IPC file or stream) and a ``datasets.save_to_disk``
  directory, each with an ``input_ids`` column: a list column whose rows all have one length L is 2-D
  (L must equal T); rows of varying lengths (tokenized documents) are concatenated into one stream; an
  integer column is a stream.
* ``.txt`` (one document) and ``.jsonl`` (one JSON object per line with a ``text`` field, one document per
  line), tokenized with ``--tokenizer``; documents are joined with the tokenizer's EOS id when it has one.

Stream rule: a 1-D stream is cut into ``len // T`` consecutive sequences; the remainder (``len % T`` tokens,
fewer than T) is DROPPED and reported (``remainder_tokens_dropped``) in the build summary and in the
manifest's ``dataset`` field. ``--max-sequences`` then keeps the first N sequences.

The data fingerprint is the sha256 of exactly the token ids used, as little-endian uint32 in row-major
[N, T] order, prefixed by ``"N,T;"`` — independent of the input file format.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "TokenData",
    "TokenizerInfo",
    "DATA_FORMATS",
    "detect_format",
    "load_tokenizer",
    "open_token_data",
]

DATA_FORMATS = ("npy", "bin", "parquet", "arrow", "hf-dataset", "txt", "jsonl")
_SUFFIX_FORMATS = {
    ".npy": "npy",
    ".bin": "bin",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".txt": "txt",
    ".jsonl": "jsonl",
}
_FINGERPRINT_BLOCK_ROWS_TOKENS = 1 << 22  # tokens hashed per block: bounds memory for memory-mapped inputs


class DataError(ValueError):
    """The token data is unusable; the message says what is wrong and how to fix it."""


@dataclass
class TokenizerInfo:
    """A tokenizer loaded from a local ``tokenizer.json`` (never downloaded)."""

    path: str
    fingerprint: str  # sha256 of tokenizer.json
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int | None

    def manifest_entry(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": "sha256:" + self.fingerprint}


@dataclass
class TokenData:
    """Token ids of a build as ``sequences`` [N, T] (possibly a read-only memory map)."""

    source: str
    format: str
    layout: str  # "stream" (1-D cut into T) or "rows" (2-D)
    sequences: np.ndarray  # [N, T] integer ids
    tokens_total: int
    remainder_tokens_dropped: int
    sequences_available: int
    notes: list[str] = field(default_factory=list)
    _fingerprint: str | None = None
    _min_max: tuple[int, int] | None = None

    @property
    def num_sequences(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.sequences.shape[1])

    @property
    def tokens_used(self) -> int:
        return self.num_sequences * self.seq_len

    def _scan(self) -> None:
        """One pass over the used ids: fingerprint, min and max."""
        n, t = self.sequences.shape
        digest = hashlib.sha256(f"{n},{t};".encode())
        lo, hi = None, None
        rows = max(1, _FINGERPRINT_BLOCK_ROWS_TOKENS // t)
        for start in range(0, n, rows):
            block = np.asarray(self.sequences[start : start + rows])
            if block.size == 0:
                continue
            bmin, bmax = int(block.min()), int(block.max())
            lo = bmin if lo is None else min(lo, bmin)
            hi = bmax if hi is None else max(hi, bmax)
            if bmin >= 0 and bmax <= 0xFFFFFFFF:
                digest.update(np.ascontiguousarray(block, dtype="<u4").tobytes())
        self._fingerprint = digest.hexdigest()
        self._min_max = (lo if lo is not None else 0, hi if hi is not None else 0)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._scan()
        return "sha256:" + self._fingerprint

    def check_ids(self, vocab_size: int) -> None:
        """Raise DataError unless every used id is in [0, vocab_size)."""
        if self._min_max is None:
            self._scan()
        lo, hi = self._min_max
        if lo < 0:
            raise DataError(
                f"{self.source}: token ids must be non-negative, found {lo}; the data is not token ids "
                "(or was written with a signed dtype that overflowed)"
            )
        if hi >= vocab_size:
            row, col = _first_index(self.sequences, lambda b: b >= vocab_size)
            hint = ""
            if self.format == "bin":
                hint = " If the file was written as uint16, pass --data-dtype uint16 (or uint32 for uint32 files)."
            raise DataError(
                f"{self.source}: token id {hi} is outside the teacher vocabulary (vocab_size={vocab_size}); "
                f"first out-of-range id at sequence {row}, position {col}. Tokenize the data with the "
                f"teacher's own tokenizer.{hint}"
            )

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "layout": self.layout,
            "tokens_total": self.tokens_total,
            "tokens_used": self.tokens_used,
            "remainder_tokens_dropped": self.remainder_tokens_dropped,
            "sequences_available": self.sequences_available,
            "sequences_used": self.num_sequences,
            "fingerprint": self.fingerprint,
        }


def _first_index(sequences: np.ndarray, predicate) -> tuple[int, int]:
    n, t = sequences.shape
    rows = max(1, _FINGERPRINT_BLOCK_ROWS_TOKENS // t)
    for start in range(0, n, rows):
        hits = np.argwhere(predicate(np.asarray(sequences[start : start + rows])))
        if len(hits):
            return start + int(hits[0][0]), int(hits[0][1])
    return -1, -1


def detect_format(path: Path) -> str:
    """The input format of ``path`` from its suffix, or a ``datasets.save_to_disk`` directory."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "hf-dataset"
        if (path / "dataset_dict.json").exists():
            raise DataError(
                f"{path} is a datasets DatasetDict (several splits); pass one split's directory, "
                f"e.g. --data {path / 'train'}"
            )
        raise DataError(
            f"{path} is a directory but not a `datasets.save_to_disk` dataset (no dataset_info.json/state.json)"
        )
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"unknown data format {path.suffix!r} for {path}; supported: .npy, .bin (with --data-dtype), "
            ".parquet, .arrow/.feather, a datasets.save_to_disk directory, .txt / .jsonl (with --tokenizer)"
        )
    return fmt


# --------------------------------------------------------------------------------------------- tokenizer


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


def _encode_documents(documents: list[str], tokenizer: TokenizerInfo) -> np.ndarray:
    ids: list[np.ndarray] = []
    batch = 256
    for start in range(0, len(documents), batch):
        for enc in tokenizer.tokenizer.encode_batch(documents[start : start + batch], add_special_tokens=False):
            ids.append(np.asarray(enc.ids, dtype=np.int64))
            if tokenizer.eos_id is not None:
                ids.append(np.asarray([tokenizer.eos_id], dtype=np.int64))
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def _read_text(path: Path, fmt: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc
    if fmt == "txt":
        # One document; encoded in blocks of lines so memory stays bounded (deterministic split points).
        lines = text.splitlines(keepends=True)
        return ["".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000)] if lines else []
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{lineno}: each JSONL line must be an object with a string \"text\" field")
        docs.append(obj["text"])
    return docs


# --------------------------------------------------------------------------------------------- arrow


def _column_to_array(column, source: str, seq_len: int) -> tuple[np.ndarray, str, list[str]]:
    """An Arrow ``input_ids`` column → (ids, layout, notes): 2-D for equal-length rows, else a stream."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    typ = column.type
    if pa.types.is_integer(typ):
        return column.to_numpy(zero_copy_only=False), "stream", []
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
        raise DataError(f"{source}: column 'input_ids' has type {typ}; expected integers or lists of integers")
    if not pa.types.is_integer(typ.value_type):
        raise DataError(f"{source}: column 'input_ids' holds {typ.value_type}, expected integer token ids")
    if column.null_count:
        raise DataError(f"{source}: column 'input_ids' has {column.null_count} null rows; drop them first")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    values = column.flatten().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths == lengths[0]).all():
        if int(lengths[0]) != seq_len:
            raise DataError(
                f"{source}: every row of 'input_ids' has {int(lengths[0])} tokens but --seq-len is {seq_len}; "
                f"pass --seq-len {int(lengths[0])}"
            )
        return values.reshape(len(lengths), seq_len), "rows", []
    note = f"rows of 'input_ids' have varying lengths ({int(lengths.min())}..{int(lengths.max())}); concatenated into one stream"
    return values, "stream", [note]


def _read_arrow_table(path: Path, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        schema = pq.read_schema(path)
        if "input_ids" not in schema.names:
            raise DataError(f"{path} has no 'input_ids' column (columns: {schema.names}); tokenize it first")
        return pq.read_table(path, columns=["input_ids"])
    source = pa.memory_map(str(path), "r")
    try:
        table = pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_stream(source).read_all()
    return table


def _read_hf_dataset(path: Path):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits {list(ds)}; pass one split's directory")
    if "input_ids" not in ds.column_names:
        raise DataError(f"{path} has no 'input_ids' column (columns: {ds.column_names}); tokenize it first")
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    return ds.data.table.select(["input_ids"])


# --------------------------------------------------------------------------------------------- entry point


def open_token_data(
    path: str | os.PathLike,
    seq_len: int,
    *,
    data_dtype: str | None = None,
    tokenizer: TokenizerInfo | None = None,
    max_sequences: int | None = None,
) -> TokenData:
    """Open token data and return its [N, T] sequences, validating shape and dtype (not yet vocab range).

    Raises:
        DataError: missing/unknown/empty input, data shorter than T, 2-D rows of length != T, non-integer
            ids, a ``.bin`` whose size is not a multiple of the dtype, text without a tokenizer.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise DataError(f"data path {source} does not exist")
    fmt = detect_format(path)
    if data_dtype is not None and fmt != "bin":
        raise DataError(f"--data-dtype applies only to raw .bin token streams, not to {fmt} input {source}")
    notes: list[str] = []
    if fmt == "npy":
        try:
            ids = np.load(path, allow_pickle=False, mmap_mode="r")
        except ValueError as exc:
            raise DataError(f"{source} cannot be read without unpickling ({exc}); save a plain integer array") from exc
        layout = "stream" if ids.ndim == 1 else "rows"
        if ids.ndim not in (1, 2):
            raise DataError(f"{source} has shape {ids.shape}; expected a 1-D token stream or 2-D [sequences, T]")
    elif fmt == "bin":
        dtype = np.dtype(data_dtype or "uint16")
        if dtype.name not in ("uint16", "uint32"):
            raise DataError(f"--data-dtype must be uint16 or uint32, got {data_dtype!r}")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(
                f"{source} has {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name}); the file was "
                "written with another dtype (try --data-dtype uint16) or is truncated"
            )
        ids = np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r") if size else np.zeros(0, dtype)
        layout = "stream"
    elif fmt in ("parquet", "arrow", "hf-dataset"):
        table = _read_hf_dataset(path) if fmt == "hf-dataset" else _read_arrow_table(path, fmt)
        if "input_ids" not in table.column_names:
            raise DataError(f"{source} has no 'input_ids' column (columns: {table.column_names}); tokenize it first")
        if table.num_rows == 0:
            raise DataError(f"{source} is empty (0 rows); nothing to build")
        ids, layout, notes = _column_to_array(table.column("input_ids"), source, seq_len)
    else:  # txt / jsonl
        if tokenizer is None:
            raise DataError(
                f"{source} is text; pass --tokenizer DIR (a directory with tokenizer.json, usually the teacher's)"
            )
        docs = _read_text(path, fmt)
        ids = _encode_documents(docs, tokenizer)
        layout = "stream"

    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{source} holds {ids.dtype} values; token ids must be integers")
    if ids.size == 0:
        raise DataError(f"{source} is empty (0 tokens); nothing to build")

    tokens_total = int(ids.size)
    if layout == "stream":
        if tokens_total < seq_len:
            raise DataError(
                f"{source} has only {tokens_total} tokens, fewer than one sequence of --seq-len {seq_len}; "
                "use a smaller --seq-len or more data"
            )
        available = tokens_total // seq_len
        remainder = tokens_total - available * seq_len
        sequences = ids[: available * seq_len].reshape(available, seq_len)
    else:
        if ids.shape[1] != seq_len:
            raise DataError(
                f"{source} holds 2-D rows of {ids.shape[1]} tokens but --seq-len is {seq_len}; pass "
                f"--seq-len {ids.shape[1]} (2-D data is never re-cut; save a 1-D stream to re-cut it)"
            )
        available, remainder = int(ids.shape[0]), 0
        sequences = ids
    n = available
    if max_sequences is not None:
        if max_sequences <= 0:
            raise DataError(f"--max-sequences must be positive, got {max_sequences}")
        n = min(n, max_sequences)
    return TokenData(
        source=source,
        format=fmt,
        layout=layout,
        sequences=sequences[:n],
        tokens_total=tokens_total,
        remainder_tokens_dropped=remainder,
        sequences_available=available,
        notes=notes,
    )
