"""check_alignment: misaligned tokens and vocabulary mismatches raise AlignmentError with specifics."""

from __future__ import annotations

import pytest
import torch

import kdlib
from kdlib.alignment import shift_labels
from tests.cachefactory import make_synthetic_cache

V = 40


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    path, _ = make_synthetic_cache(root / "cache", num_sequences=8, seq_len=10, topk=4, vocab_size=V,
                                   shard_seqs=4, chunk_seqs=2, seed=1)
    loader = kdlib.make_loader(kdlib.open_cache(path, decode_dir=root / "dec"), 4, seed=0)
    return next(iter(loader))


def test_aligned_batch_passes(batch):
    kdlib.check_alignment(batch["input_ids"].long(), batch, student_vocab_size=V)
    kdlib.check_alignment(batch["input_ids"], batch)


def test_changed_tokens_report_count_and_first_index(batch):
    student = batch["input_ids"].long().clone()
    student[2, 5] = (student[2, 5] + 1) % V
    student[3, 0] = (student[3, 0] + 1) % V
    with pytest.raises(kdlib.AlignmentError, match=r"at 2 of 40 positions; first at \(sequence 2, position 5\)"):
        kdlib.check_alignment(student, batch)


def test_shift_by_one_is_diagnosed(batch):
    ids = batch["input_ids"].long()
    shifted = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)  # an extra BOS in front
    with pytest.raises(kdlib.AlignmentError, match="shifted right by one"):
        kdlib.check_alignment(shifted, batch)
    with pytest.raises(kdlib.AlignmentError, match="shifted left by one"):
        kdlib.check_alignment(torch.cat([ids[:, 1:], ids[:, :1]], dim=1), batch)


def test_other_order_is_diagnosed(batch):
    with pytest.raises(kdlib.AlignmentError, match="another order"):
        kdlib.check_alignment(batch["input_ids"].flip(0), batch)


def test_shape_mismatch(batch):
    with pytest.raises(kdlib.AlignmentError, match="shape"):
        kdlib.check_alignment(batch["input_ids"][:, :-1], batch)


def test_vocab_mismatch(batch):
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 41 entries but the cache's teacher had 40"):
        kdlib.check_alignment(batch["input_ids"], batch, student_vocab_size=V + 1)
    no_vocab = {k: v for k, v in batch.items() if k != "teacher_vocab_size"}
    with pytest.raises(kdlib.AlignmentError, match="outside the student's vocabulary of 3"):
        kdlib.check_alignment(no_vocab["input_ids"], no_vocab, student_vocab_size=3)
    with pytest.raises(kdlib.AlignmentError, match="had 40"):
        kdlib.check_alignment(no_vocab["input_ids"], no_vocab, student_vocab_size=64, teacher_vocab_size=40)


def test_shift_labels_follows_the_convention():
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]], dtype=torch.int32)
    assert shift_labels(ids, -1).tolist() == [[6, 7, -1], [2, 3, -1]]
    assert shift_labels(ids).dtype == torch.int64
