"""check_alignment: misaligned tokens and vocabulary mismatches raise AlignmentError with specifics; the check of a
training step reads no device memory; top-k ids are range-checked on the CPU where batches are made."""

from __future__ import annotations

import json

import pytest
import torch

import kdlib
from cache_server import format as fmt
from kdlib.alignment import shift_labels
from kdlib.loader import move_batch
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
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 41 entries but the cache's teacher has 40: "):
        kdlib.check_alignment(batch["input_ids"], batch, student_vocab_size=V + 1)
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 39 entries but the cache's teacher has 40: "):
        kdlib.check_alignment(None, batch, student_vocab_size=V - 1)
    no_vocab = {k: v for k, v in batch.items() if k != "teacher_vocab_size"}
    with pytest.raises(kdlib.AlignmentError, match="outside the student's vocabulary of 3"):
        kdlib.check_alignment(no_vocab["input_ids"], no_vocab, student_vocab_size=3)
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 64 entries but the cache's teacher has 40: "):
        kdlib.check_alignment(no_vocab["input_ids"], no_vocab, student_vocab_size=64, teacher_vocab_size=40)


def test_sample_ids_are_checked_against_the_student_vocab_without_a_teacher_size():
    """A sampled batch without teacher_vocab_size: drawn ids (count > 0) must index the student's vocabulary;
    padding slots (count 0, id 0) are not looked at."""
    ids = torch.tensor([[[5, 0], [7, 0]]], dtype=torch.int32)  # [1, 2, 2]
    counts = torch.tensor([[[3, 0], [2, 1]]], dtype=torch.uint8)
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.int32), "sample_ids": ids, "sample_counts": counts}
    kdlib.check_alignment(None, batch, student_vocab_size=8)
    with pytest.raises(kdlib.AlignmentError, match="sample id 7, outside the student's vocabulary of 7"):
        kdlib.check_alignment(None, batch, student_vocab_size=7)
    batch["sample_ids"] = torch.tensor([[[5, 9], [6, 0]]], dtype=torch.int32)  # 9 sits in a count-0 slot
    batch["sample_counts"] = torch.tensor([[[3, 0], [2, 0]]], dtype=torch.uint8)
    kdlib.check_alignment(None, batch, student_vocab_size=7)


def test_shift_labels_follows_the_convention():
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]], dtype=torch.int32)
    assert shift_labels(ids, -1).tolist() == [[6, 7, -1], [2, 3, -1]]
    assert shift_labels(ids).dtype == torch.int64


def test_step_check_reads_no_device_memory(batch):
    """A meta tensor has no data: any bool()/int() on it raises, exactly where a real device would sync."""
    on_device = move_batch(batch, "meta")
    assert on_device["input_ids"].device.type == "meta" and on_device["input_ids"].dtype == torch.int64
    assert on_device["teacher_vocab_size"].device.type == "cpu"  # bookkeeping stays on the CPU
    assert on_device["sample_indices"].device.type == "cpu"
    with pytest.raises(Exception):
        bool(on_device["topk_ids"].any())  # the probe works: reading meta data raises
    # Fed the batch's own tokens (None, or that very tensor): no token comparison, vocabulary from the CPU.
    kdlib.check_alignment(None, on_device, student_vocab_size=V)
    kdlib.check_alignment(on_device["input_ids"], on_device, student_vocab_size=V)
    kdlib.check_alignment(None, on_device, student_vocab_size=V + 24, allow_padded_vocab=True)
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 64 entries but the cache's teacher has 40: "):
        kdlib.check_alignment(None, on_device, student_vocab_size=V + 24)


def test_padded_student_vocab_is_an_explicit_option(batch):
    padded = V + 24  # like GPT-2's 50304-row embedding for 50257 tokens
    with pytest.raises(kdlib.AlignmentError, match="allow_padded_vocab=True"):
        kdlib.check_alignment(batch["input_ids"], batch, student_vocab_size=padded)
    kdlib.check_alignment(batch["input_ids"].long(), batch, student_vocab_size=padded, allow_padded_vocab=True)
    # It loosens only the size comparison: a smaller vocabulary passes only when it holds every id of the batch
    # (the error names the first one it lacks), and wrong tokens still fail.
    with pytest.raises(kdlib.AlignmentError, match=r"id \d+ at batch row \d+ \(cache sequence \d+\), position "):
        kdlib.check_alignment(batch["input_ids"], batch, student_vocab_size=int(batch["largest_id"]),
                              allow_padded_vocab=True)
    kdlib.check_alignment(batch["input_ids"], batch, student_vocab_size=int(batch["largest_id"]) + 1,
                          allow_padded_vocab=True)
    wrong = batch["input_ids"].long().clone()
    wrong[0, 3] = (wrong[0, 3] + 1) % V
    with pytest.raises(kdlib.AlignmentError, match="student tokens differ"):
        kdlib.check_alignment(wrong, batch, student_vocab_size=padded, allow_padded_vocab=True)
    # Without a known teacher vocabulary the ids themselves are checked against the student's.
    no_vocab = {k: v for k, v in batch.items() if k != "teacher_vocab_size"}
    kdlib.check_alignment(None, no_vocab, student_vocab_size=padded, allow_padded_vocab=True)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("prefetch", [0, 2])
def test_ids_outside_the_teachers_vocab_are_caught_on_the_cpu_where_batches_are_made(tmp_path, prefetch):
    path, arrays = make_synthetic_cache(tmp_path / "cache", num_sequences=8, seq_len=10, topk=4, vocab_size=V,
                                        shard_seqs=4, chunk_seqs=2, seed=1)
    # An inconsistent cache: its manifest claims fewer tokens than its top-k ids use.
    manifest = json.loads((path / fmt.MANIFEST_NAME).read_text())
    manifest["vocab_size"] = manifest["layout"]["vocab_size"] = 8
    (path / fmt.MANIFEST_NAME).write_bytes(fmt.manifest_bytes(manifest))
    cache = kdlib.open_cache(path, decode_dir=tmp_path / "dec")
    assert int(arrays["topk_ids"].max()) >= 8
    with pytest.raises(kdlib.AlignmentError, match="outside the teacher's vocabulary of 8"):
        next(iter(kdlib.make_loader(cache, 4, prefetch=prefetch)))
    with pytest.raises(kdlib.AlignmentError, match="outside the teacher's vocabulary of 8"):
        kdlib.CacheDataset(cache)[0]
