"""CacheLoader: order, partition over ranks x workers, remainders, elastic mid-epoch resume, labels."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import kdlib
from kdlib.loader import RankPlan, epoch_order
from tests.cachefactory import make_synthetic_cache

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

N, T, K, V, S = 37, 8, 4, 64, 8  # 37 = prime: every batch size and world size leaves a remainder


@pytest.fixture(scope="module")
def cache_and_arrays(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    path, arrays = make_synthetic_cache(root / "cache", num_sequences=N, seq_len=T, topk=K, vocab_size=V,
                                        temperatures=(2.0,), shard_seqs=S, chunk_seqs=4, seed=3)
    cache = kdlib.open_cache(path, decode_dir=root / "decoded")
    cache.prepare()  # decode once before workers fork
    return cache, arrays


def _indices(batches):
    return [i for b in batches for i in b["sample_indices"].tolist()]


def _run_ranks(cache, world_size, num_workers, **kw):
    """Every rank's sample indices for one epoch (ranks simulated in this process)."""
    per_rank = []
    for rank in range(world_size):
        loader = kdlib.make_loader(cache, 4, rank=rank, world_size=world_size, num_workers=num_workers, **kw)
        per_rank.append(_indices(loader))
    return per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_partition_covers_every_sequence_exactly_once(cache_and_arrays, world_size, num_workers):
    cache, _ = cache_and_arrays
    per_rank = _run_ranks(cache, world_size, num_workers, seed=5, drop_last=False)
    seen = [i for rank in per_rank for i in rank if i >= 0]  # -1 marks a padding row
    assert sorted(seen) == list(range(N))
    assert len({len(r) > 0 for r in per_rank}) == 1
    # Same batch order whatever the number of workers.
    reference = _run_ranks(cache, world_size, 0, seed=5, drop_last=False, prefetch=0)
    assert per_rank == reference


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_drop_last_drops_only_the_remainder_and_ranks_take_equal_steps(cache_and_arrays, world_size):
    cache, _ = cache_and_arrays
    per_rank = _run_ranks(cache, world_size, 0, seed=1, drop_last=True)
    seen = [i for r in per_rank for i in r]
    assert len(seen) == len(set(seen)) == (N // (4 * world_size)) * 4 * world_size
    assert len({len(r) for r in per_rank}) == 1


def test_padding_row_when_remainder_is_smaller_than_world(tmp_path):
    path, _ = make_synthetic_cache(tmp_path / "c", num_sequences=10, seq_len=T, topk=K, vocab_size=V,
                                   shard_seqs=4, chunk_seqs=2)
    cache = kdlib.open_cache(path, decode_dir=tmp_path / "dec")
    batches = [list(kdlib.make_loader(cache, 2, rank=r, world_size=4, drop_last=False)) for r in range(4)]
    assert [len(b) for b in batches] == [2, 2, 2, 2]  # equal step counts: no DDP hang
    last = [b[-1] for b in batches]
    assert [len(b["sample_indices"]) for b in last] == [1, 1, 1, 1]
    for b in last[2:]:
        assert b["sample_indices"].tolist() == [-1]
        assert (b["labels"] == -100).all()
    seen = [i for bs in batches for b in bs for i in b["sample_indices"].tolist() if i >= 0]
    assert sorted(seen) == list(range(10))


def test_batches_carry_cache_data_and_shifted_labels(cache_and_arrays):
    cache, arrays = cache_and_arrays
    for batch in kdlib.make_loader(cache, 5, seed=2, drop_last=False):
        idx = batch["sample_indices"].numpy()
        assert batch["input_ids"].dtype == torch.int32 and batch["labels"].dtype == torch.int64
        assert batch["topk_ids"].dtype == torch.int32 and batch["topk_logprobs"].dtype == torch.float16
        np.testing.assert_array_equal(batch["input_ids"].numpy(), arrays["input_ids"][idx])
        np.testing.assert_array_equal(batch["topk_ids"].numpy(), arrays["topk_ids"][idx])
        np.testing.assert_array_equal(batch["topk_logprobs"].numpy(), arrays["topk_logprobs"][idx])
        np.testing.assert_array_equal(batch["lse_t2"].numpy(), arrays["lse_t2"][idx])
        # ALIGNMENT_CONVENTION: position t predicts token t+1; the last position has no label.
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:].long())
        assert (batch["labels"][:, -1] == -100).all()
        assert int(batch["teacher_vocab_size"]) == V


