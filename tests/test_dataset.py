"""CacheDataset (map-style) and cache.lookup for users with their own samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdlib
from tests.cachefactory import make_synthetic_cache

N, T, K, V = 21, 6, 3, 50


@pytest.fixture(scope="module")
def cache_and_arrays(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    path, arrays = make_synthetic_cache(root / "cache", num_sequences=N, seq_len=T, topk=K, vocab_size=V,
                                        temperatures=(0.5,), shard_seqs=6, chunk_seqs=2, seed=9)
    return kdlib.open_cache(path, decode_dir=root / "decoded"), arrays


def test_getitem_matches_written_arrays(cache_and_arrays):
    cache, arrays = cache_and_arrays
    ds = kdlib.CacheDataset(cache)
    assert len(ds) == N
    sample = ds[7]
    np.testing.assert_array_equal(sample["input_ids"].numpy(), arrays["input_ids"][7])
    np.testing.assert_array_equal(sample["topk_logprobs"].numpy(), arrays["topk_logprobs"][7])
    np.testing.assert_array_equal(sample["lse_t0.5"].numpy(), arrays["lse_t0.5"][7])
    assert sample["labels"].tolist() == arrays["input_ids"][7, 1:].tolist() + [-100]
    assert int(sample["sample_indices"]) == 7
    assert int(ds[-1]["sample_indices"]) == N - 1
    with pytest.raises(IndexError, match="outside"):
        ds[N]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_with_own_distributed_sampler(cache_and_arrays, num_workers):
    cache, arrays = cache_and_arrays
    ds = kdlib.CacheDataset(cache, arrays=["topk_ids", "topk_logprobs", "lse"])
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        for batch in torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=num_workers):
            idx = batch["sample_indices"].numpy()
            assert set(batch) == {"input_ids", "topk_ids", "topk_logprobs", "lse", "labels", "sample_indices",
                                  "teacher_vocab_size", "largest_id"}
            np.testing.assert_array_equal(batch["topk_ids"].numpy(), arrays["topk_ids"][idx])
            kdlib.check_alignment(torch.from_numpy(arrays["input_ids"][idx]).long(), batch, student_vocab_size=V)
            seen += idx.tolist()
    assert set(seen) == set(range(N))  # DistributedSampler pads by repeating, so only the set is exact


def test_lookup_by_sequence_indices_in_given_order(cache_and_arrays):
    cache, arrays = cache_and_arrays
    idx = [19, 0, 5, 5, 12]
    batch = cache.lookup(idx)
    np.testing.assert_array_equal(batch["topk_ids"].numpy(), arrays["topk_ids"][idx])
    ds_batch = kdlib.CacheDataset(cache).batch(torch.tensor(idx))
    assert torch.equal(ds_batch["topk_logprobs"], batch["topk_logprobs"])
    assert ds_batch["sample_indices"].tolist() == idx
