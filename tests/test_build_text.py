"""Text documents of `kdcache build`: each document is tokenized as ONE text, EOS only between documents.

The token stream of a text input must be exactly ``encode(doc_1) + [EOS] + encode(doc_2) + ...`` with
``encode = tokenizer.encode(text, add_special_tokens=False).ids``, for multi-MB documents (encoded in
chunks whose boundaries the tokenizer must not see) in every ``--text-documents`` mode and for JSONL.
The text is the Python standard library's own source.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from cache_server.build.sources import DataError, load_tokenizer, open_token_data
from cache_server.build import text as text_module
from cache_server.build.text import encode_document
from tests.teachers import stdlib_documents, stdlib_text, train_tokenizer

T = 64


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300))


@pytest.fixture(scope="module")
def encode(tok):
    @functools.lru_cache(maxsize=None)
    def encode_one(text: str) -> tuple[int, ...]:
        return tuple(tok.tokenizer.encode(text, add_special_tokens=False).ids)

    return encode_one


def _joined(encode, documents: list[str], eos_id: int) -> np.ndarray:
    ids: list[int] = []
    for i, document in enumerate(documents):
        ids.extend(([eos_id] if i else []) + list(encode(document)))
    return np.asarray(ids)


@pytest.fixture(scope="module")
def corpus():
    """A .txt text with ordinary paragraphs and lines, one 1.2 MB paragraph and one 1.2 MB line (2.5 MB)."""
    text = "".join(stdlib_documents(max_files=400, max_chars=2_600_000))
    assert len(text) > 2_500_000, "not enough standard-library source for a multi-MB corpus"
    assert "\r" not in text  # so the file reads back (universal newlines) as exactly this text
    small = text[:100_000]
    giant_paragraph = "".join(line for line in text[100_000:1_300_000].splitlines(keepends=True) if line.strip())
    giant_line = text[1_300_000:2_500_000].replace("\n", " ")
    return small + "\n\n" + giant_paragraph + "\n\n" + giant_line + "\n"


def _paragraphs(text: str) -> list[str]:
    """The reference reading of --text-documents blank-line, written independently of the build's."""
    docs, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    return docs + (["\n".join(current)] if current else [])


def _stream(data) -> np.ndarray:
    return np.asarray(data.sequences).ravel()


