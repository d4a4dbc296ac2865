"""kdlib.order, the loader's pure arithmetic: epoch order, rank plan over ranks x workers, remainders, resume
cursor, shard look-ahead, rank/world resolution. No cache and no torch needed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kdlib.order import (EpochPlan, RankPlan, Selection, ShardLookahead, check_subset, check_weights, epoch_order,
                         resolve_rank_world, roll_epoch, seed64)

REPO = Path(__file__).resolve().parents[1]


def _rank_rows(plan: RankPlan, remaining: np.ndarray, num_workers: int) -> list[list[int]]:
    """The rank's batches as its workers make them (re-ordered by batch number, as the loader does)."""
    by_j: dict[int, list[int]] = {}
    for worker in range(max(num_workers, 1)):
        for j in plan.worker_batches(worker, max(num_workers, 1)):
            start, stop = plan.batch_range(j)
            by_j[j] = remaining[start:stop].tolist() if stop > start else [-1]  # -1: a padding row
    assert sorted(by_j) == list(range(plan.num_batches))  # every batch made by exactly one worker
    return [by_j[j] for j in range(plan.num_batches)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("num_sequences", [37, 6, 2])
def test_partition_covers_every_sequence_exactly_once(world_size, num_workers, num_sequences):
    order = epoch_order(num_sequences, 8, shuffle=True, seed=5, epoch=0)
    per_rank = [_rank_rows(RankPlan(num_sequences, 4, world_size, rank, False), order, num_workers)
                for rank in range(world_size)]
    seen = [i for rows in per_rank for batch in rows for i in batch if i >= 0]
    assert sorted(seen) == list(range(num_sequences))
    # Equal step counts on every rank (DDP's all-reduce would hang otherwise): ceil(N / (W*B)).
    assert [len(rows) for rows in per_rank] == [-(-num_sequences // (4 * world_size))] * world_size
    # The same batches whatever the number of workers.
    assert per_rank == [_rank_rows(RankPlan(num_sequences, 4, world_size, r, False), order, 0)
                        for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_drop_last_drops_exactly_the_remainder(world_size):
    n, batch = 37, 4
    order = epoch_order(n, 8, shuffle=True, seed=1, epoch=0)
    per_rank = [_rank_rows(RankPlan(n, batch, world_size, r, True), order, 2) for r in range(world_size)]
    seen = [i for rows in per_rank for b in rows for i in b]
    full = (n // (batch * world_size)) * batch * world_size
    assert len(seen) == len(set(seen)) == full == RankPlan(n, batch, world_size, 0, True).consumable
    assert set(seen) == set(order[:full].tolist())  # the dropped remainder is the order's tail
    assert all(len(b) == batch for rows in per_rank for b in rows)


@pytest.mark.parametrize("remainder,world_size", [(7, 3), (2, 4), (1, 2), (5, 4)])
def test_remainder_is_split_evenly_and_empty_ranks_get_padding(remainder, world_size):
    batch = 4
    n = 2 * batch * world_size + remainder
    plans = [RankPlan(n, batch, world_size, r, False) for r in range(world_size)]
    assert all(p.remainder == remainder and p.num_batches == 3 for p in plans)
    sizes = [p.batch_range(2)[1] - p.batch_range(2)[0] for p in plans]
    assert sum(sizes) == remainder and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first ranks take the extra samples
    assert sizes.count(0) == max(world_size - remainder, 0)  # these ranks read one padding row
    ranges = [p.batch_range(2) for p in plans]
    assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]]  # contiguous, no gaps or overlaps
    assert plans[0].consumed_after(2) == n and plans[0].consumed_after(1) == 2 * batch * world_size


def test_rank_plan_arithmetic():
    plan = RankPlan(remaining=23, batch_size=3, world_size=2, rank=1, drop_last=False)
    assert plan.num_batches == 4 and plan.batch_range(0) == (3, 6) and plan.batch_range(3) == (21, 23)
    assert plan.consumed_after(0) == 6 and plan.consumed_after(3) == 23
    assert RankPlan(23, 3, 2, 1, True).num_batches == 3
    with pytest.raises(IndexError, match="outside"):
        plan.batch_range(4)
    assert list(plan.worker_batches(1, 3)) == [1]
    with pytest.raises(ValueError, match="worker < num_workers"):
        plan.worker_batches(3, 3)


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4])
def test_resume_cursor_continues_exactly_with_other_world_and_batch_size(stop_after):
    n = 37
    order = epoch_order(n, 8, shuffle=True, seed=11, epoch=0)
    first = [RankPlan(n, 4, 2, r, False) for r in range(2)]
    seen = [i for p in first for j in range(stop_after) for i in order[slice(*p.batch_range(j))].tolist()]
    cursor = first[0].consumed_after(stop_after - 1) if stop_after else 0  # the saved state's cursor
    assert cursor == stop_after * 8  # the same on both ranks: the cursor is global
    if stop_after:
        assert first[1].consumed_after(stop_after - 1) == cursor
    # Resumed on 3 ranks x batch 3 (x 2 workers): exactly the rest of the epoch, nothing twice.
    rest = order[cursor:]
    for rank in range(3):
        rows = _rank_rows(RankPlan(n - cursor, 3, 3, rank, False), rest, 2)
        seen += [i for b in rows for i in b if i >= 0]
    assert Counter(seen) == Counter(range(n))


def test_roll_epoch():
    assert roll_epoch(0, 0, 37, 4, 2, True) == (0, 0)  # not started: stays
    assert roll_epoch(0, 32, 37, 4, 2, True) == (1, 0)  # 5 left < one global step, dropped
    assert roll_epoch(0, 32, 37, 4, 2, False) == (0, 32)  # 5 left make one more (short) step
    assert roll_epoch(2, 37, 37, 4, 2, False) == (3, 0)


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


def test_order_is_the_same_in_another_process_which_never_imports_torch():
    code = ("import json, sys; from kdlib.order import epoch_order; "
            "o = epoch_order(103, 7, shuffle=True, seed=-3, epoch=2, shuffle_window_shards=2); "
            "print(json.dumps({'order': o.tolist(), 'torch': 'torch' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"})
    result = json.loads(out.stdout)
    assert result["order"] == epoch_order(103, 7, shuffle=True, seed=-3, epoch=2, shuffle_window_shards=2).tolist()
    assert result["torch"] is False  # a pure module: the order needs no torch


