"""Sampled KD (kdlib/losses/sampled.py): fused vs reference, gradcheck, odd shapes, errors, and unbiasedness.

The statistical tests draw 2,000 independent sets of 16 teacher samples (one set per row, seeded) and compare
the mean per-row gradient (and value) with the exact full-distribution one: |z| < 4 per coordinate, with
z = (mean − exact) / (std / √2000).
"""

from __future__ import annotations

import math

import pytest
import torch

from kdlib.losses.sampled import sampled_kd_loss, sampled_kd_loss_reference
from tests.unbiased import assert_unbiased, exact_forward_kl, z_scores

N_TRIALS = 2000
N_DRAWS = 16


def draw_targets(teacher_logits, sample_temperature, n_draws, generator, n_slots=None):
    """Compact sampled targets from i.i.d. draws of softmax(teacher_logits / τs): unique ids, count-0 padding.

    Returns ids [N, S], counts [N, S], exact log p_T(ids) at τ = 1 [N, S], teacher lse [N].
    """
    n, vocab = teacher_logits.shape
    probs = torch.softmax(teacher_logits.double() / sample_temperature, dim=-1)
    draws = torch.multinomial(probs, n_draws, replacement=True, generator=generator)  # [N, D]
    dense_counts = torch.zeros(n, vocab, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    n_slots = n_slots or int((dense_counts > 0).sum(1).max())
    counts, ids = dense_counts.topk(n_slots, dim=1)  # the drawn ids first, then count-0 padding
    ids = torch.where(counts > 0, ids, torch.zeros_like(ids))
    logprobs = torch.log_softmax(teacher_logits.double(), dim=-1).gather(1, ids)
    return ids, counts, logprobs, torch.logsumexp(teacher_logits.double(), dim=-1)


def make_case(n, vocab, n_draws=8, tau=1.0, ts=1.0, dtype=torch.float64, seed=0, n_slots=None, ignore_some=True):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2.0
    teacher[:, 0] += 4.0  # a peaked teacher with an outlier
    ids, counts, logprobs, lse = draw_targets(teacher, ts, n_draws, gen, n_slots)
    logits = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 1.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_some:
        labels[::3] = -100
    kwargs = dict(labels=labels, sample_logprobs=logprobs, teacher_lse=lse, sample_temperature=ts, temperature=tau,
                  teacher_lse_at_temperature=torch.logsumexp(teacher / tau, dim=-1),
                  teacher_lse_sample_temperature=torch.logsumexp(teacher / ts, dim=-1))
    return logits, ids, counts, kwargs


def value_and_grad(fn, logits, ids, counts, grad_output=None, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    out = fn(leaf, ids, counts, **kwargs)
    out.backward(grad_output if grad_output is not None else torch.ones_like(out))
    return out.detach(), leaf.grad


def assert_fused_matches(logits, ids, counts, rtol, atol, grad_output=None, **kwargs):
    v_ref, g_ref = value_and_grad(sampled_kd_loss_reference, logits, ids, counts, grad_output, **kwargs)
    v_fused, g_fused = value_and_grad(sampled_kd_loss, logits, ids, counts, grad_output, **kwargs)
    torch.testing.assert_close(v_fused, v_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_fused, g_ref, rtol=rtol, atol=atol)
    return v_ref, g_ref


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("tau,ts", [(1.0, 1.0), (2.0, 2.0), (0.5, 0.5), (2.0, 1.0), (1.0, 1.5)])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_fused_matches_reference(dtype, tol, tau, ts, ce_weight):
    logits, ids, counts, kwargs = make_case(23, 37, tau=tau, ts=ts, dtype=dtype)
    assert_fused_matches(logits, ids, counts, tol, tol, ce_weight=ce_weight, **kwargs)


@pytest.mark.parametrize("with_logprobs", [True, False])
def test_fused_matches_reference_tau_squared_off_and_sum(with_logprobs):
    logits, ids, counts, kwargs = make_case(11, 19, tau=2.0, ts=2.0)
    if not with_logprobs:
        kwargs = {k: kwargs[k] for k in ("labels", "temperature", "sample_temperature")}
    for reduction in ("sum", "mean", "none"):
        assert_fused_matches(logits, ids, counts, 1e-10, 1e-10, tau_squared=False, kd_weight=0.7, ce_weight=0.3,
                             reduction=reduction, **kwargs)


@pytest.mark.parametrize("tau,ts", [(0.5, 0.5), (1.0, 1.0), (2.0, 1.0), (1.0, 2.0)])
def test_gradcheck_float64(tau, ts):
    logits, ids, counts, kwargs = make_case(5, 9, tau=tau, ts=ts)
    assert torch.autograd.gradcheck(
        lambda z: sampled_kd_loss(z, ids, counts, ce_weight=0.4, reduction="none", **kwargs), (logits,))


@pytest.mark.parametrize("n_slots", [1, 1200])
def test_odd_shapes(n_slots):
    # V = 1271 (not a power of two), N = 41, S = 1 (one slot per row) and S = V-ish (mostly padding)
    logits, ids, counts, kwargs = make_case(41, 1271, n_draws=1 if n_slots == 1 else 3000, tau=2.0, ts=1.0,
                                            dtype=torch.float32, n_slots=n_slots)
    assert ids.shape == (41, n_slots)
    assert_fused_matches(logits, ids, counts, 2e-5, 2e-5, ce_weight=0.5, **kwargs)


def test_all_rows_ignored():
    logits, ids, counts, kwargs = make_case(7, 13, tau=2.0, ts=1.0)
    kwargs["labels"] = torch.full((7,), -100)
    counts = torch.zeros_like(counts)  # ignored rows may have no draws at all
    for fn in (sampled_kd_loss, sampled_kd_loss_reference):
        value, grad = value_and_grad(fn, logits, ids, counts, ce_weight=0.5, **kwargs)
        assert value.item() == 0.0
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_grad_output_not_one_and_3d():
    logits, ids, counts, kwargs = make_case(12, 17, tau=2.0, ts=1.5)
    shaped = {k: (v.reshape(3, 4, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    z3 = logits.detach().reshape(3, 4, 17)
    grad_output = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    value, _ = assert_fused_matches(z3, ids.reshape(3, 4, -1), counts.reshape(3, 4, -1), 1e-10, 1e-10,
                                    grad_output=grad_output, ce_weight=0.5, reduction="none", **shaped)
    assert value.shape == (3, 4)
    assert_fused_matches(z3, ids.reshape(3, 4, -1), counts.reshape(3, 4, -1), 1e-10, 1e-10,
                         grad_output=torch.tensor(2.5, dtype=torch.float64), ce_weight=0.5, **shaped)


@pytest.mark.parametrize("id_dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cache_dtypes(id_dtype, value_dtype):
    logits, ids, counts, kwargs = make_case(9, 29, tau=2.0, ts=1.0)
    expected, g_expected = value_and_grad(sampled_kd_loss, logits, ids, counts, **kwargs)
    cast = dict(kwargs)
    for key in ("sample_logprobs", "teacher_lse", "teacher_lse_at_temperature", "teacher_lse_sample_temperature"):
        cast[key] = kwargs[key].to(value_dtype)
    value, grad = value_and_grad(sampled_kd_loss, logits, ids.to(id_dtype), counts.to(torch.int32), **cast)
    torch.testing.assert_close(value, expected, rtol=0.05, atol=0.05)
    torch.testing.assert_close(grad, g_expected, rtol=0.05, atol=0.02)
    # the id dtype alone changes nothing
    v_ids, g_ids = value_and_grad(sampled_kd_loss, logits, ids.to(id_dtype), counts.to(torch.int16), **kwargs)
    assert torch.equal(v_ids, expected) and torch.equal(g_ids, g_expected)


@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(logits_dtype):
    logits, ids, counts, kwargs = make_case(13, 31, tau=2.0, ts=1.0, dtype=logits_dtype)
    v_ref, g_ref = value_and_grad(sampled_kd_loss_reference, logits, ids, counts, ce_weight=0.5, **kwargs)
    v_fused, g_fused = value_and_grad(sampled_kd_loss, logits, ids, counts, ce_weight=0.5, **kwargs)
    assert g_fused.dtype == logits_dtype and v_fused.dtype == torch.float32
    torch.testing.assert_close(v_fused, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused.float(), g_ref.float(), rtol=1e-2, atol=1e-3)


def test_duplicate_ids_and_layout_do_not_matter():
    # the same draws stored compactly, as one slot per vocabulary id, and split over duplicate slots
    logits, ids, counts, kwargs = make_case(6, 10, n_draws=12, tau=1.0, ts=1.0, ignore_some=False)
    dense_counts = torch.zeros(6, 10, dtype=torch.int64).scatter_add_(1, ids, counts)
    dense_ids = torch.arange(10).expand(6, 10)
    half = counts // 2
    split_ids, split_counts = torch.cat([ids, ids], 1), torch.cat([half, counts - half], 1)
    layouts = [(ids, counts), (dense_ids, dense_counts), (split_ids, split_counts)]
    results = [value_and_grad(fn, logits, i, c, labels=kwargs["labels"], ce_weight=0.5)
               for i, c in layouts for fn in (sampled_kd_loss, sampled_kd_loss_reference)]
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-12)


def test_padding_ids_out_of_range_are_ignored():
    logits, ids, counts, kwargs = make_case(5, 10, n_slots=10, ignore_some=False)
    padded = torch.where(counts > 0, ids, torch.full_like(ids, -1))
    assert (padded == -1).any()
    for fn in (sampled_kd_loss, sampled_kd_loss_reference):
        a = value_and_grad(fn, logits, ids, counts, **kwargs)
        b = value_and_grad(fn, logits, padded, counts, **kwargs)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _error_cases():
    logits, ids, counts, kw = make_case(4, 8, tau=1.0, ts=1.0, ignore_some=False)
    zero_row = counts.clone()
    zero_row[1] = 0
    ignored = dict(kw, labels=torch.tensor([0, -100, 1, 2]))
    return logits, ids, counts, kw, [
        ("reverse_kl", dict(kw, divergence="reverse_kl"), ids, counts, "no unbiased estimator"),
        ("jsd", dict(kw, divergence="jsd"), ids, counts, "divergence='forward_kl'"),
        ("tvd", dict(kw, divergence="tvd"), ids, counts, "no unbiased estimator"),
        ("unknown", dict(kw, divergence="kl"), ids, counts, "unknown divergence"),
        ("shape", kw, ids[:3], counts[:3], "sample_ids must be"),
        ("counts shape", kw, ids, counts[:, :1], "sample_counts must have the shape"),
        ("float counts", kw, ids, counts.double(), "integer tensor"),
        ("negative", kw, ids, counts - 10, ">= 0"),
        ("id >= V", kw, ids + 8, counts, "[0, V=8)"),
        ("zero row", kw, ids, zero_row, "summing to 0"),
        ("zero row, CE", dict(ignored, labels=torch.tensor([0, 1, 1, 2])), ids, zero_row, "summing to 0"),
        ("ce without labels", dict(kw, labels=None, ce_weight=0.5), ids, counts, "needs labels"),
        ("IS without logprobs", dict(kw, sample_logprobs=None, sample_temperature=2.0), ids, counts,
         "importance weights"),
        ("missing lse", dict(kw, temperature=2.0, teacher_lse=None), ids, counts, "teacher_lse is required"),
        ("missing lse at tau", dict(kw, temperature=2.0, teacher_lse_at_temperature=None), ids, counts,
         "teacher_lse_at_temperature is required"),
        ("missing lse at ts", dict(kw, sample_temperature=3.0, teacher_lse_sample_temperature=None), ids, counts,
         "teacher_lse_sample_temperature is required"),
        ("lse shape", dict(kw, teacher_lse=kw["teacher_lse"][:2]), ids, counts, "teacher_lse must have shape"),
        ("label range", dict(kw, labels=torch.tensor([0, 9, 1, 2])), ids, counts, "labels contain values outside [0, V=8)"),
        ("temperature", dict(kw, temperature=0.0), ids, counts, "temperature must be a finite number > 0"),
        ("reduction", dict(kw, reduction="max"), ids, counts, "unknown reduction"),
    ]


@pytest.mark.parametrize("fn", [sampled_kd_loss, sampled_kd_loss_reference])
def test_errors(fn):
    logits, ids, counts, kw, cases = _error_cases()
    for name, kwargs, bad_ids, bad_counts, message in cases:
        with pytest.raises(ValueError, match=None) as info:
            fn(logits, bad_ids, bad_counts, **kwargs)
        assert message in str(info.value), (name, str(info.value))
    zero_row = counts.clone()
    zero_row[1] = 0
    fn(logits, ids, zero_row, **dict(kw, labels=torch.tensor([0, -100, 1, 2])))  # ignored: fine


# --- unbiasedness ------------------------------------------------------------------------------------------


def _statistical_case(tau, ts, seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = 12
    teacher = torch.randn(1, vocab, generator=gen, dtype=torch.float64) * 1.5
    student = torch.randn(1, vocab, generator=gen, dtype=torch.float64)
    teacher_rows = teacher.expand(N_TRIALS, vocab)
    ids, counts, logprobs, lse = draw_targets(teacher_rows, ts, N_DRAWS, gen)
    kwargs = dict(sample_logprobs=logprobs, teacher_lse=lse, sample_temperature=ts, temperature=tau,
                  teacher_lse_at_temperature=torch.logsumexp(teacher_rows / tau, dim=-1),
                  teacher_lse_sample_temperature=torch.logsumexp(teacher_rows / ts, dim=-1),
                  tau_squared=False, reduction="none")
    return teacher, student, ids, counts, kwargs


@pytest.mark.parametrize("tau,ts", [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0), (1.0, 2.0), (1.0, 0.7)])
def test_sampled_gradient_and_value_are_unbiased(tau, ts):
    teacher, student, ids, counts, kwargs = _statistical_case(tau, ts, seed=int(10 * tau + 100 * ts))
    z = student.expand(N_TRIALS, -1).clone().requires_grad_()
    rows = sampled_kd_loss(z, ids, counts, **kwargs)  # [N_TRIALS], one independent estimate per row
    rows.sum().backward()
    assert_unbiased(z, rows, teacher, student, tau)
    # the reference agrees with the fused loss on every trial
    ref = sampled_kd_loss_reference(student.expand(N_TRIALS, -1), ids, counts, **kwargs)
    torch.testing.assert_close(rows.detach(), ref, rtol=1e-10, atol=1e-10)


def test_statistical_test_detects_a_biased_estimator():
    # self-normalizing the counts of draws at τs = 1 while the loss is at τ = 2 (no importance weights) is
    # biased; the same z-test must reject it, so the unbiasedness tests above have power
    teacher, student, ids, counts, kwargs = _statistical_case(2.0, 1.0, seed=7)
    kwargs = dict(temperature=2.0, sample_temperature=2.0, tau_squared=False, reduction="none")
    z = student.expand(N_TRIALS, -1).clone().requires_grad_()
    sampled_kd_loss(z, ids, counts, **kwargs).sum().backward()
    exact_grad, _ = exact_forward_kl(teacher, student, 2.0)
    assert z_scores(z.grad, exact_grad).abs().max() > 4


def test_golden_importance_weighted_value_by_hand():
    # one row, V = 3, loss at τ = 2 from 4 draws at τs = 1: ids (0, 2) with counts (3, 1), computed with math only
    teacher, student, tau = [1.0, -0.5, 0.3], [0.2, 0.9, -1.1], 2.0

    def log_softmax(x, t):
        lse = math.log(sum(math.exp(v / t) for v in x))
        return [v / t - lse for v in x]

    log_p1, log_p2, log_q2 = log_softmax(teacher, 1.0), log_softmax(teacher, tau), log_softmax(student, tau)
    a = {0: 0.75 * math.exp(log_p2[0] - log_p1[0]), 2: 0.25 * math.exp(log_p2[2] - log_p1[2])}
    expected_kl = sum(w * (log_p2[i] - log_q2[i]) for i, w in a.items())
    expected_grad = [(sum(a.values()) * math.exp(log_q2[k]) - a.get(k, 0.0)) / tau * tau * tau for k in range(3)]
    t = torch.tensor([teacher], dtype=torch.float64)
    kwargs = dict(sample_logprobs=torch.tensor([[log_p1[0], log_p1[2]]], dtype=torch.float64),
                  teacher_lse=torch.logsumexp(t, -1), teacher_lse_at_temperature=torch.logsumexp(t / tau, -1),
                  sample_temperature=1.0, temperature=tau)
    ids, counts = torch.tensor([[0, 2]]), torch.tensor([[3, 1]])
    for fn in (sampled_kd_loss, sampled_kd_loss_reference):
        value, grad = value_and_grad(fn, torch.tensor([student], dtype=torch.float64), ids, counts, **kwargs)
        assert value.item() == pytest.approx(tau * tau * expected_kl, rel=1e-12)
        assert grad[0].tolist() == pytest.approx(expected_grad, rel=1e-12)


def test_exported_from_kdlib_losses():
    import kdlib.losses

    assert kdlib.losses.sampled_kd_loss is sampled_kd_loss
    assert kdlib.losses.sampled_kd_loss_reference is sampled_kd_loss_reference
