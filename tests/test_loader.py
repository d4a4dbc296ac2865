"""CacheLoader: order, partition over ranks x workers, remainders, elastic mid-epoch resume, labels,
shard prefetch ahead of the reads, errors from the producer, deterministic stop, resume identity."""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

import kdlib
from cache_server import format as fmt
from cache_server.format import CorruptShardError
from kdlib.order import epoch_order
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


def _run_ranks(cache, world_size, num_workers, batch_counts=None, **kw):
    """Every rank's sample indices for one epoch (ranks simulated in this process)."""
    per_rank = []
    for rank in range(world_size):
        loader = kdlib.make_loader(cache, 4, rank=rank, world_size=world_size, num_workers=num_workers, **kw)
        batches = list(loader)
        if batch_counts is not None:
            batch_counts.append(len(batches))
        per_rank.append(_indices(batches))
    return per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_partition_covers_every_sequence_exactly_once(cache_and_arrays, world_size, num_workers):
    cache, _ = cache_and_arrays
    counts: list[int] = []
    per_rank = _run_ranks(cache, world_size, num_workers, counts, seed=5, drop_last=False)
    seen = [i for rank in per_rank for i in rank if i >= 0]  # -1 marks a padding row
    assert sorted(seen) == list(range(N))
    # Every rank takes the same number of steps (DDP's all-reduce would hang otherwise): ceil(N / (W*B)).
    assert counts == [-(-N // (4 * world_size))] * world_size
    # Same batch order whatever the number of workers.
    reference = _run_ranks(cache, world_size, 0, seed=5, drop_last=False, prefetch=0)
    assert per_rank == reference


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_drop_last_drops_only_the_remainder_and_ranks_take_equal_steps(cache_and_arrays, world_size):
    cache, _ = cache_and_arrays
    per_rank = _run_ranks(cache, world_size, 0, seed=1, drop_last=True)
    seen = [i for r in per_rank for i in r]
    assert len(seen) == len(set(seen)) == (N // (4 * world_size)) * 4 * world_size
    assert [len(r) for r in per_rank] == [(N // (4 * world_size)) * 4] * world_size


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


# ----------------------------------------------------------------------------------------------- shard prefetch


def _window_shards(num_sequences, shard_seqs, seed, window):
    """Shards of each shuffle window of epoch 0, in reading order."""
    order = epoch_order(num_sequences, shard_seqs, shuffle=True, seed=seed, epoch=0, shuffle_window_shards=window)
    step = window * shard_seqs
    return [sorted(set((order[w: w + step] // shard_seqs).tolist())) for w in range(0, num_sequences, step)]


def _fresh_cache(tmp_path, num_sequences=40, shard_seqs=8, **open_kwargs):
    path, arrays = make_synthetic_cache(tmp_path / "cache", num_sequences=num_sequences, seq_len=T, topk=K,
                                        vocab_size=V, shard_seqs=shard_seqs, chunk_seqs=4, seed=5)
    return kdlib.open_cache(path, decode_dir=tmp_path / "decoded", **open_kwargs), arrays


def _all_decoded(cache, shards) -> bool:
    return all(cache.store.is_decoded(name, s) for s in shards for name in cache.position_arrays())


@pytest.mark.parametrize("prefetch_windows", [1, 0])
def test_next_windows_shards_are_decoded_before_they_are_read(tmp_path, prefetch_windows):
    cache, _ = _fresh_cache(tmp_path, readahead=0)  # no sequential readahead: only the loader prefetches
    windows = _window_shards(40, 8, seed=3, window=1)  # 5 windows of 1 shard
    loader = kdlib.make_loader(cache, 4, seed=3, shuffle_window_shards=1, prefetch=0,
                               prefetch_windows=prefetch_windows)
    it = iter(loader)
    first = next(it)  # reads 4 sequences of window 0 only
    assert set((first["sample_indices"] // 8).tolist()) == set(windows[0])
    cache.store.wait_prefetch()
    # Every array a batch reads, for the next window's shard; nothing beyond the look-ahead.
    assert _all_decoded(cache, windows[1]) == (prefetch_windows == 1)
    assert not any(cache.store.is_decoded(name, s) for w in windows[2:] for s in w
                   for name in cache.position_arrays())
    it.close()


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_prefetch_thread_and_workers_decode_the_next_window_ahead(tmp_path, num_workers):
    cache, _ = _fresh_cache(tmp_path, num_sequences=64, readahead=0)
    windows = _window_shards(64, 8, seed=4, window=2)  # 4 windows of 2 shards
    loader = kdlib.make_loader(cache, 4, seed=4, shuffle_window_shards=2, prefetch=1, num_workers=num_workers)
    it = iter(loader)
    next(it)
    deadline = time.monotonic() + 20
    while not _all_decoded(cache, windows[1]) and time.monotonic() < deadline:
        cache.store.wait_prefetch()
        time.sleep(0.02)
    # At most 3 batches per producer (12 of window 0's 16 sequences) have been read, so window 1 was decoded
    # ahead (with 2 workers, each decodes the shards of its parity: together all of them).
    assert _all_decoded(cache, windows[1])
    it.close()


# ----------------------------------------------------------------------------------------------- options


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
@pytest.mark.parametrize("prefetch", [0, 2])
def test_pin_memory_without_cuda_warns_and_still_reads(cache_and_arrays, prefetch):
    cache, _ = cache_and_arrays
    with pytest.warns(UserWarning, match=r"pin_memory=True\) needs CUDA"):
        loader = kdlib.make_loader(cache, 4, pin_memory=True, prefetch=prefetch, drop_last=False)
    assert loader.pin_memory is False
    assert sorted(_indices(loader)) == list(range(N))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", torch.device("cuda")])
def test_unavailable_cuda_device_fails_at_construction(cache_and_arrays, device):
    cache, _ = cache_and_arrays
    with pytest.raises(ValueError, match=r"CUDA is not available in this process.*device=None"):
        kdlib.make_loader(cache, 4, device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to have a device count")
def test_cuda_index_beyond_the_visible_devices_fails_at_construction(cache_and_arrays, monkeypatch):
    cache, _ = cache_and_arrays
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"only {count} cuda device\(s\) are visible"):
        kdlib.make_loader(cache, 4, device=f"cuda:{count}")
    monkeypatch.setenv("LOCAL_RANK", str(count))  # device="cuda" means cuda:$LOCAL_RANK
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        kdlib.make_loader(cache, 4, device="cuda")
    monkeypatch.setenv("LOCAL_RANK", "0")
    batch = next(iter(kdlib.make_loader(cache, 4, device="cuda")))
    assert batch["input_ids"].device == torch.device("cuda", 0) and batch["sample_indices"].device.type == "cpu"


def test_other_unavailable_or_unknown_devices_fail_at_construction(cache_and_arrays):
    cache, _ = cache_and_arrays
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match=r"MPS is not available in this process"):
            kdlib.make_loader(cache, 4, device="mps")
    with pytest.raises(ValueError, match="is not a torch device"):
        kdlib.make_loader(cache, 4, device="gpu0")
    assert kdlib.make_loader(cache, 4, device="cpu").device == torch.device("cpu")


def test_negative_and_64_bit_seeds(cache_and_arrays):
    cache, _ = cache_and_arrays
    order = epoch_order(100, 10, shuffle=True, seed=-1, epoch=0)
    assert sorted(order.tolist()) == list(range(100))
    assert np.array_equal(order, epoch_order(100, 10, shuffle=True, seed=-1, epoch=0))
    assert not np.array_equal(order, epoch_order(100, 10, shuffle=True, seed=1, epoch=0))
    # -1 is the 64-bit two's complement 2**64 - 1: one seed space, no collisions inside it.
    assert np.array_equal(order, epoch_order(100, 10, shuffle=True, seed=2**64 - 1, epoch=0))
    loader = kdlib.make_loader(cache, 4, seed=-7, drop_last=False)
    assert sorted(_indices(loader)) == list(range(N))
    assert loader.state_dict()["seed"] == -7
    with pytest.raises(ValueError, match="64-bit seed"):
        kdlib.make_loader(cache, 4, seed=2**64)
    with pytest.raises(ValueError, match="64-bit seed"):
        epoch_order(100, 10, shuffle=True, seed=-(2**63) - 1, epoch=0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        loader.set_epoch(-1)


def test_state_identifies_the_cache(cache_and_arrays, tmp_path):
    cache, _ = cache_and_arrays
    loader = kdlib.make_loader(cache, 4, seed=2)
    next(iter(loader))
    state = json.loads(json.dumps(loader.state_dict()))  # what a JSON/torch checkpoint holds
    assert state["cache"]["num_sequences"] == N and state["cache"]["shard_seqs"] == S
    assert state["cache"]["dataset_fingerprint"] == cache.manifest["dataset_fingerprint"]
    # Same N, other sharding (so another order over the same sequences): refused, naming what differs.
    other_path, _ = make_synthetic_cache(tmp_path / "other", num_sequences=N, seq_len=T, topk=K, vocab_size=V,
                                         temperatures=(2.0,), shard_seqs=5, chunk_seqs=5, seed=3)
    other = kdlib.make_loader(kdlib.open_cache(other_path, decode_dir=tmp_path / "d"), 4)
    with pytest.raises(ValueError, match=r"saved on another cache.*shard_seqs 8 \(saved\) vs 5 \(this cache\)"):
        other.load_state_dict(state)
    assert other.cursor == 0
    # Same N and sharding, other sequences: refused by the dataset fingerprint.
    diff_path, _ = make_synthetic_cache(tmp_path / "diff", num_sequences=N, seq_len=T, topk=K, vocab_size=V,
                                        shard_seqs=S, chunk_seqs=4, seed=99)
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        kdlib.make_loader(kdlib.open_cache(diff_path, decode_dir=tmp_path / "d"), 4).load_state_dict(state)
    # The same sequences rebuilt (another build, e.g. another teacher): resumes.
    same_path, _ = make_synthetic_cache(tmp_path / "same", num_sequences=N, seq_len=T, topk=K + 1, vocab_size=V,
                                        shard_seqs=S, chunk_seqs=4, seed=3)
    same = kdlib.make_loader(kdlib.open_cache(same_path, decode_dir=tmp_path / "d"), 4)
    same.load_state_dict(state)
    assert same.cursor == 4
    # A state from before cache identities still loads (only N can be checked), with a warning.
    legacy = {k: v for k, v in state.items() if k != "cache"} | {"version": 1}
    with pytest.warns(UserWarning, match="predates cache identities"):
        same.load_state_dict(legacy)


def test_spawned_worker_cache_keeps_size_limit_and_prefetch_workers(tmp_path):
    cache, _ = _fresh_cache(tmp_path, max_decoded_bytes=1 << 20, prefetch_workers=3, readahead=2)
    reopened = pickle.loads(pickle.dumps(cache))  # what a spawned worker does with the loader's cache
    assert reopened is not cache
    assert reopened.store.max_bytes == 1 << 20 and reopened.store.prefetch_workers == 3
    assert reopened.decode_dir == cache.decode_dir and reopened.readahead == 2


# ----------------------------------------------------------------------------------------------- errors, stopping


def _corrupt(path, array, shard_index):
    spec = {s.name: s for s in fmt.layout_from_manifest(fmt.load_manifest(path)).arrays()}[array]
    shard = path / fmt.shard_relpath(array, shard_index, 1 + len(spec.trailing_shape))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("num_workers,prefetch", [(0, 0), (0, 2), (2, 2)])
def test_corrupt_shard_error_reaches_the_training_loop(tmp_path, num_workers, prefetch):
    path, _ = make_synthetic_cache(tmp_path / "cache", num_sequences=N, seq_len=T, topk=K, vocab_size=V,
                                   shard_seqs=S, chunk_seqs=4)
    _corrupt(path, "topk_logprobs", 2)  # sequences 16..23
    cache = kdlib.open_cache(path, decode_dir=tmp_path / "decoded")
    loader = kdlib.make_loader(cache, 4, shuffle=False, num_workers=num_workers, prefetch=prefetch)
    got = []
    with pytest.raises(CorruptShardError, match="shard 2") as info:
        for batch in loader:
            got.append(batch["sample_indices"].tolist())
    # Every batch before the damaged shard arrived, in order; then the reader's own exception type.
    assert got == [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert (info.value.array, info.value.shard_index) == ("topk_logprobs", 2)
    if num_workers:
        assert "loader worker" in str(info.value.__cause__)
    assert loader.cursor == 16  # a checkpoint now resumes at the failed batch


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "kdcache-loader-prefetch" and t.is_alive()]


def test_stopping_is_deterministic_and_one_producer_at_a_time(cache_and_arrays):
    cache, _ = cache_and_arrays
    before = len(_prefetch_threads())
    loader = kdlib.make_loader(cache, 2, seed=1, prefetch=2)
    for i, _batch in enumerate(loader):
        if i == 1:
            break
    assert len(_prefetch_threads()) == before  # stopped and joined when the loop was left
    first = iter(loader)
    next(first)
    # At most one thread: it starts once a loop stays away for longer than a batch takes to make (PrefetchThread).
    assert len(_prefetch_threads()) <= before + 1
    second = iter(loader)
    b = next(second)  # stops (and waits for) the first iteration's producer before starting its own
    assert len(_prefetch_threads()) <= before + 1
    with pytest.raises(RuntimeError, match="iter\\(loader\\) started another one"):
        next(first)
    assert loader.cursor == 4 * 2  # 2 + 1 + 1 batches of 2: each loop continued where the previous stopped
    assert b["sample_indices"].numel() == 2
    second.close()
    assert len(_prefetch_threads()) == before


def test_second_iteration_shuts_down_the_first_ones_workers(cache_and_arrays):
    cache, _ = cache_and_arrays
    loader = kdlib.make_loader(cache, 4, seed=1, num_workers=1)
    first = iter(loader)
    next(first)
    rest = _indices(loader)  # a new loop while the first one's worker is alive: it is shut down first
    with pytest.raises(RuntimeError, match="started another one"):
        next(first)
    assert len(rest) == (N // 4 - 1) * 4


# ----------------------------------------------------------------------------------------------- subsets, weights

SUBSET = [36, 0, 5, 6, 7, 12, 13, 20, 21, 22, 23, 29, 30, 31, 33]  # 15 of the 37 sequences, over every shard


def _selection_kwargs(kind):
    if kind == "subset":
        return {"subset": SUBSET}
    return {"weights": np.where(np.arange(N) % 4 == 0, 0.0, 1.0 + np.arange(N) % 3), "num_samples": 29}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["subset", "weighted"])
def test_selection_loaders_partition_the_epoch_exactly_once(cache_and_arrays, world_size, num_workers, kind):
    cache, _ = cache_and_arrays
    counts: list[int] = []
    kw = _selection_kwargs(kind)
    per_rank = _run_ranks(cache, world_size, num_workers, counts, seed=5, drop_last=False, **kw)
    seen = Counter(i for rank in per_rank for i in rank if i >= 0)
    loader = kdlib.make_loader(cache, 4, seed=5, **kw)
    want = Counter(loader.selection.epoch_order(S, shuffle=True, seed=5, epoch=0).tolist())
    assert seen == want and sum(want.values()) == loader.epoch_length
    if kind == "subset":
        assert sorted(seen) == sorted(SUBSET) and set(seen.values()) == {1}
    else:
        assert all(i % 4 != 0 for i in seen)  # weight 0: never drawn
    assert counts == [-(-loader.epoch_length // (4 * world_size))] * world_size  # equal steps on every rank
    assert per_rank == _run_ranks(cache, world_size, 0, seed=5, drop_last=False, prefetch=0, **kw)


@pytest.mark.parametrize("kind", ["subset", "weighted"])
@pytest.mark.parametrize("stop_after", [1, 2])
def test_selection_loaders_resume_mid_epoch_exactly(cache_and_arrays, kind, stop_after):
    cache, _ = cache_and_arrays
    kw = _selection_kwargs(kind)
    whole = kdlib.make_loader(cache, 3, seed=8, drop_last=False, **kw)
    reference = [b["sample_indices"].tolist() for b in whole]  # one uninterrupted epoch
    reference += [b["sample_indices"].tolist() for b in whole]  # and the next
    loader = kdlib.make_loader(cache, 3, seed=8, drop_last=False, num_workers=1, **kw)
    it = iter(loader)
    first = [next(it)["sample_indices"].tolist() for _ in range(stop_after)]
    it.close()
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint holds
    assert state["selection"] == loader.selection.identity() and state["cursor"] == 3 * stop_after
    resumed = kdlib.make_loader(cache, 3, drop_last=False, **kw)  # a fresh process would build this one
    resumed.load_state_dict(state)
    rest = [b["sample_indices"].tolist() for b in resumed]
    assert first + rest == reference[:len(first) + len(rest)] and len(first + rest) == len(reference) // 2
    assert resumed.epoch == 1 and [b["sample_indices"].tolist() for b in resumed] == reference[len(reference) // 2:]


def test_selection_state_is_refused_by_another_selection(cache_and_arrays):
    cache, _ = cache_and_arrays
    sub = kdlib.make_loader(cache, 4, subset=SUBSET)
    next(iter(sub))
    state = sub.state_dict()
    with pytest.raises(ValueError, match=r"another selection \(subset of 15 .*\(all sequences\)"):
        kdlib.make_loader(cache, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="another selection"):
        kdlib.make_loader(cache, 4, subset=SUBSET[:-1]).load_state_dict(state)
    full_state = kdlib.make_loader(cache, 4).state_dict()
    assert "selection" not in full_state  # a full loader's state is what it was
    with pytest.raises(ValueError, match=r"another selection \(all sequences\)"):
        kdlib.make_loader(cache, 4, **_selection_kwargs("weighted")).load_state_dict(full_state)


def test_weighted_loader_is_seed_deterministic(cache_and_arrays):
    cache, _ = cache_and_arrays
    kw = _selection_kwargs("weighted")
    a = _indices(kdlib.make_loader(cache, 4, seed=3, **kw))
    assert a == _indices(kdlib.make_loader(cache, 4, seed=3, num_workers=2, **kw))
    assert a != _indices(kdlib.make_loader(cache, 4, seed=4, **kw))
    assert len(a) == 28  # 29 draws, drop_last: 7 batches of 4
    counts = Counter(kdlib.make_loader(cache, 4, seed=3, **kw).selection.epoch_order(S, shuffle=True, seed=3,
                                                                                     epoch=0)[:28].tolist())
    assert Counter(a) == counts


def test_bad_selection_arguments_raise(cache_and_arrays):
    cache, _ = cache_and_arrays
    with pytest.raises(ValueError, match="not both"):
        kdlib.make_loader(cache, 4, subset=[1, 2], weights=np.ones(N))
    with pytest.raises(ValueError, match="num_samples= .* needs weights="):
        kdlib.make_loader(cache, 4, subset=[1, 2], num_samples=5)
    with pytest.raises(ValueError, match=r"outside \[0, 37\)"):
        kdlib.make_loader(cache, 4, subset=[1, 37])
    with pytest.raises(ValueError, match="more than once"):
        kdlib.make_loader(cache, 4, subset=[1, 2, 1, 3, 4])
    with pytest.raises(ValueError, match="negative"):
        kdlib.make_loader(cache, 4, weights=-np.ones(N))
    with pytest.raises(ValueError, match="every weight is 0"):
        kdlib.make_loader(cache, 4, weights=np.zeros(N))
    with pytest.raises(ValueError, match=r"selection has 3 sequences per epoch, fewer than one global batch"):
        kdlib.make_loader(cache, 4, subset=[1, 2, 3])
    assert len(kdlib.make_loader(cache, 4, subset=[1, 2, 3], drop_last=False)) == 1


def test_spawned_workers_get_the_selection(cache_and_arrays):
    cache, _ = cache_and_arrays
    loader = kdlib.make_loader(cache, 4, num_workers=1, multiprocessing_context="spawn", drop_last=False,
                               subset=SUBSET, seed=2)
    assert _indices(loader) == _indices(kdlib.make_loader(cache, 4, drop_last=False, subset=SUBSET, seed=2))


# --- the background thread's hand-offs (kdlib.producers.PrefetchThread) --------------------------------------
def test_prefetch_thread_hands_batches_over_in_growing_groups_in_order():
    import queue as queue_mod

    from kdlib.producers import PrefetchThread

    items = [(j, {"x": torch.full((4,), float(j))}) for j in range(100)]
    producer = PrefetchThread(iter(items), depth=2)
    seen = [(j, batch["x"][0].item()) for j, batch in producer]
    assert seen == [(j, float(j)) for j in range(100)]
    producer.close()

    # What crosses the queue: the first batch alone, then groups of at most 2, 4, 8, ... batches.
    handed: queue_mod.Queue = queue_mod.Queue()
    producer = PrefetchThread(iter(items), depth=1000, inline_first=False)
    producer._thread.join()  # the consumer never waits here, so only the group rules cut the groups
    while not producer._queue.empty():
        handed.put(producer._queue.get())
    sizes = [len(g) for g in list(handed.queue) if isinstance(g, list)]
    assert sum(sizes) == 100 and sizes[0] == 1
    assert all(size <= min(2 ** i, PrefetchThread._GROUP_MAX) for i, size in enumerate(sizes))


def test_prefetch_thread_delivers_the_batches_made_before_an_error_then_raises_it():
    from kdlib.producers import PrefetchThread

    def source():
        for j in range(5):
            yield j, {"x": torch.zeros(2)}
        raise ValueError("shard 3 is corrupt")

    producer = PrefetchThread(source(), depth=2)
    got = []
    with pytest.raises(ValueError, match="shard 3 is corrupt"):
        for j, _ in producer:
            got.append(j)
    assert got == [0, 1, 2, 3, 4]
    producer.close()


def _timed_source(n, make_s, error_at=None):
    """(j, name of the thread that made item j), each item taking ``make_s`` of busy CPU to make."""
    for j in range(n):
        if j == error_at:
            raise ValueError(f"item {j} is corrupt")
        started = time.perf_counter()
        while time.perf_counter() - started < make_s:
            pass
        yield j, threading.current_thread().name


def _made_in_thread(name):
    return name.startswith("kdcache-loader-prefetch")


def test_prefetch_thread_makes_batches_inline_while_the_consumer_comes_straight_back():
    """A loop that only reads gains nothing from the thread: after the first few batches it makes them itself
    (no hand-offs); a loop that stays away longer than a batch takes to make keeps the thread reading ahead."""
    from kdlib.producers import PrefetchThread

    quick = PrefetchThread(_timed_source(200, 0.0005), depth=2)
    names = [name for _, name in quick]
    quick.close()
    assert sum(not _made_in_thread(n) for n in names) >= 150, "".join("T" if _made_in_thread(n) else "i" for n in names)

    slow = PrefetchThread(_timed_source(60, 0.0005), depth=2)
    names = []
    for _, name in slow:
        names.append(name)
        time.sleep(0.004)  # a training step: 8x the making time
    slow.close()
    assert not slow._thread.is_alive()  # joined
    assert all(_made_in_thread(n) for n in names[5:]), "".join("T" if _made_in_thread(n) else "i" for n in names)


def test_prefetch_thread_keeps_the_order_and_raises_errors_across_mode_switches():
    """Phases of a quick loop and of a slow one switch between inline and read-ahead; every item comes once, in
    order, and an error of the source is raised at its place whichever thread met it."""
    from kdlib.producers import PrefetchThread

    for error_at in (None, 37, 150):
        producer = PrefetchThread(_timed_source(200, 0.0003, error_at=error_at), depth=3)
        seen, modes = [], set()
        try:
            for j, name in producer:
                seen.append(j)
                modes.add(_made_in_thread(name))
                if (j // 25) % 2:
                    time.sleep(0.002)
        except ValueError as exc:
            assert error_at is not None and f"item {error_at} is corrupt" in str(exc)
        else:
            assert error_at is None
        producer.close()
        assert seen == list(range(error_at if error_at is not None else 200))
        if error_at is None:
            assert modes == {True, False}  # both threads made some
