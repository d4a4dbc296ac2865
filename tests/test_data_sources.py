"""Token data inputs: every format gives the same [N, T] sequences, stream remainders, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_server.build.sources import DataError, load_tokenizer, open_token_data
from tests.teachers import stdlib_documents, train_tokenizer, write_token_file

T = 13


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 300, size=10 * T + 5)  # 10 sequences + 5 remainder tokens


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.mark.parametrize("kind", ["npy", "bin-uint16", "bin-uint32", "parquet", "arrow", "hf-dataset"])
def test_stream_formats_cut_into_sequences(tmp_path, stream, kind):
    suffix = {"npy": ".npy", "parquet": ".parquet", "arrow": ".arrow", "hf-dataset": ""}.get(kind, ".bin")
    path = write_token_file(tmp_path / f"data{suffix}", stream, kind)
    data = open_token_data(path, T, data_dtype=kind.split("-")[1] if kind.startswith("bin") else None)
    assert data.layout == "stream"
    np.testing.assert_array_equal(np.asarray(data.sequences), stream[: 10 * T].reshape(10, T))
    assert (data.tokens_total, data.tokens_used, data.remainder_tokens_dropped) == (len(stream), 10 * T, 5)
    entry = data.manifest_entry()
    assert entry["remainder_tokens_dropped"] == 5 and entry["fingerprint"].startswith("sha256:")


@pytest.mark.parametrize("kind", ["npy", "parquet", "arrow", "hf-dataset"])
def test_2d_formats_and_fingerprint_independent_of_format(tmp_path, stream, kind):
    rows = stream[: 10 * T].reshape(10, T)
    suffix = {"npy": ".npy", "parquet": ".parquet", "arrow": ".arrow", "hf-dataset": ""}[kind]
    data = open_token_data(write_token_file(tmp_path / f"rows{suffix}", rows, kind), T)
    assert data.layout == "rows" and data.remainder_tokens_dropped == 0
    np.testing.assert_array_equal(np.asarray(data.sequences), rows)
    stream_data = open_token_data(write_token_file(tmp_path / "s.npy", stream, "npy"), T)
    assert data.fingerprint == stream_data.fingerprint  # same ids used ⇒ same fingerprint


def test_max_sequences_and_fingerprint_tracks_used_ids(tmp_path, stream):
    path = write_token_file(tmp_path / "s.npy", stream, "npy")
    full, few = open_token_data(path, T), open_token_data(path, T, max_sequences=3)
    assert few.num_sequences == 3 and few.sequences_available == 10
    assert few.fingerprint != full.fingerprint


def test_variable_length_rows_are_packed_into_a_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [list(range(i, i + n)) for i, n in enumerate([5, 20, 9, 30])]
    pq.write_table(pa.table({"input_ids": rows}), tmp_path / "docs.parquet")
    data = open_token_data(tmp_path / "docs.parquet", T)
    flat = np.concatenate([np.asarray(r) for r in rows])
    assert data.layout == "stream" and data.notes
    np.testing.assert_array_equal(np.asarray(data.sequences).ravel(), flat[: len(flat) // T * T])


def test_text_and_jsonl_with_tokenizer(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    docs = stdlib_documents(max_files=3, max_chars=20_000)
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    txt = open_token_data(tmp_path / "a.txt", T, tokenizer=tok)
    # The whole .txt file is one document: exactly its encoding, no EOS (EOS only stands between documents).
    expected = np.asarray(tok.tokenizer.encode(docs[0], add_special_tokens=False).ids)
    np.testing.assert_array_equal(np.asarray(txt.sequences).ravel(), expected[: len(expected) // T * T])
    assert txt.tokens_total == len(expected) and txt.documents == 1
    jsonl = open_token_data(tmp_path / "a.jsonl", T, tokenizer=tok)
    assert jsonl.tokens_total == sum(len(tok.tokenizer.encode(d).ids) for d in docs) + len(docs) - 1
    assert tok.eos_id is not None and (np.asarray(jsonl.sequences) == tok.eos_id).sum() >= 1
    assert jsonl.documents == len(docs) and jsonl.manifest_entry()["documents"] == len(docs)
    with pytest.raises(DataError, match="--tokenizer"):
        open_token_data(tmp_path / "a.txt", T)


def _raises(match, path, seq_len=T, **kw):
    with pytest.raises(DataError, match=match):
        data = open_token_data(path, seq_len, **kw)
        data.check_ids(300)


def test_bad_inputs(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros(0, np.int64))
    _raises("empty", tmp_path / "empty.npy")
    np.save(tmp_path / "short.npy", np.arange(5))
    _raises("fewer than one sequence", tmp_path / "short.npy")
    np.save(tmp_path / "rows.npy", np.zeros((4, 12), np.int64))
    _raises("--seq-len 12", tmp_path / "rows.npy")
    np.save(tmp_path / "float.npy", np.zeros(100, np.float32))
    _raises("integers", tmp_path / "float.npy")
    np.save(tmp_path / "neg.npy", np.full(100, -1, np.int64))
    _raises("non-negative", tmp_path / "neg.npy")
    np.save(tmp_path / "big.npy", np.full(100, 300, np.int64))
    _raises("outside the teacher vocabulary", tmp_path / "big.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _raises("unpickling", tmp_path / "obj.npy")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    _raises("not a multiple", tmp_path / "odd.bin", data_dtype="uint16")
    # uint16 data read as uint32 gives huge ids: the error points at --data-dtype.
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "u16.bin")
    _raises("--data-dtype uint16", tmp_path / "u16.bin", data_dtype="uint32")
    _raises("does not exist", tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2,3")
    _raises("unknown data format", tmp_path / "x.csv")
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    _raises("text", tmp_path / "bad.jsonl", tokenizer=object())
