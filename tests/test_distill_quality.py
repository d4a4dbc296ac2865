"""benchmarks/distill_quality.py's pieces: the online full-vocabulary loss, equal-wall-clock interpolation,
the per-mode summary and the goals."""

from __future__ import annotations

import pytest
import torch

from kdlib.losses import kd_loss_reference
from benchmarks.distill_quality import at_wall_time, goals, online_kd_loss, summarize


def test_online_loss_is_kd_loss_with_every_teacher_id():
    """Full-vocabulary forward KL + CE equals the sparse loss given all V ids (then the sparse loss is exact)."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 5, 37
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    got = online_kd_loss(z, teacher, labels, ce_weight=0.3, kd_weight=0.7)
    ids = torch.arange(V).expand(B, T, V)
    want = kd_loss_reference(z, ids, torch.log_softmax(teacher, -1), labels=labels, ce_weight=0.3,
                              kd_weight=0.7)
    torch.testing.assert_close(got, want)
    # and by hand: mean over the 7 valid positions of CE and KL(q || p)
    valid = labels != -100
    log_p, log_q = torch.log_softmax(z, -1)[valid], torch.log_softmax(teacher, -1)[valid]
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    ce = -log_p.gather(-1, labels[valid][:, None]).mean()
    torch.testing.assert_close(got, 0.3 * ce + 0.7 * kl)


def test_at_wall_time_interpolates_and_says_when_the_run_ended_before():
    curve = [(0, 0.0, 8.0), (10, 2.0, 6.0), (20, 4.0, 5.0)]
    assert at_wall_time(curve, 1.0) == (pytest.approx(7.0), True)
    assert at_wall_time(curve, 3.0) == (pytest.approx(5.5), True)
    assert at_wall_time(curve, 4.0) == (5.0, True)
    assert at_wall_time(curve, 9.0) == (5.0, False)  # a faster mode's last value, flagged


def _runs(ce_final: float, kd_final: float, kd_step_s: float) -> dict:
    return {
        "ce": {"curve": [(0, 0.0, 8.0), (10, 1.0, ce_final)], "step_s": [0.1] * 10},
        "topk_bucket": {"curve": [(0, 0.0, 8.0), (10, 10 * kd_step_s, kd_final)], "step_s": [kd_step_s] * 10},
    }


def test_summary_at_equal_steps_and_equal_wall_clock_and_the_goals():
    runs = {0: _runs(5.0, 4.8, 0.2), 1: _runs(5.2, 4.9, 0.2)}  # KD twice as slow per step
    table = summarize(runs, ["ce", "topk_bucket"])
    top = table["topk_bucket"]
    assert top["heldout_equal_steps"]["mean"] == pytest.approx(4.85)
    assert top["gain_vs_ce_equal_steps_per_seed"] == [0.2, 0.3]
    # at CE's wall time (1 s) the KD run is half way: 8 + (4.8 - 8) / 2 = 6.4 and 8 + (4.9 - 8) / 2 = 6.45
    assert top["heldout_equal_wall_clock"]["mean"] == pytest.approx(6.425)
    assert top["step_time_over_ce"]["mean"] == pytest.approx(2.0)
    got = goals(table)
    assert got["topk_bucket_beats_ce_by_0.1_every_seed_equal_steps"] is True
    assert got["topk_bucket_ahead_of_ce_every_seed_equal_wall_clock"] is False
    assert got["best_cached_mode"] == "topk_bucket" and got["best_cached_step_time_over_ce_le_1.02"] is False
    assert got["topk_bucket_within_1pct_of_online"] is None  # no online run
