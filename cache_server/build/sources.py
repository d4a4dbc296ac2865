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
  integer column is a stream. Without ``input_ids``, a string column ``text`` is tokenized, one row per
  document.
* Text, tokenized with ``--tokenizer``: ``.txt`` (by default the whole file is one document; see
  ``--text-documents``) and ``.jsonl`` (the ``text`` field of each JSON object is one document). What a
  document is in each format is defined in ``text_inputs.py``. A document is tokenized as ONE text, and
  documents are joined with the tokenizer's EOS id when it has one: EOS stands between documents, never
  inside one and not after the last.

Stream rule: a 1-D stream is cut into ``len // T`` consecutive sequences; the remainder (``len % T`` tokens,
fewer than T) is DROPPED and reported (``remainder_tokens_dropped``) in the build summary and in the
manifest's ``dataset`` field. ``--max-sequences`` then keeps the first N sequences.

The data fingerprint is the sha256 of exactly the token ids used, as little-endian uint32 in row-major
[N, T] order, prefixed by ``"N,T;"`` — independent of the input file format.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache_server.build.errors import DataError
from cache_server.build.text_inputs import (
    TEXT_DOCUMENT_MODES,
    TokenizerInfo,
    jsonl_documents,
    load_tokenizer,
    text_column_documents,
    tokenize_documents,
    txt_documents,
)

