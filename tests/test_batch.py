"""kdlib.batch, the one batch assembly: read_batch/padding_batch on a real cache, the same batches from the
loader and CacheDataset (KDTrainer's look-up: tests/test_integration.py); labels per the alignment convention;
dtype and device rules; the vocabulary rule (check_student_vocab) and the top-k id range check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdlib
from kdlib.batch import (KEEP_ON_CPU, AlignmentError, batch_labels, check_student_vocab, check_topk_ids_in_vocab,
                         move_batch, padding_batch, read_batch, shift_labels, student_input_ids,
                         teacher_vocab_size_of)
from tests.cachefactory import make_synthetic_cache

N, T, K, V, S = 19, 6, 3, 40, 5


@pytest.fixture(scope="module")
def cache_and_arrays(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    path, arrays = make_synthetic_cache(root / "cache", num_sequences=N, seq_len=T, topk=K, vocab_size=V,
                                        temperatures=(2.0,), shard_seqs=S, chunk_seqs=5, seed=4)
    return kdlib.open_cache(path, decode_dir=root / "decoded"), arrays


def _assert_batches_equal(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("indices", [[3, 4, 5, 6, 7], [12, 0, 7, 7], [18], [4, 5, 6, 9]])
def test_read_batch_matches_the_written_arrays(cache_and_arrays, indices):
    cache, arrays = cache_and_arrays
    batch = read_batch(cache, indices)  # a run of consecutive indices is a read(), the rest a lookup()
    assert batch["input_ids"].dtype == torch.int32 and batch["labels"].dtype == torch.int64
    assert batch["topk_ids"].dtype == torch.int32 and batch["topk_logprobs"].dtype == torch.float16
    for name in ("input_ids", "topk_ids", "topk_logprobs", "lse", "lse_t2"):
        np.testing.assert_array_equal(batch[name].numpy(), arrays[name][indices])
    # ALIGNMENT_CONVENTION: position t predicts token t+1; the last position has no label.
    np.testing.assert_array_equal(batch["labels"][:, :-1].numpy(), arrays["input_ids"][indices, 1:])
    assert (batch["labels"][:, -1] == -100).all()
    assert batch["sample_indices"].tolist() == indices and batch["sample_indices"].dtype == torch.int64
    assert int(batch["teacher_vocab_size"]) == V and batch["teacher_vocab_size"].dim() == 0


def test_padding_row_is_ignored_everywhere(cache_and_arrays):
    cache, arrays = cache_and_arrays
    pad = padding_batch(cache, 7, ignore_index=-1)
    np.testing.assert_array_equal(pad["input_ids"].numpy(), arrays["input_ids"][[7]])
    assert pad["labels"].tolist() == [[-1] * T] and pad["sample_indices"].tolist() == [-1]


def test_arrays_must_include_input_ids(cache_and_arrays):
    cache, _ = cache_and_arrays
    with pytest.raises(ValueError, match="needs 'input_ids' among arrays"):
        read_batch(cache, [0, 1], arrays=["topk_ids"])
    batch = read_batch(cache, [0, 1], arrays=["input_ids", "topk_ids"])
    assert set(batch) == {"input_ids", "topk_ids", "labels", "sample_indices", "teacher_vocab_size", "largest_id"}


def test_loader_and_dataset_make_the_same_batches(cache_and_arrays):
    cache, _ = cache_and_arrays
    for batch in kdlib.make_loader(cache, 4, seed=3, drop_last=False, prefetch=0):
        _assert_batches_equal(batch, read_batch(cache, batch["sample_indices"].numpy()))
    idx = [9, 2, 2, 14]
    _assert_batches_equal(kdlib.CacheDataset(cache).batch(idx), read_batch(cache, idx))


def test_labels_from_the_batch_or_shifted_tokens():
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]], dtype=torch.int32)
    assert shift_labels(ids, -1).tolist() == [[6, 7, -1], [2, 3, -1]]
    assert batch_labels({"input_ids": ids}).tolist() == [[6, 7, -100], [2, 3, -100]]
    own = torch.full((2, 3), -100)  # e.g. a padding row's labels: kept, not recomputed
    assert batch_labels({"input_ids": ids, "labels": own}) is own
    with pytest.raises(ValueError, match="neither 'labels' nor 'input_ids'"):
        batch_labels({"topk_ids": ids})


def test_student_input_ids_and_move_batch_dtype_rules(cache_and_arrays):
    cache, _ = cache_and_arrays
    batch = read_batch(cache, [0, 1, 2])
    ids = student_input_ids(batch)
    assert ids.dtype == torch.int64 and torch.equal(ids, batch["input_ids"].long())
    with pytest.raises(ValueError, match="integer token ids"):
        student_input_ids({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="no 'input_ids'"):
        student_input_ids({"labels": torch.zeros(2, 3)})
    moved = move_batch(batch, "meta")
    assert moved["input_ids"].dtype == torch.int64 and moved["input_ids"].device.type == "meta"
    assert moved["topk_ids"].dtype == torch.int32 and moved["topk_logprobs"].dtype == torch.float16  # compact
    assert all(moved[k].device.type == "cpu" for k in KEEP_ON_CPU if k in batch)  # never waits for the device
    assert move_batch(batch, "meta", long_input_ids=False)["input_ids"].dtype == torch.int32


def test_check_student_vocab_rule():
    check_student_vocab(40, 40, allow_padded_vocab=False)
    check_student_vocab(40, None, allow_padded_vocab=False)  # nothing to compare
    check_student_vocab(64, 40, allow_padded_vocab=True)  # an embedding padded beyond the teacher's tokens
    check_student_vocab(40, torch.tensor([40, 40]), allow_padded_vocab=False)  # a collated CPU tensor
    with pytest.raises(AlignmentError, match=r"^the student's vocabulary has 64 entries but the cache's teacher "
                                             r"has 40: .*allow_padded_vocab=True"):
        check_student_vocab(64, 40, allow_padded_vocab=False)
    # Smaller: only with allow_padded_vocab=True and a largest id below the student's size (test_vocab_mismatch.py).
    for padded, largest in ((False, 30), (True, None), (True, 39)):
        with pytest.raises(AlignmentError, match="vocabulary has 39 entries but the cache's teacher has 40: "):
            check_student_vocab(39, 40, allow_padded_vocab=padded, largest_id=largest)
    check_student_vocab(39, 40, allow_padded_vocab=True, largest_id=38)
    assert issubclass(AlignmentError, ValueError) and kdlib.AlignmentError is AlignmentError
    assert teacher_vocab_size_of({"teacher_vocab_size": torch.tensor(7)}) == 7
    assert teacher_vocab_size_of({}, 9) == 9 and teacher_vocab_size_of({}) is None


def test_check_topk_ids_in_vocab():
    ids = np.array([[[0, 5, 39]]], dtype=np.uint16)
    check_topk_ids_in_vocab(ids, 40)
    check_topk_ids_in_vocab(torch.from_numpy(ids.astype(np.int32)), 40)
    check_topk_ids_in_vocab(np.empty((0, 3, 2), np.int32), 1)
    with pytest.raises(AlignmentError, match="id 39, outside the teacher's vocabulary of 39.*inconsistent"):
        check_topk_ids_in_vocab(ids, 39)
    with pytest.raises(AlignmentError, match="id 39, outside the student's vocabulary of 20"):
        check_topk_ids_in_vocab(torch.tensor(ids.astype(np.int64)), 20, vocab_of="student")
    if hasattr(torch, "uint16"):
        with pytest.raises(AlignmentError, match="outside the student's vocabulary of 20"):
            check_topk_ids_in_vocab(torch.from_numpy(ids), 20, vocab_of="student")
    with pytest.raises(ValueError, match="vocab_of"):
        check_topk_ids_in_vocab(ids, 40, vocab_of="model")
