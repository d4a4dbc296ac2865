"""kdlib.crosstok end to end: a real cache built from stdlib text by a tiny Llama teacher, a student tokenizer
trained with other settings, the vocabulary map, the alignment, the loader's order/resume, the loss on its
batches (cache built without ``--record-offsets``: the teacher's spans are recomputed and checked)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdlib
from cache_server.build.job import run_build
from cache_server.build.options import BuildOptions
from kdlib.crosstok import EXACT, NONE, ULD, CrossTokLoader, crosstok_loss_from_batch, crosstok_loss_reference
from kdlib.crosstok.vocab_map import vocab_map
from tests.teachers import make_llama_teacher, stdlib_documents, train_tokenizer

T, K = 48, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crosstok")
    documents = stdlib_documents(max_files=3, max_chars=25_000) + ["", "héllo wörld 日本語 😀 — naïve"]
    teacher_tok = train_tokenizer(root / "teacher_tok", vocab_size=400, max_chars=60_000)
    student_tok = train_tokenizer(root / "student_tok", vocab_size=300, max_chars=200_000)
    teacher = make_llama_teacher(root / "teacher", 400, tokenizer_dir=teacher_tok)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    out = root / "cache"
    run_build(BuildOptions(teacher=str(teacher), data=str(data), out=str(out), topk=K, seq_len=T, progress=False,
                           shard_seqs=16, chunk_seqs=8), log=lambda s: None)
    return dict(root=root, documents=documents, teacher_tok=teacher_tok, student_tok=student_tok,
                cache=kdlib.open_cache(out))


def _loader(setup, student=None, **kw):
    kw.setdefault("shuffle", True)
    kw.setdefault("seed", 3)
    return CrossTokLoader(setup["cache"], setup["documents"], student or setup["student_tok"], 4,
                          vocab_map_dir=setup["root"] / "maps", rank=kw.pop("rank", 0),
                          world_size=kw.pop("world_size", 1), **kw)


def _token_bytes(tokenizer, ids) -> bytes:
    from tokenizers import decoders

    return decoders.ByteLevel().decode([tokenizer.id_to_token(int(i)) for i in ids]).encode()


def test_vocab_map_is_by_token_string_and_cached(setup):
    from tokenizers import Tokenizer

    tt = Tokenizer.from_file(str(setup["teacher_tok"] / "tokenizer.json"))
    st = Tokenizer.from_file(str(setup["student_tok"] / "tokenizer.json"))
    mapping = vocab_map(setup["teacher_tok"], setup["student_tok"], teacher_eos=0, student_eos=0,
                        cache_dir=setup["root"] / "maps1")
    assert mapping.shape == (tt.get_vocab_size(),)
    for teacher_id in range(len(mapping)):
        token = tt.id_to_token(teacher_id)
        assert mapping[teacher_id] == st.token_to_id(token) if st.token_to_id(token) is not None else -1
    assert 0 < (mapping >= 0).sum() < len(mapping)  # different training settings: partly shared
    files = list((setup["root"] / "maps1").glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), mapping)
    np.testing.assert_array_equal(vocab_map(setup["teacher_tok"], setup["student_tok"], teacher_eos=0,
                                            student_eos=0, cache_dir=setup["root"] / "maps1"), mapping)


def test_alignment_is_by_byte_spans(setup):
    """EXACT: the student's next token has the teacher token's bytes; ULD/EXACT: same boundary; all kinds seen."""
    from tokenizers import Tokenizer

    tt = Tokenizer.from_file(str(setup["teacher_tok"] / "tokenizer.json"))
    st = Tokenizer.from_file(str(setup["student_tok"] / "tokenizer.json"))
    loader = _loader(setup, shuffle=False)
    seen = np.zeros(3, dtype=int)
    for batch in loader:
        teacher_ids = batch["teacher_input_ids"]
        for b in range(len(teacher_ids)):
            ids, labels = batch["input_ids"][b], batch["labels"][b]
            valid = labels != -100
            seen += np.bincount(batch["align"][b][valid].numpy(), minlength=3)
            student_text = _token_bytes(st, ids[: int(valid.sum()) + 1])
            assert student_text in _token_bytes(tt, teacher_ids[b]) or 0 in ids.tolist()  # EOS decodes apart
            for j in np.flatnonzero(valid.numpy()):
                kind, t = int(batch["align"][b, j]), int(batch["teacher_pos"][b, j])
                if kind == NONE:
                    assert t == -1
                    continue
                assert _token_bytes(tt, teacher_ids[b][: t + 1]).endswith(_token_bytes(st, ids[max(0, j - 3): j + 1]))
                if kind == EXACT:
                    assert tt.id_to_token(int(teacher_ids[b][t + 1])) == st.id_to_token(int(labels[j]))
    assert seen[EXACT] > seen[ULD] > 0 and seen[NONE] > 0


def test_same_tokenizer_is_exact_everywhere_and_the_loss_is_kd_loss(setup):
    loader = _loader(setup, student=setup["teacher_tok"], student_seq_len=T)
    batch = next(iter(loader))
    valid = batch["labels"] != -100
    assert (batch["align"][valid] == EXACT).all()
    torch.testing.assert_close(batch["input_ids"], batch["teacher_input_ids"].long())
    torch.testing.assert_close(batch["teacher_pos"][valid], torch.arange(T).expand(len(valid), T)[valid])
    z = torch.randn(*batch["input_ids"].shape, 400, dtype=torch.float64)
    ours = crosstok_loss_from_batch(z, batch, loader.vocab_map, ce_weight=0.5, kd_weight=0.5)
    theirs = kdlib.kd_loss(z, batch["topk_ids"].long(), batch["topk_logprobs"].double(), labels=batch["labels"],
                           teacher_lse=batch["lse"].double(), ce_weight=0.5, kd_weight=0.5, backend="reference")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_loss_on_a_real_batch_matches_reference(setup):
    loader = _loader(setup)
    batch = next(iter(loader))
    z = torch.randn(*batch["input_ids"].shape, 300, dtype=torch.float64, requires_grad=True)
    fast = crosstok_loss_from_batch(z, batch, loader.vocab_map, ce_weight=0.5, kd_weight=0.5)
    ref = crosstok_loss_reference(z, batch["labels"], batch["teacher_pos"], batch["align"], batch["topk_ids"],
                                  batch["topk_logprobs"].double(), loader.vocab_map, ce_weight=0.5, kd_weight=0.5)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-10)
    g_fast, = torch.autograd.grad(fast, z)
    g_ref, = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g_fast, g_ref)


def test_partition_shuffle_and_resume_are_the_cache_loaders(setup):
    full = [b["sample_indices"].tolist() for b in _loader(setup)]
    inner = [b["sample_indices"].tolist() for b in kdlib.make_loader(setup["cache"], 4, shuffle=True, seed=3,
                                                                     rank=0, world_size=1)]
    assert full == inner
    ranks = [[i for b in _loader(setup, rank=r, world_size=2) for i in b["sample_indices"].tolist()] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    loader = _loader(setup)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    expected = next(it)
    resumed = _loader(setup)
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    for key in ("input_ids", "labels", "teacher_pos", "align", "sample_indices"):
        torch.testing.assert_close(got[key], expected[key])
    other = _loader(setup, student=setup["teacher_tok"])
    with pytest.raises(ValueError, match="same student tokenizer"):
        other.load_state_dict(state)


def test_other_documents_are_refused(setup):
    documents = list(setup["documents"])
    documents[1] = documents[1].replace("def ", "def  ", 1)
    with pytest.raises(ValueError, match="differ from the cache's"):
        CrossTokLoader(setup["cache"], documents, setup["student_tok"], 4, vocab_map_dir=setup["root"] / "maps",
                       rank=0, world_size=1)