__all__ = [
    "DataError",
    "TokenData",
    "TokenizerInfo",
    "DATA_FORMATS",
    "TEXT_DOCUMENT_MODES",
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
_BIN_DEFAULT_DTYPE = "uint16"  # what a .bin stream is read as without --data-dtype
_FINGERPRINT_BLOCK_ROWS_TOKENS = 1 << 22  # tokens hashed per block: bounds memory for memory-mapped inputs


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
    documents: int | None = None  # text inputs: documents tokenized
    text_documents: str | None = None  # .txt inputs: what one document is (--text-documents)
    data_dtype: str | None = None  # .bin inputs: the dtype the stream was read as (--data-dtype)
    # --record-offsets (text inputs): token_doc [N, T], token_bytes [N, T, 2] uint32 (format/offsets.py)
    offsets: dict[str, np.ndarray] | None = None
    documents_sha256: list[str] | None = None  # --record-offsets: each input document's fingerprint
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
        """The manifest's ``dataset`` entry: enough to rerun the build (``kdcache info``) and what was used.

        ``source`` is recorded as an absolute path. The settings a rerun is compared on hold the data's
        fingerprint, not its path, so the path is only there to print a command that runs from any
        directory; absolute, it is also the same whatever directory a build (or its resume) started from,
        so a resume with the printed command writes the same manifest bytes as an uninterrupted build.
        """
        entry = {
            "source": os.path.abspath(self.source),
            "format": self.format,
            "layout": self.layout,
            "tokens_total": self.tokens_total,
            "tokens_used": self.tokens_used,
            "remainder_tokens_dropped": self.remainder_tokens_dropped,
            "sequences_available": self.sequences_available,
            "sequences_used": self.num_sequences,
            "fingerprint": self.fingerprint,
        }
        if self.documents is not None:
            entry["documents"] = self.documents
        if self.text_documents is not None:
            entry["text_documents"] = self.text_documents
        if self.data_dtype is not None:
            entry["data_dtype"] = self.data_dtype
        if self.documents_sha256 is not None:
            entry["documents_sha256"] = self.documents_sha256
        return entry


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


def _input_column(names: list[str], source: str) -> str:
    """The column a table input is read from: token ids if it has them, else text to tokenize."""
    for name in ("input_ids", "text"):
        if name in names:
            return name
    raise DataError(
        f"{source} has neither an 'input_ids' nor a 'text' column (columns: {names}); tokenize it into "
        "'input_ids', or name its text column 'text'"
    )


def _read_arrow_table(path: Path, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_table(path, columns=[_input_column(pq.read_schema(path).names, str(path))])
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowException, OSError) as exc:
        kind = "Parquet" if fmt == "parquet" else "Arrow IPC"
        raise DataError(f"cannot read {path} as a {kind} file ({exc}); is it damaged or of another format?") from exc
    return table.select([_input_column(table.column_names, str(path))])


def _read_hf_dataset(path: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:  # FileNotFoundError for missing pieces, ValueError for bad metadata
        raise DataError(f"cannot load the datasets directory {path} ({exc}); is it complete?") from exc
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits {list(ds)}; pass one split's directory")
    column = _input_column(ds.column_names, str(path))
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    return ds.data.table.select([column])


# --------------------------------------------------------------------------------------------- entry point


@dataclass
class _Ids:
    """Token ids as read from an input, before they are cut into sequences."""

    ids: np.ndarray  # 1-D stream or 2-D [rows, L]
    layout: str  # "stream" | "rows"
    notes: list[str] = field(default_factory=list)
    documents: int | None = None
    offsets: Any = None  # text_inputs.TextOffsets with --record-offsets


def _load_npy(path: Path) -> _Ids:
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise DataError(f"{path} is not a .npy file (no NumPy header); save the token ids with numpy.save")
    try:
        ids = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        raise DataError(
            f"{path} cannot be read as a plain array without unpickling ({exc}); save a plain integer array"
        ) from exc
    if ids.ndim not in (1, 2):
        raise DataError(f"{path} has shape {ids.shape}; expected a 1-D token stream or 2-D [sequences, T]")
    return _Ids(ids, "stream" if ids.ndim == 1 else "rows")


def _load_bin(path: Path, data_dtype: str | None) -> _Ids:
    dtype = np.dtype(data_dtype or _BIN_DEFAULT_DTYPE)
    if dtype.name not in ("uint16", "uint32"):
        raise DataError(f"--data-dtype must be uint16 or uint32, got {data_dtype!r}")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            f"{path} has {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name}); the file was "
            "written with another dtype (try --data-dtype uint16) or is truncated"
        )
    return _Ids(np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r") if size else np.zeros(0, dtype), "stream")


def _load_table(path: Path, fmt: str, seq_len: int, tokenizer: TokenizerInfo | None, record_offsets: bool) -> _Ids:
    table = _read_hf_dataset(path) if fmt == "hf-dataset" else _read_arrow_table(path, fmt)
    if table.num_rows == 0:
        raise DataError(f"{path} is empty (0 rows); nothing to build")
    if table.column_names == ["text"]:
        ids, count, notes, offsets = tokenize_documents(text_column_documents(table.column("text"), str(path)),
                                                        tokenizer, str(path), record_offsets)
        return _Ids(ids, "stream", notes, count, offsets)
    ids, layout, notes = _column_to_array(table.column("input_ids"), str(path), seq_len)
    return _Ids(ids, layout, notes)


def _load_ids(path: Path, fmt: str, seq_len: int, data_dtype, tokenizer, text_documents: str,
              record_offsets: bool = False) -> _Ids:
    if fmt == "npy":
        return _load_npy(path)
    if fmt == "bin":
        return _load_bin(path, data_dtype)
    if fmt in ("parquet", "arrow", "hf-dataset"):
        return _load_table(path, fmt, seq_len, tokenizer, record_offsets)
    documents = txt_documents(path, text_documents) if fmt == "txt" else jsonl_documents(path)
    ids, count, notes, offsets = tokenize_documents(documents, tokenizer, str(path), record_offsets)
    return _Ids(ids, "stream", notes, count, offsets)


def open_token_data(
    path: str | os.PathLike,
    seq_len: int,
    *,
    data_dtype: str | None = None,
    tokenizer: TokenizerInfo | None = None,
    max_sequences: int | None = None,
    text_documents: str = "file",
    record_offsets: bool = False,
) -> TokenData:
    """Open token data and return its [N, T] sequences, validating shape and dtype (not yet vocab range).

    Args:
        path: the input (see the module docstring for the formats).
        seq_len: T.
        data_dtype: uint16 | uint32 for a raw ``.bin`` stream.
        tokenizer: for text inputs.
        max_sequences: keep only the first N sequences.
        text_documents: what one document of a ``.txt`` file is: file | blank-line | line.
        record_offsets: also keep each token's document and UTF-8 byte span (text inputs only;
            ``cache_server/format/offsets.py``).

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
    if text_documents not in TEXT_DOCUMENT_MODES:
        raise DataError(f"--text-documents must be one of {', '.join(TEXT_DOCUMENT_MODES)}, got {text_documents!r}")
    if max_sequences is not None and max_sequences <= 0:
        raise DataError(f"--max-sequences must be positive, got {max_sequences}")
    loaded = _load_ids(path, fmt, seq_len, data_dtype, tokenizer, text_documents, record_offsets)
    if record_offsets and loaded.offsets is None:
        raise DataError(f"--record-offsets needs text input (.txt, .jsonl, or a table with a 'text' column and no "
                        f"'input_ids'); {source} holds token ids, whose text is unknown")
    ids = loaded.ids
    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{source} holds {ids.dtype} values; token ids must be integers")
    if ids.size == 0:
        raise DataError(f"{source} is empty (0 tokens); nothing to build")
    sequences, remainder = _cut(ids, loaded.layout, seq_len, source)
    available = int(sequences.shape[0])
    n = available if max_sequences is None else min(available, max_sequences)
    return TokenData(
        source=source,
        format=fmt,
        layout=loaded.layout,
        sequences=sequences[:n],
        tokens_total=int(ids.size),
        remainder_tokens_dropped=remainder,
        sequences_available=available,
        notes=loaded.notes,
        documents=loaded.documents,
        text_documents=text_documents if fmt == "txt" else None,
        data_dtype=np.dtype(data_dtype or _BIN_DEFAULT_DTYPE).name if fmt == "bin" else None,
        offsets=None if loaded.offsets is None else dict(zip(("token_doc", "token_bytes"), loaded.offsets.cut(n, seq_len))),
        documents_sha256=None if loaded.offsets is None else loaded.offsets.documents_sha256,
    )


def _cut(ids: np.ndarray, layout: str, seq_len: int, source: str) -> tuple[np.ndarray, int]:
    """[N, T] sequences of ``ids`` and the stream remainder dropped (see the module docstring)."""
    if layout == "rows":
        if ids.shape[1] != seq_len:
            raise DataError(
                f"{source} holds 2-D rows of {ids.shape[1]} tokens but --seq-len is {seq_len}; pass "
                f"--seq-len {ids.shape[1]} (2-D data is never re-cut; save a 1-D stream to re-cut it)"
            )
        return ids, 0
    if ids.size < seq_len:
        raise DataError(
            f"{source} has only {ids.size} tokens, fewer than one sequence of --seq-len {seq_len}; "
            "use a smaller --seq-len or more data"
        )
    available = ids.size // seq_len
    return ids[: available * seq_len].reshape(available, seq_len), int(ids.size - available * seq_len)