@pytest.mark.parametrize("mode", ["file", "blank-line", "line"])
def test_txt_documents_are_encoded_whole_with_eos_between(tmp_path, tok, encode, corpus, mode):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus)
    if mode == "file":
        documents = [corpus]
    elif mode == "blank-line":
        documents = _paragraphs(corpus)
    else:
        documents = [line for line in corpus.split("\n") if line.strip()]
    assert max(map(len, documents)) > 1_100_000  # a document is encoded in several chunks
    expected = _joined(encode, documents, tok.eos_id)
    data = open_token_data(path, T, tokenizer=tok, text_documents=mode)
    assert data.tokens_total == len(expected) and data.documents == len(documents)
    np.testing.assert_array_equal(_stream(data), expected[: len(expected) // T * T])
    assert data.remainder_tokens_dropped == len(expected) % T
    entry = data.manifest_entry()
    assert entry["text_documents"] == mode and entry["documents"] == len(documents)
    if mode == "file":
        assert tok.eos_id not in expected  # one document: no EOS at all


def test_jsonl_documents_with_a_multi_mb_text(tmp_path, tok, encode, corpus):
    documents = _paragraphs(corpus) + ["", "tail document"]
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(documents)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")  # a blank line too
    data = open_token_data(tmp_path / "docs.jsonl", T, tokenizer=tok)
    kept = [d for d in documents if d]  # an empty text has no tokens: no document, no double EOS
    expected = _joined(encode, kept, tok.eos_id)
    assert data.tokens_total == len(expected) and data.documents == len(kept)
    np.testing.assert_array_equal(_stream(data), expected[: len(expected) // T * T])


def test_text_column_of_parquet_is_one_document_per_row(tmp_path, tok, encode):
    import pyarrow as pa
    import pyarrow.parquet as pq

    documents = stdlib_documents(max_files=6, max_chars=60_000)
    pq.write_table(pa.table({"text": documents, "n": list(range(len(documents)))}), tmp_path / "t.parquet")
    data = open_token_data(tmp_path / "t.parquet", T, tokenizer=tok)
    expected = _joined(encode, documents, tok.eos_id)
    assert data.documents == len(documents) and data.tokens_total == len(expected)
    np.testing.assert_array_equal(_stream(data), expected[: len(expected) // T * T])
    with pytest.raises(DataError, match="--tokenizer"):
        open_token_data(tmp_path / "t.parquet", T)
    pq.write_table(pa.table({"body": documents}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match="neither an 'input_ids' nor a 'text' column"):
        open_token_data(tmp_path / "other.parquet", T, tokenizer=tok)


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer that prepends a space marker to every input it encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tokenizer.train_from_iterator(stdlib_documents(max_files=20, max_chars=100_000),
                                  trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return tokenizer


def test_a_multi_mb_document_is_really_encoded_in_chunks(tok, encode, corpus):
    """The tests above would pass if no cut ever succeeded (the whole-document fallback gives the same ids):
    here the chunked path itself must succeed, in several chunks, with the default sizes and the BPE tokenizer."""
    document = max(_paragraphs(corpus), key=len)  # the 1.2 MB paragraph
    assert len(document) > 1_100_000
    chunk_chars, margin_chars = text_module._CHUNK_CHARS, text_module._MARGIN_CHARS
    parts = text_module._encode_in_chunks(text_module._pieces(document, chunk_chars), tok.tokenizer, chunk_chars,
                                          margin_chars)
    assert parts is not None, "no invisible cut was found: the document would be encoded whole"
    assert len(parts) >= 2 and all(len(part) for part in parts)
    assert np.concatenate(parts).tolist() == list(encode(document))


def test_find_cut_finds_a_cut_the_tokenizer_cannot_see(tok):
    chunk = stdlib_text(20_000)
    tokens = text_module._encode(tok.tokenizer, chunk)
    found = text_module._find_cut(chunk, tokens, tok.tokenizer, 256)
    assert found is not None
    kept, cut = found
    assert 0 < kept < len(tokens.ids) and tokens.offsets[kept][0] == cut
    # The tokenizer cannot tell the text was cut: what follows the cut encodes to the chunk's own tokens.
    assert text_module._encode(tok.tokenizer, chunk[cut:]).ids == tokens.ids[kept:]


def test_small_chunks_never_change_a_token(tok):
    """Chunk boundaries every few thousand characters, on text that makes cutting hard: long runs of
    spaces, a 5,000-character word, non-ASCII text, and a tokenizer that marks the start of every input (a
    cut is then invisible only where the text there starts with a space, which the marker replaces)."""
    base = stdlib_text(120_000)
    hard = (base[:30_000] + " " * 3_000 + "x" * 5_000 + "\n\n\t\t" + "héllo wörld ☃ 日本語 " * 300 + base[30_000:])
    for tokenizer in (tok.tokenizer, _metaspace_tokenizer()):
        reference = tokenizer.encode(hard, add_special_tokens=False).ids
        for chunk_chars, margin_chars in ((2_000, 128), (7_777, 512), (40_000, 256)):
            got = encode_document(hard, tokenizer, chunk_chars=chunk_chars, margin_chars=margin_chars)
            assert got.tolist() == reference, (chunk_chars, margin_chars)
        pieces = [hard[i : i + 1_000] for i in range(0, len(hard), 1_000)]
        assert encode_document(lambda: iter(pieces), tokenizer, chunk_chars=3_000, margin_chars=128).tolist() == reference
    # Which path produced those ids: the chunked one (it must not silently fall back to one whole encode)...
    chunked = text_module._encode_in_chunks(text_module._pieces(hard, 7_777), tok.tokenizer, 7_777, 512)
    assert chunked is not None and len(chunked) > 10
    # ...and, for text without a single word boundary, the whole-document fallback, with the same ids.
    word = "x" * 10_000
    assert text_module._encode_in_chunks(text_module._pieces(word, 2_000), tok.tokenizer, 2_000, 128) is None
    assert encode_document(word, tok.tokenizer, chunk_chars=2_000, margin_chars=128).tolist() == \
        tok.tokenizer.encode(word, add_special_tokens=False).ids


def test_empty_and_undecodable_text_is_refused(tmp_path, tok):
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    with pytest.raises(DataError, match="no documents"):
        open_token_data(tmp_path / "blank.txt", T, tokenizer=tok, text_documents="line")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="empty"):
        open_token_data(tmp_path / "empty.jsonl", T, tokenizer=tok)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        open_token_data(tmp_path / "latin1.txt", T, tokenizer=tok)
    with pytest.raises(DataError, match="--text-documents must be one of file, blank-line, line"):
        open_token_data(tmp_path / "latin1.txt", T, tokenizer=tok, text_documents="page")
