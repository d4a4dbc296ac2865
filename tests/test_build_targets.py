"""`compute_targets` (the math of `kdcache build`) against the naive float64 torch computation, on every path:
grouped top-k (CPU, large V) and plain top-k (small V, K = V), several row chunks with a ragged last one,
bf16/fp16 logits, peaked rows with outliers and ties, and NaN/inf positions flagged exactly where they are."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cache_server import format as fmt
from cache_server.build.targets import _chunk_plan, _grouped_topk, _topk_group_size, compute_targets, workspace_numel
from tests.teachers import reference_targets

TEMPS = (0.5, 3.0)


def _logits(B: int, T: int, V: int, seed: int, scale: float = 4.0) -> torch.Tensor:
    """Peaked rows (large scale) with a few outliers, some of them in the last (tail) ids."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * scale  # [B, T, V]
    rows = z.view(-1, V)
    rows[0, -3:] += 8 * scale  # the maximum in the ids past the last whole group
    rows[1, :5] += 8 * scale
    if rows.shape[0] > 3:
        rows[2, torch.arange(7, V, V // 8)[:8]] += 6 * scale  # spread over several groups
        rows[3, :] = rows[3, :] / 100  # a flat row: many near-ties
    return z


def _check(out: dict, logits: torch.Tensor, ids: torch.Tensor, topk: int, temps=()) -> None:
    ref = reference_targets(logits.double(), ids, topk, temps)
    lp = out["topk_logprobs"].numpy()
    np.testing.assert_allclose(lp, ref["topk_logprobs"], rtol=2e-5, atol=2e-5)
    assert (np.diff(lp, axis=-1) <= 0).all()
    got_ids = out["topk_ids"].numpy()
    assert out["topk_ids"].dtype == torch.int64
    assert (np.diff(np.sort(got_ids, axis=-1), axis=-1) != 0).all(), "top-k ids must be distinct"
    np.testing.assert_allclose(lp, np.take_along_axis(ref["logprobs"], got_ids, -1), rtol=2e-5, atol=2e-5)
    V = logits.shape[-1]
    if topk < V:
        srt = -np.sort(-ref["logprobs"], axis=-1)[..., : topk + 1]
        clear = (-np.diff(srt, axis=-1) > 1e-4).all(-1)
    else:
        clear = (-np.diff(ref["topk_logprobs"], axis=-1) > 1e-4).all(-1)
    np.testing.assert_array_equal(got_ids[clear], ref["topk_ids"][clear])
    for name in ["lse", "seq_nll", "seq_entropy", *(fmt.temperature_key(t) for t in temps)]:
        np.testing.assert_allclose(out[name].numpy(), ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert out["finite"].all()


@pytest.mark.parametrize(
    "B,T,V,topk,chunk_rows",
    [
        (3, 7, 5003, 5, None),  # grouped top-k, one chunk
        (3, 7, 5003, 5, 4),  # grouped top-k, 6 chunks, the last one ragged
        (2, 5, 4099, 1, 3),  # K = 1, grouped
        (2, 9, 8192, 16, 5),  # V a multiple of the group count: no tail
        (2, 6, 300, 7, 4),  # small V: plain torch.topk
        (2, 6, 50, 50, 5),  # K = V
    ],
)
def test_matches_float64_reference(B, T, V, topk, chunk_rows):
    logits = _logits(B, T, V, seed=V + topk)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    out = compute_targets(logits, ids, topk, TEMPS, chunk_rows=chunk_rows)
    assert torch.equal(logits, before), "compute_targets must not modify the logits"
    _check(out, logits, ids, topk, TEMPS)
    assert out["topk_ids"].shape == (B, T, topk) and out["lse"].shape == (B, T) and out["seq_nll"].shape == (B,)


def test_worker_threads_and_inline_path_agree():
    """CPU chunks run on torch.get_num_threads() single-threaded workers; one thread runs them inline."""
    B, T, V = 3, 11, 5003
    logits = _logits(B, T, V, seed=9)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _chunk_plan(logits, 4) == (4, 2)
        pooled = compute_targets(logits, ids, 6, TEMPS, chunk_rows=4)
        assert torch.get_num_threads() == 2, "the workers must not change the caller's thread count"
        seen: list[int] = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [2], "nor the count torch gives threads started afterwards"
        torch.set_num_threads(1)
        assert _chunk_plan(logits, 4) == (4, 1)
        inline = compute_targets(logits, ids, 6, TEMPS, chunk_rows=4)
    finally:
        torch.set_num_threads(threads)
    for k, v in pooled.items():
        assert torch.equal(v, inline[k]), k  # each chunk is computed single-threaded either way
    _check(pooled, logits, ids, 6, TEMPS)


def test_worker_errors_reach_the_caller():
    logits = _logits(2, 6, 5003, seed=10)
    assert _chunk_plan(logits, 3)[1] == min(2, torch.get_num_threads())
    with pytest.raises(RuntimeError, match="k"):  # K > V fails inside the workers' torch.topk
        compute_targets(logits, torch.zeros(2, 6, dtype=torch.int64), 5004, chunk_rows=3)
    out = compute_targets(logits, torch.zeros(2, 6, dtype=torch.int64), 4, chunk_rows=3)  # the pool still works
    assert out["finite"].all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_match_their_upcast(dtype):
    B, T, V = 2, 9, 6007
    logits = (_logits(B, T, V, seed=3, scale=3.0)).to(dtype)  # bf16 rounding makes many exact ties
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    out = compute_targets(logits, ids, 8, (2.0,), chunk_rows=7)
    _check(out, logits.float(), ids, 8, (2.0,))


def test_workspace_reuse_and_no_aliasing():
    B, T, V = 2, 8, 5003
    a, b = _logits(B, T, V, seed=4), _logits(B, T, V, seed=5)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    fresh = compute_targets(a, ids, 6, TEMPS, chunk_rows=5)
    assert workspace_numel(a, 5) % (2 * 5 * V) == 0 and 2 * workspace_numel(a.bfloat16(), 5) == 3 * workspace_numel(a, 5)
    # a right-sized one, a [B, T, V] one, one too small and a bf16 one (both replaced by a fresh fp32 buffer)
    workspaces = (torch.empty(workspace_numel(a, 5)), torch.empty(B, T, V), torch.empty(7), torch.empty(B, T, V).bfloat16())
    for workspace in workspaces:
        out_a = compute_targets(a, ids, 6, TEMPS, workspace, chunk_rows=5)
        kept = {k: v.clone() for k, v in out_a.items()}
        compute_targets(b, ids, 6, TEMPS, workspace, chunk_rows=5)  # reuses the same scratch
        for k, v in out_a.items():
            assert torch.equal(v, kept[k]), f"{k} aliases the workspace"
            assert torch.equal(v, fresh[k]), f"{k} depends on the workspace"


def test_non_finite_positions_are_flagged_exactly():
    B, T, V = 2, 6, 5003
    logits = _logits(B, T, V, seed=6)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    bad = {(0, 1): float("nan"), (0, 4): float("inf"), (1, 0): float("-inf"), (1, 5): float("nan")}
    cols = {(0, 1): 17, (0, 4): V - 1, (1, 0): 2, (1, 5): V - 2}  # in a group and in the tail
    for (b, t), value in bad.items():
        logits[b, t, cols[b, t]] = value
    logits[1, 3] = float("nan")  # a whole row
    for chunk_rows in (None, 4):
        out = compute_targets(logits, ids, 5, TEMPS, chunk_rows=chunk_rows)
        expected = torch.ones(B, T, dtype=torch.bool)
        for b, t in [*bad, (1, 3)]:
            expected[b, t] = False
        assert torch.equal(out["finite"], expected)
        good = expected.view(-1)
        assert (out["topk_ids"].view(-1, 5)[good] < V).all()
        ref = reference_targets(torch.where(expected[..., None], logits, 0.0).double(), ids, 5)
        ok = expected.numpy()
        np.testing.assert_allclose(out["lse"].numpy()[ok], ref["lse"][ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("V,k", [(5003, 1), (5003, 8), (9000, 31), (50_257, 32), (70_001, 64)])
def test_grouped_topk_equals_torch_topk(V, k):
    S = _topk_group_size(V, k)
    assert S >= 8
    g = torch.Generator().manual_seed(V + k)
    z = torch.randn(6, V, generator=g)  # continuous values: no ties, so ids must match exactly
    G = V // S
    z[0, G * S :] += 10  # every maximum in the tail
    z[1, 3 * S : 3 * S + min(k, S)] += 10  # the top-k packed into one group (group 3)
    z[2, torch.arange(k) * S + 1] += 10  # top-k in k different groups
    z[3] = -z[3].abs()  # all negative
    values, ids = _grouped_topk(z, k, S)
    ref_values, ref_ids = torch.topk(z, k, dim=-1)
    assert torch.equal(values, ref_values)
    assert torch.equal(ids, ref_ids)


def test_grouped_topk_with_ties_returns_tied_ids_carrying_the_values():
    V, k = 5003, 10
    S = _topk_group_size(V, k)
    z = torch.randint(-4, 3, (5, V)).float()  # massive ties at the top value
    values, ids = _grouped_topk(z, k, S)
    assert torch.equal(values, torch.topk(z, k, dim=-1).values)
    assert torch.equal(z.gather(1, ids), values)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()


def test_plain_topk_is_used_where_grouping_does_not_pay():
    assert _topk_group_size(300, 7) == 0  # small vocabulary
    assert _topk_group_size(50, 50) == 0  # K = V
    assert _topk_group_size(50_257, 1024) == 0  # K large next to V
    assert _topk_group_size(50_257, 32) > 0