def test_order_is_deterministic_shard_local_and_differs_per_epoch():
    a = epoch_order(1000, 10, shuffle=True, seed=7, epoch=0, shuffle_window_shards=3)
    assert np.array_equal(a, epoch_order(1000, 10, shuffle=True, seed=7, epoch=0, shuffle_window_shards=3))
    assert sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, epoch_order(1000, 10, shuffle=True, seed=7, epoch=1, shuffle_window_shards=3))
    assert not np.array_equal(a, epoch_order(1000, 10, shuffle=True, seed=8, epoch=0, shuffle_window_shards=3))
    # Every run of 30 positions (one window of 3 shards) comes from exactly 3 shards.
    for w in range(0, 990, 30):
        assert len(set((a[w:w + 30] // 10).tolist())) == 3
    assert np.array_equal(epoch_order(50, 10, shuffle=False, seed=7, epoch=3), np.arange(50))


def test_unshuffled_loader_reads_in_order(cache_and_arrays):
    cache, _ = cache_and_arrays
    assert _indices(kdlib.make_loader(cache, 4, shuffle=False, drop_last=False)) == list(range(N))


@pytest.mark.parametrize("stop_after", [1, 3])
def test_elastic_resume_changes_workers_world_size_and_batch_size(cache_and_arrays, stop_after):
    cache, _ = cache_and_arrays
    seen: list[int] = []
    # Phase 1: 2 ranks x 2 workers, batch 4; every rank stops after `stop_after` steps.
    states = []
    for rank in range(2):
        loader = kdlib.make_loader(cache, 4, seed=11, rank=rank, world_size=2, num_workers=2, drop_last=False)
        it = iter(loader)
        for _ in range(stop_after):
            seen += next(it)["sample_indices"].tolist()
        it.close()
        states.append(loader.state_dict())
    assert states[0] == states[1]  # the state is global: any rank can save it
    assert states[0]["cursor"] == stop_after * 8
    # Phase 2: 3 ranks x 1 worker, batch 3, resumed from the saved state.
    for rank in range(3):
        loader = kdlib.make_loader(cache, 3, seed=999, rank=rank, world_size=3, num_workers=1, drop_last=False)
        loader.load_state_dict(states[0])
        seen += _indices(loader)
        assert loader.epoch == 1 and loader.cursor == 0
    seen = [i for i in seen if i >= 0]
    assert Counter(seen) == Counter(range(N))


def test_break_and_iterate_again_continues_then_next_epoch(cache_and_arrays):
    cache, _ = cache_and_arrays
    loader = kdlib.make_loader(cache, 4, seed=4, drop_last=False)
    it = iter(loader)
    first = [next(it)["sample_indices"].tolist() for _ in range(2)]
    it.close()
    state = loader.state_dict()
    rest = _indices(loader)
    assert sorted(sum(first, []) + rest) == list(range(N))
    assert loader.epoch == 1 and loader.cursor == 0
    epoch1 = _indices(loader)
    assert sorted(epoch1) == list(range(N)) and epoch1 != sum(first, []) + rest
    # The saved mid-epoch state replays exactly the rest of epoch 0.
    fresh = kdlib.make_loader(cache, 4, drop_last=False)
    fresh.load_state_dict(state)
    assert len(fresh) == len(rest) // 4 + (len(rest) % 4 > 0)
    assert _indices(fresh) == rest


def test_rank_and_world_size_from_environment(cache_and_arrays, monkeypatch):
    cache, _ = cache_and_arrays
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    loader = kdlib.make_loader(cache, 4)
    assert (loader.rank, loader.world_size) == (2, 3)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="rank < world_size"):
        kdlib.make_loader(cache, 4)


def test_spawned_workers_reopen_the_cache(cache_and_arrays):
    cache, _ = cache_and_arrays
    loader = kdlib.make_loader(cache, 8, num_workers=1, multiprocessing_context="spawn", drop_last=False)
    assert sorted(_indices(loader)) == list(range(N))


def test_cache_path_and_device_option(cache_and_arrays):
    cache, _ = cache_and_arrays
    loader = kdlib.make_loader(str(cache.path), 4, device="cpu",
                               open_kwargs={"decode_dir": cache.decode_dir.parent})
    batch = next(iter(loader))
    assert batch["input_ids"].dtype == torch.int64 and batch["topk_ids"].dtype == torch.int32


def test_bad_arguments_and_states_raise(cache_and_arrays, tmp_path):
    cache, _ = cache_and_arrays
    with pytest.raises(ValueError, match="batch_size"):
        kdlib.make_loader(cache, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        kdlib.make_loader(cache, 32, rank=0, world_size=2)
    loader = kdlib.make_loader(cache, 4)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="37 sequences"):
        other_path, _ = make_synthetic_cache(tmp_path / "o", num_sequences=12, seq_len=T, topk=K, vocab_size=V)
        other = kdlib.make_loader(kdlib.open_cache(other_path, decode_dir=tmp_path / "d"), 4)
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({**state, "version": 99})


def test_rank_plan_arithmetic():
    plan = RankPlan(remaining=23, batch_size=3, world_size=2, rank=1, drop_last=False)
    assert plan.num_batches == 4 and plan.batch_range(0) == (3, 6) and plan.batch_range(3) == (21, 23)
    assert plan.consumed_after(0) == 6 and plan.consumed_after(3) == 23
    assert RankPlan(23, 3, 2, 1, True).num_batches == 3
