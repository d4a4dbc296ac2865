"""Sample and hybrid targets through every loss entry point (kdlib/losses/targets.py, weighted.py, api.py).

Hybrid targets: an exact top-H head plus D draws from the teacher at τs restricted to the rest of the
vocabulary. Fused vs the naive reference (values, gradients, float64 gradcheck, odd shapes, all rows ignored,
duplicate ids, reductions, grad_output ≠ 1), a golden value computed with the math module only, the one-call
API (kd_loss / kd_loss_reference / KDLoss / kd_loss_from_batch / distill_loss / kd_step_loss pick the kind),
its errors, and the statistical test:

    for (τ, τs) ∈ {(1, 1), (2, 2), (2, 1), (1, 2), (1, 0.7)}: one teacher row at V = 12 with a head of H = 3,
    2,000 independent rows of 16 draws from the rest at τs (seeded); the mean per-row gradient and value must
    match the exact full-distribution ones, (softmax(z/τ) − p_T^τ)/τ and KL(p_T^τ ‖ q^τ), within |z| < 4 per
    coordinate, z = (mean − exact) / (std / √2000); a biased control (τs misstated) is rejected (|z| > 4).
"""

from __future__ import annotations

import math

import pytest
import torch

import kdlib
from kdlib.losses import kd_loss, kd_loss_from_batch, kd_loss_reference, sampled_kd_loss
from tests.unbiased import assert_unbiased, exact_forward_kl, z_scores

N_TRIALS = 2000
N_DRAWS = 16