def test_seeds_and_bad_arguments():
    assert seed64(-1) == 2**64 - 1 and seed64(5) == 5
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="64-bit seed"):
            seed64(bad)
    with pytest.raises(ValueError, match="seed must be an integer"):
        seed64("abc")
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        epoch_order(10, 5, shuffle=True, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="shuffle_window_shards"):
        epoch_order(10, 5, shuffle=True, seed=0, epoch=0, shuffle_window_shards=0)


def test_epoch_plan_remaining_order_starts_at_the_cursor():
    plan = EpochPlan(37, 8, True, 3, 1, 2, cursor=10, plan=RankPlan(27, 4, 1, 0, False))
    full = epoch_order(37, 8, shuffle=True, seed=3, epoch=1, shuffle_window_shards=2)
    assert np.array_equal(plan.remaining_order(), full[10:])


def test_shard_lookahead_requests_the_next_window_before_it_is_read():
    n, shard_seqs, window = 64, 8, 2
    order = epoch_order(n, shard_seqs, shuffle=True, seed=4, epoch=0, shuffle_window_shards=window)
    plan = RankPlan(n, 4, 1, 0, False)
    ahead = ShardLookahead(order, plan, shard_seqs, 0, 1, lookahead_seqs=window * shard_seqs)
    # Before batch 0 ([0, 4)) is read: the shards of the batches starting before 4 + 16, i.e. order[4:20].
    assert set(ahead.due_before(0)) == set((order[4:20] // shard_seqs).tolist())
    assert set(ahead.due_before(1)).isdisjoint(set((order[4:20] // shard_seqs).tolist()))  # each shard once
    assert ShardLookahead(order, plan, shard_seqs, 0, 1, lookahead_seqs=0).due_before(0) == []


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_shard_lookahead_splits_the_shards_over_the_workers(num_workers):
    n, shard_seqs, window, batch = 64, 8, 2, 4
    order = epoch_order(n, shard_seqs, shuffle=True, seed=4, epoch=0, shuffle_window_shards=window)
    plan = RankPlan(n, batch, 1, 0, False)
    requested: list[int] = []
    for worker in range(num_workers):
        ahead = ShardLookahead(order, plan, shard_seqs, worker, num_workers, lookahead_seqs=window * shard_seqs)
        mine = [s for j in plan.worker_batches(worker, num_workers) for s in ahead.due_before(j)]
        assert all(s % num_workers == worker for s in mine)  # worker w decodes the shards s % n == w
        requested += mine
    assert len(requested) == len(set(requested))  # one worker per shard, once
    # Every shard read after the workers' first batches was requested ahead of its read.
    assert set((order[batch * num_workers:] // shard_seqs).tolist()) <= set(requested)


def test_resolve_rank_world_from_arguments_and_environment():
    assert resolve_rank_world(1, 4, environ={}) == (1, 4)
    assert resolve_rank_world(None, None, environ={"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3)
    assert resolve_rank_world(None, None, environ={}) == (0, 1)
    with pytest.raises(ValueError, match="rank < world_size"):
        resolve_rank_world(None, None, environ={"RANK": "3", "WORLD_SIZE": "3"})
    with pytest.raises(ValueError, match="rank < world_size"):
        resolve_rank_world(0, 0, environ={})


# ----------------------------------------------------------------------------------------------- selections


def test_subset_order_is_the_full_order_restricted_to_the_subset():
    n, shard_seqs = 103, 8
    subset = np.array([90, 3, 17, 18, 55, 0, 102, 64, 33, 34, 35, 71])
    sel = Selection.subset(subset, n)
    assert sel.epoch_length == 12 and sel.values.tolist() == sorted(subset.tolist())
    for epoch in (0, 1):
        full = epoch_order(n, shard_seqs, shuffle=True, seed=9, epoch=epoch, shuffle_window_shards=2)
        got = sel.epoch_order(shard_seqs, shuffle=True, seed=9, epoch=epoch, shuffle_window_shards=2)
        assert got.tolist() == [i for i in full.tolist() if i in set(subset.tolist())]
    assert not np.array_equal(sel.epoch_order(8, shuffle=True, seed=9, epoch=0),
                              sel.epoch_order(8, shuffle=True, seed=9, epoch=1))
    assert sel.epoch_order(8, shuffle=False, seed=9, epoch=0).tolist() == sorted(subset.tolist())
    assert sel.epoch_counts(9, 0).sum() == 12 and sel.epoch_counts(9, 0)[subset].tolist() == [1] * 12


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["subset", "weighted"])
def test_selection_partition_covers_the_epoch_exactly_once(world_size, num_workers, kind):
    n = 61
    sel = (Selection.subset(np.arange(3, 61, 2), n) if kind == "subset"
           else Selection.weighted(np.linspace(0.0, 2.0, n), n, num_samples=45))
    order = sel.epoch_order(8, shuffle=True, seed=2, epoch=1)
    assert order.size == sel.epoch_length
    per_rank = [_rank_rows(RankPlan(order.size, 4, world_size, r, False), order, num_workers)
                for r in range(world_size)]
    seen = [i for rows in per_rank for batch in rows for i in batch if i >= 0]
    assert Counter(seen) == Counter(order.tolist())  # the epoch's multiset, each entry taken once
    want = Counter(np.arange(3, 61, 2).tolist()) if kind == "subset" else Counter(
        np.repeat(np.arange(n), sel.epoch_counts(2, 1)).tolist())
    assert Counter(seen) == want
    assert len({len(rows) for rows in per_rank}) == 1  # equal step counts on every rank


def test_weighted_order_is_seeded_shard_windowed_and_never_draws_zero_weights():
    n, shard_seqs, window = 200, 10, 2
    weights = np.where(np.arange(n) % 3 == 0, 0.0, 1.0 + np.arange(n) % 5)
    sel = Selection.weighted(weights, n, num_samples=150)
    a = sel.epoch_order(shard_seqs, shuffle=True, seed=4, epoch=0, shuffle_window_shards=window)
    assert np.array_equal(a, Selection.weighted(weights, n, 150).epoch_order(
        shard_seqs, shuffle=True, seed=4, epoch=0, shuffle_window_shards=window))  # a function of its arguments
    assert not np.array_equal(a, sel.epoch_order(shard_seqs, shuffle=True, seed=4, epoch=1,
                                                 shuffle_window_shards=window))
    assert not np.array_equal(a, sel.epoch_order(shard_seqs, shuffle=True, seed=5, epoch=0,
                                                 shuffle_window_shards=window))
    assert a.size == 150 and (weights[a] > 0).all()
    assert np.array_equal(np.bincount(a, minlength=n), sel.epoch_counts(4, 0))  # the order holds the draws
    # Shard-aware like the full order: the draws come in runs of `window` shards, each shard in one run only
    # (1000 draws: every shard has some, so greedy runs of `window` distinct shards are the windows).
    many = Selection.weighted(weights, n, num_samples=1000).epoch_order(shard_seqs, shuffle=True, seed=4, epoch=0,
                                                                        shuffle_window_shards=window)
    runs: list[set[int]] = [set()]
    for shard in (many // shard_seqs).tolist():
        if shard not in runs[-1] and len(runs[-1]) == window:
            runs.append(set())
        runs[-1].add(shard)
    assert len(runs) == n // shard_seqs // window and sum(len(r) for r in runs) == n // shard_seqs
    unshuffled = sel.epoch_order(shard_seqs, shuffle=False, seed=4, epoch=0)
    assert np.array_equal(unshuffled, np.sort(a))  # the same draws, ascending


def test_weighted_draws_match_the_weights_statistically():
    """Pooled over 200 epochs of 500 draws (10^5 draws), the counts of 20 sequences with weights 0..19 follow
    the multinomial of p_i = w_i / sum(w): Pearson's chi-square over the 19 drawable sequences (df = 18) is
    within 4 standard deviations of its mean (normal approximation, sd = sqrt(2 df)), and sequence 0
    (weight 0) is never drawn. Seeds are fixed, so the test is deterministic."""
    n = 20
    weights = np.arange(n, dtype=np.float64)
    sel = Selection.weighted(weights, n, num_samples=500)
    counts = sum(sel.epoch_counts(seed=123, epoch=e) for e in range(200))
    assert counts[0] == 0 and counts.sum() == 200 * 500
    expected = counts.sum() * weights[1:] / weights.sum()
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    df = n - 2
    assert abs(chi2 - df) < 4 * np.sqrt(2 * df), chi2
    # Each epoch's draws are independent of the others': epochs 0 and 1 differ.
    assert not np.array_equal(sel.epoch_counts(123, 0), sel.epoch_counts(123, 1))


def test_epoch_plan_remaining_order_of_a_selection_starts_at_the_cursor():
    sel = Selection.subset(np.arange(0, 37, 3), 37)
    plan = EpochPlan(37, 8, True, 3, 1, 2, cursor=5, plan=RankPlan(sel.epoch_length - 5, 4, 1, 0, False),
                     selection=sel)
    assert np.array_equal(plan.remaining_order(), sel.epoch_order(8, shuffle=True, seed=3, epoch=1,
                                                                  shuffle_window_shards=2)[5:])


def test_selection_identity_names_kind_length_and_content():
    a = Selection.subset([1, 2, 3], 10).identity()
    assert a["kind"] == "subset" and a["epoch_length"] == 3
    assert a == Selection.subset([3, 2, 1], 10).identity()  # the same set
    assert a != Selection.subset([1, 2, 4], 10).identity()
    w = Selection.weighted(np.ones(10), 10, 7).identity()
    assert w["kind"] == "weighted" and w["epoch_length"] == 7 and w != Selection.weighted(np.ones(10), 10).identity()


@pytest.mark.parametrize("bad,match", [
    ([], "non-empty 1-D"), ([[1, 2]], "non-empty 1-D"), ([0.5, 1.0], "integer sequence indices"),
    ([True, False], "booleans"), ([3, 10, -1], r"2 index\(es\) outside \[0, 10\).*\[10, -1\]"),
    ([4, 2, 4, 7, 2], r"2 index\(es\) given more than once.*\[2, 4\]"),
])
def test_bad_subsets_say_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        check_subset(bad, 10)


@pytest.mark.parametrize("bad,match", [
    (np.ones(9), r"shape \(10,\)"), (np.array([1.0] * 9 + [np.nan]), r"NaN/inf.*\[9\]"),
    (np.array([1.0] * 9 + [np.inf]), "NaN/inf"), (np.array([1.0, -0.5] + [1.0] * 8), r"negative.*\[1\]"),
    (np.zeros(10), "every weight is 0"), (np.array(["a"] * 10), "must be numbers"),
])
def test_bad_weights_say_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        check_weights(bad, 10)


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True])
def test_bad_num_samples(num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        Selection.weighted(np.ones(10), 10, num_samples)