def draw_hybrid(teacher, head, sample_temperature, n_draws, generator, n_slots=None):
    """Exact top-``head`` ids/log-probs and draws of softmax(teacher / τs) restricted to the rest, compacted to
    unique ids by count with count-0 padding (id 0). Returns head_ids, head_logprobs, ids, counts, logprobs."""
    n, vocab = teacher.shape
    log_p1 = torch.log_softmax(teacher.double(), -1)
    head_logprobs, head_ids = log_p1.topk(head, dim=-1)
    rest = (teacher.double() / sample_temperature).scatter(1, head_ids, -math.inf)
    draws = torch.multinomial(torch.softmax(rest, -1), n_draws, replacement=True, generator=generator)
    dense_counts = torch.zeros(n, vocab, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    n_slots = n_slots or int((dense_counts > 0).sum(1).max())
    counts, ids = dense_counts.topk(n_slots, dim=1)
    ids = torch.where(counts > 0, ids, torch.zeros_like(ids))
    return head_ids, head_logprobs, ids, counts, log_p1.gather(1, ids)


def make_hybrid(n, vocab, head=3, n_draws=8, tau=1.0, ts=1.0, dtype=torch.float64, seed=0, n_slots=None,
                ignore_some=True):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2.0
    teacher[:, 0] += 4.0  # id 0 in the head: the padding id 0 of the sample slots duplicates a head id
    head_ids, head_lp, ids, counts, logprobs = draw_hybrid(teacher, head, ts, n_draws, gen, n_slots)
    logits = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_some:
        labels[::3] = -100
    kwargs = dict(labels=labels, sample_ids=ids, sample_counts=counts, sample_logprobs=logprobs,
                  sample_temperature=ts, temperature=tau, teacher_lse=torch.logsumexp(teacher, -1),
                  teacher_lse_at_temperature=torch.logsumexp(teacher / tau, -1),
                  teacher_lse_sample_temperature=torch.logsumexp(teacher / ts, -1))
    return logits, head_ids, head_lp, kwargs, teacher


def value_and_grad(fn, logits, *args, grad_output=None, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    out = fn(leaf, *args, **kwargs)
    out.backward(grad_output if grad_output is not None else torch.ones_like(out))
    return out.detach(), leaf.grad


def assert_fused_matches(logits, *args, tol, grad_output=None, **kwargs):
    ref = value_and_grad(kd_loss_reference, logits, *args, grad_output=grad_output, **kwargs)
    fused = value_and_grad(kd_loss, logits, *args, grad_output=grad_output, **kwargs)
    torch.testing.assert_close(fused[0], ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(fused[1], ref[1], rtol=tol, atol=tol)
    return ref


# --- hybrid: fused vs reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("tau,ts", [(1.0, 1.0), (2.0, 2.0), (0.5, 0.5), (2.0, 1.0), (1.0, 1.5)])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_hybrid_fused_matches_reference(dtype, tol, tau, ts, ce_weight):
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(23, 37, tau=tau, ts=ts, dtype=dtype)
    assert_fused_matches(logits, head_ids, head_lp, tol=tol, ce_weight=ce_weight, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hybrid_reductions_weights_and_tau_squared_off(reduction):
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(11, 19, tau=2.0, ts=1.0)
    v, _ = assert_fused_matches(logits, head_ids, head_lp, tol=1e-10, reduction=reduction, tau_squared=False,
                                kd_weight=0.7, ce_weight=0.3, **kwargs)
    rows = kd_loss(logits, head_ids, head_lp, reduction="none", tau_squared=False, kd_weight=0.7, ce_weight=0.3,
                   **kwargs)
    valid = kwargs["labels"] != -100
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum()}[reduction]
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-12)
    assert (rows[~valid] == 0).all()


@pytest.mark.parametrize("tau,ts", [(0.5, 0.5), (1.0, 1.0), (2.0, 1.0), (1.0, 2.0)])
def test_hybrid_gradcheck_float64(tau, ts):
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(5, 9, tau=tau, ts=ts)
    assert torch.autograd.gradcheck(
        lambda z: kd_loss(z, head_ids, head_lp, ce_weight=0.4, reduction="none", **kwargs),
        (logits.clone().requires_grad_(),))


@pytest.mark.parametrize("head,n_slots", [(1, 1), (8, 64), (5, 1200)])
def test_hybrid_odd_shapes(head, n_slots):
    # V = 1271 (not a power of two), N = 41; one slot, the benchmark's H = 8 + W = 64, and mostly padding
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(41, 1271, head=head, n_draws=1 if n_slots == 1 else 3000,
                                                       tau=2.0, ts=1.0, dtype=torch.float32, n_slots=n_slots)
    assert kwargs["sample_ids"].shape == (41, n_slots)
    assert_fused_matches(logits, head_ids, head_lp, tol=2e-5, ce_weight=0.5, **kwargs)


def test_hybrid_all_rows_ignored_and_rows_without_draws():
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(7, 13, tau=2.0, ts=1.0)
    ignored = dict(kwargs, labels=torch.full((7,), -100), sample_counts=torch.zeros_like(kwargs["sample_counts"]))
    for fn in (kd_loss, kd_loss_reference):
        value, grad = value_and_grad(fn, logits, head_ids, head_lp, ce_weight=0.5, **ignored)
        assert value.item() == 0.0 and torch.isfinite(grad).all() and (grad == 0).all()
    # a valid hybrid row without draws keeps its exact head (the build found no mass outside it)
    no_draws = dict(kwargs, sample_counts=torch.zeros_like(kwargs["sample_counts"]))
    v, _ = assert_fused_matches(logits, head_ids, head_lp, tol=1e-10, reduction="none", **no_draws)
    p_head = ((head_lp + kwargs["teacher_lse"].unsqueeze(1)) / 2.0
              - kwargs["teacher_lse_at_temperature"].unsqueeze(1)).exp()
    log_q = torch.log_softmax(logits / 2.0, -1).gather(1, head_ids)
    head_only = 4.0 * (p_head * (p_head.log() - log_q)).sum(1)
    valid = kwargs["labels"] != -100
    torch.testing.assert_close(v[valid], head_only[valid], rtol=1e-12, atol=1e-12)


def test_hybrid_grad_output_not_one_and_3d():
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(12, 17, tau=2.0, ts=1.5)
    shaped = {k: (v.reshape(3, 4, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    args = (logits.reshape(3, 4, 17), head_ids.reshape(3, 4, -1), head_lp.reshape(3, 4, -1))
    grad_output = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    value, _ = assert_fused_matches(*args, tol=1e-10, grad_output=grad_output, ce_weight=0.5, reduction="none",
                                    **shaped)
    assert value.shape == (3, 4)
    assert_fused_matches(*args, tol=1e-10, grad_output=torch.tensor(2.5, dtype=torch.float64), ce_weight=0.5,
                         **shaped)


def test_hybrid_duplicate_ids_and_layout_do_not_matter():
    # the same draws compact, split over duplicate slots, and with padding slots whose id 0 is a head id
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(6, 10, n_draws=12, ignore_some=False)
    assert (head_ids == 0).any(dim=1).all() and (kwargs["sample_counts"] == 0).any()
    ids, counts, logprobs = kwargs["sample_ids"], kwargs["sample_counts"], kwargs["sample_logprobs"]
    half = counts // 2
    split = dict(kwargs, sample_ids=torch.cat([ids, ids], 1), sample_counts=torch.cat([half, counts - half], 1),
                 sample_logprobs=torch.cat([logprobs, logprobs], 1))
    results = [value_and_grad(fn, logits, head_ids, head_lp, ce_weight=0.5, **kw)
               for kw in (kwargs, split) for fn in (kd_loss, kd_loss_reference)]
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("logits_dtype,id_dtype,count_dtype", [(torch.bfloat16, torch.int32, torch.uint8),
                                                                (torch.float16, torch.uint16, torch.uint16)])
def test_hybrid_low_precision_logits_and_cache_dtypes(logits_dtype, id_dtype, count_dtype):
    # the cache's dtypes: uint16/int32 ids, uint8 counts (<= 255 draws) or uint16, fp16 log-probs
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(13, 31, tau=2.0, ts=1.0)
    expected = value_and_grad(kd_loss, logits, head_ids, head_lp, ce_weight=0.5, **kwargs)
    cast = dict(kwargs, sample_ids=kwargs["sample_ids"].to(id_dtype),
                sample_counts=kwargs["sample_counts"].to(count_dtype), sample_logprobs=kwargs["sample_logprobs"].half())
    v, g = value_and_grad(kd_loss, logits.to(logits_dtype), head_ids.to(torch.int32), head_lp.half(),
                          ce_weight=0.5, **cast)
    assert g.dtype == logits_dtype and v.dtype == torch.float32
    torch.testing.assert_close(v.double(), expected[0], rtol=0.02, atol=0.02)
    torch.testing.assert_close(g.double(), expected[1], rtol=0.05, atol=0.02)


def test_hybrid_golden_value_by_hand():
    # one row, V = 4, head {0}, loss at τ = 2 from 3 draws of the rest at τs = 1: ids (2, 3), counts (2, 1)
    teacher, student, tau, ts = [2.0, -0.5, 0.3, 0.9], [0.2, 0.9, -1.1, 0.4], 2.0, 1.0

    def log_softmax(x, t):
        lse = math.log(sum(math.exp(v / t) for v in x))
        return [v / t - lse for v in x]

    lp_tau, lp_ts, lp_1, lq = (log_softmax(teacher, tau), log_softmax(teacher, ts), log_softmax(teacher, 1.0),
                               log_softmax(student, tau))
    rest_ts = 1.0 - math.exp(lp_ts[0])
    a = {0: math.exp(lp_tau[0])}
    for i, c in ((2, 2), (3, 1)):
        a[i] = c / 3 * math.exp(lp_tau[i]) * rest_ts / math.exp(lp_ts[i])
    expected = tau * tau * sum(w * (lp_tau[i] - lq[i]) for i, w in a.items())
    expected_grad = [tau * (sum(a.values()) * math.exp(lq[k]) - a.get(k, 0.0)) for k in range(4)]
    t = torch.tensor([teacher], dtype=torch.float64)
    kwargs = dict(sample_ids=torch.tensor([[2, 3, 0]]), sample_counts=torch.tensor([[2, 1, 0]]),
                  sample_logprobs=torch.tensor([[lp_1[2], lp_1[3], 0.0]], dtype=torch.float64),
                  sample_temperature=ts, temperature=tau, teacher_lse=torch.logsumexp(t, -1),
                  teacher_lse_at_temperature=torch.logsumexp(t / tau, -1))
    head = (torch.tensor([[0]]), torch.tensor([[lp_1[0]]], dtype=torch.float64))
    for fn in (kd_loss, kd_loss_reference):
        value, grad = value_and_grad(fn, torch.tensor([student], dtype=torch.float64), *head, **kwargs)
        assert value.item() == pytest.approx(expected, rel=1e-12)
        assert grad[0].tolist() == pytest.approx(expected_grad, rel=1e-12)


# --- the one call for three kinds ------------------------------------------------------------------------------


def test_sample_kind_through_kd_loss_equals_sampled_kd_loss():
    logits, _, _, kwargs, _ = make_hybrid(9, 21, tau=2.0, ts=1.0)
    ids, counts = kwargs.pop("sample_ids"), kwargs.pop("sample_counts")
    for backend in ("torch", "reference"):
        a = value_and_grad(kd_loss, logits, sample_ids=ids, sample_counts=counts, ce_weight=0.5, backend=backend,
                           **kwargs)
        b = value_and_grad(sampled_kd_loss, logits, ids, counts, ce_weight=0.5, **kwargs)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    module = kdlib.KDLoss(ce_weight=0.5, temperature=2.0)
    kw = {k: v for k, v in kwargs.items() if k != "temperature"}
    torch.testing.assert_close(module(logits, sample_ids=ids, sample_counts=counts, **kw),
                               kd_loss(logits, sample_ids=ids, sample_counts=counts, ce_weight=0.5, **kwargs))


def test_topk_positional_call_is_unchanged():
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(9, 21, head=5, tau=2.0, ts=2.0)
    topk_kw = {k: kwargs[k] for k in ("labels", "teacher_lse", "teacher_lse_at_temperature", "temperature")}
    a = kd_loss(logits, head_ids, head_lp, **topk_kw)
    b = kd_loss(logits, topk_ids=head_ids, topk_logprobs=head_lp, **topk_kw)
    c = kd_loss_reference(logits, head_ids, head_lp, **topk_kw)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def _error_cases():
    logits, head_ids, head_lp, kw, _ = make_hybrid(4, 8, ignore_some=False)
    return logits, [
        ("no targets", (), {}, "no teacher targets"),
        ("reverse_kl", (head_ids, head_lp), dict(kw, divergence="reverse_kl"), "no unbiased estimator"),
        ("jsd", (head_ids, head_lp), dict(kw, divergence="jsd", beta=0.5), "divergence='forward_kl'"),
        ("tvd sample", (), dict(kw, divergence="tvd"), "sample targets"),
        ("ids without counts", (head_ids, head_lp), dict(kw, sample_counts=None), "without sample_counts"),
        ("head without logprobs", (head_ids,), kw, "without topk_logprobs"),
        ("slot shape", (head_ids, head_lp), dict(kw, sample_ids=kw["sample_ids"][:3]), "sample_ids must be"),
        ("logprob shape", (head_ids, head_lp), dict(kw, sample_logprobs=kw["sample_logprobs"][:, :1]),
         "sample_logprobs must be"),
        ("head id >= V", (head_ids + 8, head_lp), kw, "topk_ids contains ids outside"),
        ("sample id >= V", (head_ids, head_lp), dict(kw, sample_ids=kw["sample_ids"] + 8), "[0, V=8)"),
        ("negative", (head_ids, head_lp), dict(kw, sample_counts=kw["sample_counts"] - 10), ">= 0"),
        ("IS without logprobs", (head_ids, head_lp), dict(kw, sample_logprobs=None, sample_temperature=2.0),
         "importance weights"),
        ("lse at tau", (head_ids, head_lp), dict(kw, temperature=2.0, teacher_lse_at_temperature=None),
         "teacher_lse_at_temperature is required for hybrid targets"),
        ("lse at ts", (head_ids, head_lp), dict(kw, sample_temperature=3.0, teacher_lse_sample_temperature=None),
         "--temperatures 3"),
        ("ts", (head_ids, head_lp), dict(kw, sample_temperature=0.0), "sample_temperature must be"),
        ("ts tensor", (head_ids, head_lp), dict(kw, sample_temperature=torch.tensor([1.0, 2.0])), "must be one number"),
    ]


@pytest.mark.parametrize("fn", [kd_loss, kd_loss_reference])
def test_errors(fn):
    logits, cases = _error_cases()
    for name, args, kwargs, message in cases:
        if name == "tvd sample":
            kwargs = {k: v for k, v in kwargs.items()}
        with pytest.raises(ValueError) as info:
            fn(logits, *args, **kwargs)
        assert message in str(info.value), (name, str(info.value))


def test_jsd_at_beta_zero_is_forward_kl_for_samples():
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(5, 11)
    assert torch.equal(kd_loss(logits, head_ids, head_lp, divergence="jsd", beta=0.0, **kwargs),
                       kd_loss(logits, head_ids, head_lp, **kwargs))


def test_validate_false_gives_the_same_values():
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(7, 15, tau=2.0, ts=1.0)
    a = value_and_grad(kd_loss, logits, head_ids, head_lp, ce_weight=0.5, **kwargs)
    b = value_and_grad(kd_loss, logits, head_ids, head_lp, ce_weight=0.5, validate=False, **kwargs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- batches (built by hand with the reader's key names) ------------------------------------------------------


def make_batch(kind, tau_cached=(2.0,), ts=1.0, b=2, t=5, vocab=23, head=4, seed=1):
    """A cache batch as kdlib.batch.read_batch makes it for ``kind`` (keys of the preamble), with the tensors
    the direct kd_loss call needs."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b * t, vocab, generator=gen, dtype=torch.float64) * 2.0
    head_ids, head_lp, ids, counts, logprobs = draw_hybrid(teacher, head if kind == "hybrid" else 1, ts, 20, gen,
                                                           n_slots=9)
    if kind == "sample":  # draws from the full distribution instead
        from tests.test_losses_sampled import draw_targets

        ids, counts, logprobs, _ = draw_targets(teacher, ts, 20, gen, n_slots=9)
    if kind == "topk":
        head_lp, head_ids = torch.log_softmax(teacher, -1).topk(head, dim=-1)
    labels = torch.randint(0, vocab, (b, t), generator=gen)
    labels[0, -1] = -100
    batch = {"input_ids": torch.randint(0, vocab, (b, t), generator=gen, dtype=torch.int32), "labels": labels,
             "lse": torch.logsumexp(teacher, -1).float().reshape(b, t),
             "teacher_vocab_size": torch.tensor(vocab), "sample_indices": torch.arange(b)}
    for tau in set(tau_cached) | ({ts} if ts != 1.0 else set()):
        batch[f"lse_t{tau:g}"] = torch.logsumexp(teacher / tau, -1).float().reshape(b, t)
    if kind in ("topk", "hybrid"):
        batch.update(topk_ids=head_ids.to(torch.int32).reshape(b, t, -1),
                     topk_logprobs=head_lp.half().reshape(b, t, -1))
    if kind in ("sample", "hybrid"):
        batch.update(sample_ids=ids.to(torch.int32).reshape(b, t, -1), sample_counts=counts.to(torch.uint8).reshape(
            b, t, -1), sample_logprobs=logprobs.half().reshape(b, t, -1),
            sample_temperature=torch.tensor(ts, dtype=torch.float32))
    logits = torch.randn(b, t, vocab, generator=gen, dtype=torch.float32)
    return batch, logits


def _direct(logits, batch, tau, ts, **options):
    keys = dict(topk_ids="topk_ids", topk_logprobs="topk_logprobs", sample_ids="sample_ids",
                sample_counts="sample_counts", sample_logprobs="sample_logprobs", labels="labels",
                teacher_lse="lse", teacher_lse_at_temperature=f"lse_t{tau:g}",
                teacher_lse_sample_temperature=f"lse_t{ts:g}")
    kwargs = {name: batch.get(key) for name, key in keys.items()}
    return kd_loss(logits, sample_temperature=ts, temperature=tau, **kwargs, **options)


@pytest.mark.parametrize("kind", ["topk", "sample", "hybrid"])
@pytest.mark.parametrize("tau,ts", [(1.0, 1.0), (2.0, 1.0), (2.0, 2.0), (1.0, 0.7)])
def test_kd_loss_from_batch_picks_the_kind(kind, tau, ts):
    batch, logits = make_batch(kind, ts=ts)
    expected = _direct(logits, batch, tau, ts, ce_weight=0.5)
    got = kd_loss_from_batch(logits, batch, ce_weight=0.5, temperature=tau)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(kdlib.KDLoss(ce_weight=0.5, temperature=tau).from_batch(logits, batch), expected,
                               rtol=0, atol=0)
    torch.testing.assert_close(kdlib.distill_loss(logits, batch, ce_weight=0.5, temperature=tau), expected,
                               rtol=0, atol=0)
    if kind != "topk":  # the sampled kinds differ from the exact top-k of the same teacher
        assert got.item() != pytest.approx(_direct(logits, make_batch("topk", ts=ts)[0], tau, ts,
                                                   ce_weight=0.5).item(), rel=1e-9)


def test_from_batch_float32_sample_temperature_names_its_lse():
    # τs = 0.7 stored as float32 (0.699999988...) is read as 0.7: lse_t0.7 is found, and τ = 0.7 needs no IS
    batch, logits = make_batch("sample", tau_cached=(), ts=0.7)
    assert float(batch["sample_temperature"]) != 0.7
    no_is = dict(batch)
    del no_is["sample_logprobs"]
    loss = kd_loss_from_batch(logits, no_is, temperature=0.7)  # τs == τ: plain counts, no lse needed
    assert torch.isfinite(loss)
    expected = kd_loss_from_batch(logits, batch, temperature=1.0)  # τs = 0.7 != τ = 1: IS weights from lse_t0.7
    collated = dict(batch, sample_temperature=batch["sample_temperature"].repeat(2))  # a default collate's [B]
    assert torch.equal(kd_loss_from_batch(logits, collated, temperature=1.0), expected)


@pytest.mark.parametrize("kind", ["sample", "hybrid"])
def test_from_batch_errors(kind):
    batch, logits = make_batch(kind, tau_cached=(), ts=0.5)
    with pytest.raises(ValueError, match=r"batch\['lse_t2'\].*rebuild the cache with --temperatures 2"):
        kd_loss_from_batch(logits, batch, temperature=2.0)
    missing_ts = {k: v for k, v in batch.items() if k != "lse_t0.5"}
    with pytest.raises(ValueError, match=r"importance weights from batch\['lse_t0.5'\].*--temperatures 0.5"):
        kd_loss_from_batch(logits, missing_ts)
    with pytest.raises(ValueError, match="no 'sample_temperature'"):
        kd_loss_from_batch(logits, {k: v for k, v in batch.items() if k != "sample_temperature"})
    with pytest.raises(ValueError, match="no 'sample_counts'"):
        kd_loss_from_batch(logits, {k: v for k, v in batch.items() if k != "sample_counts"})
    with pytest.raises(ValueError, match="no 'topk_ids' and no 'sample_ids'"):
        kd_loss_from_batch(logits, {k: v for k, v in batch.items() if not k.startswith(("sample_", "topk_"))})
    with pytest.raises(ValueError, match="no unbiased estimator"):
        kd_loss_from_batch(logits, batch, divergence="reverse_kl", temperature=0.5)


def test_kd_step_loss_with_a_sampled_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    for kind in ("sample", "hybrid"):
        batch, _ = make_batch(kind, ts=2.0)
        loss, logits = kdlib.kd_step_loss(model, batch, ce_weight=0.3, temperature=2.0)
        expected = _direct(logits.detach(), batch, 2.0, 2.0, ce_weight=0.3)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    student, teacher = kdlib.integrations.split_teacher_batch(batch)
    assert set(student) == {"input_ids"} and {"sample_ids", "sample_counts", "sample_temperature"} <= set(teacher)


# --- unbiasedness ---------------------------------------------------------------------------------------------


def _statistical_case(tau, ts, seed, head=3):
    gen = torch.Generator().manual_seed(seed)
    vocab = 12
    teacher = torch.randn(1, vocab, generator=gen, dtype=torch.float64) * 1.5
    student = torch.randn(1, vocab, generator=gen, dtype=torch.float64)
    rows = teacher.expand(N_TRIALS, vocab)
    head_ids, head_lp, ids, counts, logprobs = draw_hybrid(rows, head, ts, N_DRAWS, gen)
    kwargs = dict(sample_ids=ids, sample_counts=counts, sample_logprobs=logprobs, sample_temperature=ts,
                  temperature=tau, teacher_lse=torch.logsumexp(rows, -1),
                  teacher_lse_at_temperature=torch.logsumexp(rows / tau, -1),
                  teacher_lse_sample_temperature=torch.logsumexp(rows / ts, -1), tau_squared=False,
                  reduction="none")
    return teacher, student, (head_ids, head_lp), kwargs


@pytest.mark.parametrize("tau,ts", [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0), (1.0, 2.0), (1.0, 0.7)])
def test_hybrid_gradient_and_value_are_unbiased(tau, ts):
    teacher, student, head, kwargs = _statistical_case(tau, ts, seed=int(10 * tau + 100 * ts))
    z = student.expand(N_TRIALS, -1).clone().requires_grad_()
    rows = kd_loss(z, *head, **kwargs)  # [N_TRIALS], one independent estimate per row
    rows.sum().backward()
    assert_unbiased(z, rows, teacher, student, tau)
    ref = kd_loss_reference(student.expand(N_TRIALS, -1), *head, **kwargs)
    torch.testing.assert_close(rows.detach(), ref, rtol=1e-10, atol=1e-10)


def test_hybrid_statistical_test_detects_a_biased_estimator():
    # draws from the rest at τs = 1 declared as drawn at τs = τ = 2 (no importance weights): biased; the z-test
    # must reject it, so the unbiasedness test above has power
    teacher, student, head, kwargs = _statistical_case(2.0, 1.0, seed=7)
    kwargs = dict(kwargs, sample_temperature=2.0)
    z = student.expand(N_TRIALS, -1).clone().requires_grad_()
    kd_loss(z, *head, **kwargs).sum().backward()
    exact_grad, _ = exact_forward_kl(teacher, student, 2.0)
    assert z_scores(z.grad, exact_grad).abs().max() > 4


@pytest.mark.parametrize("kind", ["sample", "hybrid"])
def test_fused_allocates_no_n_by_v_but_the_gradient(kind):
    from tests.allocations import FreshAllocations

    n, vocab = 64, 1000  # the chunk holds all rows: its [N, V] work buffer is the chunk size, so rows > chunk
    logits, head_ids, head_lp, kwargs, _ = make_hybrid(n, vocab, head=8, n_draws=40, tau=2.0, ts=1.0,
                                                       dtype=torch.float32, n_slots=64)
    args = (head_ids, head_lp) if kind == "hybrid" else ()
    z = logits.clone().requires_grad_()
    with FreshAllocations() as fwd:
        loss = kd_loss(z, *args, ce_weight=0.5, chunk_rows=8, **kwargs)
    assert max(fwd.numels) <= 8 * vocab
    with FreshAllocations() as bwd:
        torch.autograd.grad(loss, z)
    assert sum(x >= n * vocab for x in bwd.numels) == 1  # the gradient itself
    assert max(x for x in bwd.numels if x < n * vocab) <= 8 * vocab
