"""kd_loss (fused PyTorch backend) vs the naive reference, golden values, gradcheck, memory, errors.

Shape notation: N rows, V vocabulary, K teacher top-k, B batch, T sequence.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tests.allocations import FreshAllocations

import kdlib
from kdlib.losses import DIVERGENCES, TAILS, kd_loss_reference

TEMPERATURES = (1.0, 2.0)
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOGPROB_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64, torch.uint16)
# (rows N, vocabulary V, top-k K): odd V, K = 1, K = V
SHAPES = ((41, 1271, 32), (5, 97, 1), (4, 37, 37))
# relative tolerance on values, and on grads relative to the largest |grad|
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1.6e-2), torch.float16: (1e-5, 2e-3),
              torch.float64: (1e-12, 1e-12)}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make_case(n, vocab, k, *, logits_dtype=torch.float32, logprob_dtype=torch.float32, id_dtype=torch.int64,
              seed=0, peaked=False, lead=None, ignore_frac=0.2):
    """Random student logits and a top-k cache of a random teacher (exact lse, lse_t2, lse_t0.5)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    if peaked:  # one dominant logit per row, plus random outliers
        teacher[torch.arange(n), torch.randint(0, vocab, (n,), generator=g)] += 30.0
    student = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 1.5
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k, dim=-1)  # sorted descending
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    lead = lead or (n,)
    case = dict(
        student_logits=student.to(logits_dtype).reshape(*lead, vocab).requires_grad_(True),
        topk_ids=ids.to(id_dtype).reshape(*lead, k),
        topk_logprobs=logprobs.to(logprob_dtype).reshape(*lead, k),
        labels=labels.reshape(lead),
        teacher_lse=torch.logsumexp(teacher, -1).float().reshape(lead),
        lse_t={tau: torch.logsumexp(teacher / tau, -1).float().reshape(lead) for tau in (2.0, 0.5, 1.0)},
    )
    return case


def run(case, backend, grad_scale=1.0, **kw):
    logits = case["student_logits"]
    kw.setdefault("teacher_lse", case["teacher_lse"])
    kw.setdefault("teacher_lse_at_temperature", case["lse_t"][kw.get("temperature", 1.0)])
    kw.setdefault("labels", case["labels"])
    loss = kdlib.kd_loss(logits, case["topk_ids"], case["topk_logprobs"], backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss * grad_scale, logits)
    return loss.detach(), grad


def assert_close(case, dtype, ref, out):
    (v_ref, g_ref), (v_out, g_out) = ref, out
    rtol_v, rtol_g = TOLERANCES[dtype]
    assert torch.isfinite(v_out).all() and torch.isfinite(g_out).all()
    assert g_out.dtype == case["student_logits"].dtype and g_out.shape == case["student_logits"].shape
    torch.testing.assert_close(v_out, v_ref, rtol=rtol_v, atol=rtol_v)
    scale = g_ref.abs().max().float().clamp_min(1e-30)
    err = (g_out.float() - g_ref.float()).abs().max()
    assert err <= rtol_g * scale, f"grad max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("logprob_dtype", LOGPROB_DTYPES, ids=str)
@pytest.mark.parametrize("logits_dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_matches_reference(divergence, tail, temperature, logits_dtype, logprob_dtype):
    id_dtype = ID_DTYPES[(DIVERGENCES.index(divergence) + TAILS.index(tail)) % 3]
    case = make_case(41, 1271, 32, logits_dtype=logits_dtype, logprob_dtype=logprob_dtype, id_dtype=id_dtype)
    kw = dict(divergence=divergence, tail=tail, temperature=temperature, ce_weight=0.5, beta=0.3)
    ref = run(case, "reference", **kw)
    out = run(case, "torch", **kw)
    assert_close(case, logits_dtype, ref, out)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_odd_shapes_k1_kv_chunking(shape, divergence, tail):
    n, vocab, k = shape
    case = make_case(n, vocab, k, seed=1)
    kw = dict(divergence=divergence, tail=tail, temperature=2.0, ce_weight=0.25)
    # chunk_rows=3 exercises a ragged last chunk
    assert_close(case, torch.float32, run(case, "reference", **kw), run(case, "torch", chunk_rows=3, **kw))


@pytest.mark.parametrize("id_dtype", [d for d in ID_DTYPES if d != torch.int64], ids=str)
@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_id_dtypes_bitwise_identical(divergence, tail, id_dtype):
    # the id dtype only enters the widening to int64 before any gather, so the full product over
    # divergence x tail x id dtype must give bit-identical values and gradients
    case = make_case(9, 301, 8, id_dtype=id_dtype)
    base = make_case(9, 301, 8, id_dtype=torch.int64)
    kw = dict(ce_weight=1.0, temperature=2.0, divergence=divergence, tail=tail, beta=0.3)
    v1, g1 = run(case, "torch", **kw)
    v2, g2 = run(base, "torch", **kw)
    assert torch.equal(v1, v2) and torch.equal(g1, g2)


@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_temperature_below_one_matches_reference(divergence, tail):
    # tau < 1 sharpens both sides: the tail is tiny, lse_t is large and a / tau is amplified
    case = make_case(23, 517, 12, seed=7)
    kw = dict(divergence=divergence, tail=tail, temperature=0.5, ce_weight=0.3, beta=0.4)
    assert_close(case, torch.float32, run(case, "reference", grad_scale=1.7, **kw),
                 run(case, "torch", grad_scale=1.7, **kw))


@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
@pytest.mark.parametrize("student_peaked", [False, True])
def test_peaked_teacher_and_student(divergence, tail, student_peaked):
    case = make_case(16, 513, 16, peaked=True, logprob_dtype=torch.float32, seed=3)
    if student_peaked:  # the student puts almost all its mass on the teacher's top-1: tail mass ~1e-12
        with torch.no_grad():
            logits = case["student_logits"]
            logits[torch.arange(16), case["topk_ids"][:, 0].long()] += 30.0
    kw = dict(divergence=divergence, tail=tail, temperature=1.0, ce_weight=0.1)
    assert_close(case, torch.float32, run(case, "reference", **kw), run(case, "torch", **kw))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_grad_output_not_one_and_3d_inputs(divergence):
    case = make_case(2 * 13, 211, 6, lead=(2, 13))
    kw = dict(divergence=divergence, temperature=2.0, ce_weight=0.7, kd_weight=0.4)
    ref = run(case, "reference", grad_scale=2.5, **kw)
    out = run(case, "torch", grad_scale=2.5, **kw)
    assert_close(case, torch.float32, ref, out)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    case = make_case(3 * 5, 101, 4, lead=(3, 5))
    logits = case["student_logits"]
    kw = dict(labels=case["labels"], ce_weight=0.5, teacher_lse=case["teacher_lse"], reduction=reduction)
    ref = kd_loss_reference(logits, case["topk_ids"], case["topk_logprobs"], **kw)
    out = kdlib.kd_loss(logits, case["topk_ids"], case["topk_logprobs"], backend="torch", **kw)
    assert out.shape == ((3, 5) if reduction == "none" else ())
    torch.testing.assert_close(out, ref)
    w = torch.rand(out.shape)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    (g_out,) = torch.autograd.grad((out * w).sum(), logits)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_all_rows_ignored(divergence, tail, backend, temperature):
    case = make_case(6, 97, 5, ignore_frac=1.1)
    assert (case["labels"] == -100).all()
    kw = dict(ce_weight=1.0, temperature=temperature, divergence=divergence, tail=tail, beta=0.3)
    for reduction in ("mean", "sum"):
        value, grad = run(case, backend, reduction=reduction, **kw)
        assert value.item() == 0.0
        assert torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


def test_renormalize_reverse_kl_is_negative_when_student_mass_is_off_support():
    # axolotl convention: reverse KL against the renormalized teacher sums over S only, so D is not a
    # divergence and goes below 0. With the student proportional to the teacher on S (p_i = P q~_i):
    # D = sum_S P q~_i log(P q~_i / q~_i) = P log P < 0 for every P < 1.
    n, vocab, k, mass_on_support = 4, 50, 6, 0.3
    g = torch.Generator().manual_seed(11)
    teacher_logprobs = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1)  # renormalized
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    off = torch.ones(n, vocab, dtype=torch.bool).scatter_(1, ids, False)
    log_off = torch.logsumexp(logits.masked_fill(~off, -torch.inf), -1, keepdim=True)  # [N, 1]
    support_logits = teacher_logprobs + log_off + math.log(mass_on_support / (1 - mass_on_support))
    logits = logits.scatter(1, ids, support_logits).requires_grad_(True)
    expected = mass_on_support * math.log(mass_on_support)  # -0.361...
    for backend in ("torch", "reference"):
        value = kdlib.kd_loss(logits, ids, teacher_logprobs, divergence="reverse_kl", tail="renormalize",
                              backend=backend)
        assert value.item() == pytest.approx(expected, rel=1e-10) and value.item() < 0
    # the exact (bucket) reverse KL of the same inputs is a true divergence
    bucket = kdlib.kd_loss(logits, ids, teacher_logprobs, divergence="reverse_kl", tail="bucket", backend="torch")
    assert bucket.item() >= 0


def test_labels_none_all_rows_valid_and_kd_only():
    case = make_case(7, 55, 5)
    logits = case["student_logits"]
    ref = kd_loss_reference(logits, case["topk_ids"], case["topk_logprobs"])
    out = kdlib.kd_loss(logits, case["topk_ids"], case["topk_logprobs"])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("divergence,tail,temperature",
                         list(itertools.product(DIVERGENCES, TAILS, TEMPERATURES + (0.5,))))
def test_gradcheck_float64(divergence, tail, temperature):
    case = make_case(3, 11, 4, logits_dtype=torch.float64, ignore_frac=0.3, seed=5)
    labels = case["labels"]

    def fn(logits):
        return kdlib.kd_loss(logits, case["topk_ids"], case["topk_logprobs"], labels=labels, ce_weight=0.5,
                             divergence=divergence, tail=tail, temperature=temperature, beta=0.4,
                             teacher_lse=case["teacher_lse"], teacher_lse_at_temperature=case["lse_t"][temperature],
                             backend="torch", reduction="none")

    assert torch.autograd.gradcheck(fn, (case["student_logits"],), eps=1e-6, atol=1e-7)


def test_jsd_beta_limits_equal_kl():
    case = make_case(8, 77, 6)
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = run(case, "torch", divergence="jsd", beta=beta)
        ref = run(case, "torch", divergence=kl)
        torch.testing.assert_close(jsd, ref)


# --- golden values: computed independently with numpy float64 from the formulas in docs/LOSSES.md -------
GOLDEN_LOGITS = [[1.0, -0.5, 2.0, 0.3, -1.2, 0.7], [0.2, 0.1, -0.3, 1.5, -2.0, 0.0]]
GOLDEN_TEACHER = [[2.5, 0.1, 1.0, -1.0, 0.5, -0.3], [-0.2, 0.4, 0.0, 3.0, -1.0, 1.1]]
GOLDEN_LABELS = [2, 3]
# loss = mean_rows(0.5 * CE + tau^2 * D), K = 3, beta = 0.5
GOLDEN = {
    ('forward_kl', 'bucket', 1.0): 0.7251954920584958,
    ('forward_kl', 'bucket', 2.0): 0.7507682225802241,
    ('forward_kl', 'renormalize', 1.0): 0.9850738255011346,
    ('forward_kl', 'renormalize', 2.0): 2.678029494526557,
    ('forward_kl', 'none', 1.0): 0.8196323539089416,
    ('forward_kl', 'none', 2.0): 1.1343878554357196,
    ('reverse_kl', 'bucket', 1.0): 0.7312383878065535,
    ('reverse_kl', 'bucket', 2.0): 0.7292649352426801,
    ('reverse_kl', 'renormalize', 1.0): 0.40517812807862275,
    ('reverse_kl', 'renormalize', 2.0): -0.5862642594109652,
    ('reverse_kl', 'none', 1.0): 0.48293758432118994,
    ('reverse_kl', 'none', 2.0): 0.17981374846264156,
    ('jsd', 'bucket', 1.0): 0.42567468000761355,
    ('jsd', 'bucket', 2.0): 0.432467327476571,
    ('jsd', 'renormalize', 1.0): 0.5069629760360719,
    ('jsd', 'renormalize', 2.0): 1.0345865744554807,
    ('jsd', 'none', 1.0): 0.40718699932649577,
    ('jsd', 'none', 2.0): 0.41184926985447257,
    ('tvd', 'bucket', 1.0): 0.7125360248123581,
    ('tvd', 'bucket', 2.0): 1.159371044658155,
    ('tvd', 'renormalize', 1.0): 0.7987455056647499,
    ('tvd', 'renormalize', 2.0): 2.0052085946051914,
    ('tvd', 'none', 1.0): 0.633043936322526,
    ('tvd', 'none', 2.0): 0.928581331597631,
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("key", sorted(GOLDEN), ids=lambda k: f"{k[0]}-{k[1]}-t{k[2]:g}")
def test_golden_values(key, backend):
    divergence, tail, tau = key
    logits = torch.tensor(GOLDEN_LOGITS, dtype=torch.float64)
    teacher = torch.tensor(GOLDEN_TEACHER, dtype=torch.float64)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(3, dim=-1)
    loss = kdlib.kd_loss(logits, ids, logprobs, labels=torch.tensor(GOLDEN_LABELS), ce_weight=0.5,
                         divergence=divergence, tail=tail, temperature=tau, beta=0.5,
                         teacher_lse=torch.logsumexp(teacher, -1),
                         teacher_lse_at_temperature=torch.logsumexp(teacher / tau, -1), backend=backend)
    assert loss.item() == pytest.approx(GOLDEN[key], rel=1e-10, abs=1e-12)


# --- memory: the fused path never allocates an [N, V] buffer besides the gradient ---------------------------
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("logits_dtype", LOGIT_DTYPES, ids=str)
def test_fused_allocates_no_nv_buffer(temperature, logits_dtype):
    n, vocab = 64, 1000
    case = make_case(n, vocab, 16, logits_dtype=logits_dtype)
    kw = dict(labels=case["labels"], ce_weight=0.5, temperature=temperature, teacher_lse=case["teacher_lse"],
              teacher_lse_at_temperature=case["lse_t"][temperature], backend="torch", chunk_rows=8)
    with FreshAllocations() as fwd:
        loss = kdlib.kd_loss(case["student_logits"], case["topk_ids"], case["topk_logprobs"], **kw)
    assert max(fwd.numels) <= 8 * vocab
    with FreshAllocations() as bwd:
        torch.autograd.grad(loss, case["student_logits"])
    assert sum(x >= n * vocab for x in bwd.numels) == 1  # the gradient itself
    assert max(x for x in bwd.numels if x < n * vocab) <= 8 * vocab


# --- API wrappers -------------------------------------------------------------------------------------
def test_kd_loss_from_batch_and_module():
    case = make_case(2 * 9, 120, 7, lead=(2, 9), id_dtype=torch.uint16, logprob_dtype=torch.float16)
    batch = {"topk_ids": case["topk_ids"], "topk_logprobs": case["topk_logprobs"], "lse": case["teacher_lse"],
             "lse_t2": case["lse_t"][2.0], "lse_t0.5": case["lse_t"][0.5], "labels": case["labels"]}
    logits = case["student_logits"]
    for tau in (1.0, 2.0, 0.5):
        expected = kd_loss_reference(logits, case["topk_ids"], case["topk_logprobs"], labels=case["labels"],
                                     ce_weight=0.5, temperature=tau, teacher_lse=case["teacher_lse"],
                                     teacher_lse_at_temperature=case["lse_t"][tau])
        got = kdlib.kd_loss_from_batch(logits, batch, ce_weight=0.5, temperature=tau)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        module = kdlib.KDLoss(ce_weight=0.5, temperature=tau)
        torch.testing.assert_close(module.from_batch(logits, batch), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            module(logits, case["topk_ids"], case["topk_logprobs"], labels=case["labels"],
                   teacher_lse=case["teacher_lse"], teacher_lse_at_temperature=case["lse_t"][tau]),
            expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--temperatures 3"):
        kdlib.kd_loss_from_batch(logits, batch, temperature=3.0)
    # renormalize needs no lse at any temperature
    kdlib.kd_loss_from_batch(logits, {k: batch[k] for k in ("topk_ids", "topk_logprobs")}, temperature=3.0,
                             tail="renormalize")


# --- clear errors -------------------------------------------------------------------------------------
def _args(case):
    return case["student_logits"], case["topk_ids"], case["topk_logprobs"]


@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_error_missing_lse_at_temperature(tail):
    case = make_case(4, 30, 3)
    with pytest.raises(ValueError, match=r"--temperatures 2.*teacher_lse_at_temperature|teacher_lse_at_temperature.*--temperatures 2"):
        kdlib.kd_loss(*_args(case), temperature=2.0, tail=tail, teacher_lse=case["teacher_lse"])
    with pytest.raises(ValueError, match="--temperatures"):
        kdlib.kd_loss(*_args(case), temperature=2.0, tail=tail)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ce_weight=1.0), "needs labels"),
    (dict(divergence="kl"), "unknown divergence"),
    (dict(tail="zero"), "unknown tail"),
    (dict(reduction="avg"), "unknown reduction"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(temperature=0.0), "temperature"),
    (dict(beta=1.5), "beta"),
])
def test_error_bad_options(kwargs, match):
    case = make_case(4, 30, 3)
    with pytest.raises(ValueError, match=match):
        kdlib.kd_loss(*_args(case), **kwargs)


def test_error_shapes_and_ids():
    case = make_case(4, 30, 3)
    logits, ids, lps = _args(case)
    with pytest.raises(ValueError, match="topk_logprobs has shape"):
        kdlib.kd_loss(logits, ids, lps[:, :2])
    with pytest.raises(ValueError, match="topk_ids has shape"):
        kdlib.kd_loss(logits, ids[:3], lps[:3])
    with pytest.raises(ValueError, match="labels has shape"):
        kdlib.kd_loss(logits, ids, lps, labels=case["labels"][:2], ce_weight=1.0)
    bad = ids.clone()
    bad[1, 2] = 30
    with pytest.raises(ValueError, match=r"outside \[0, V=30\)"):
        kdlib.kd_loss(logits, bad, lps)
    with pytest.raises(ValueError, match="K=31"):
        kdlib.kd_loss(logits, torch.zeros(4, 31, dtype=torch.int64), torch.zeros(4, 31))
    with pytest.raises(ValueError, match="integer"):
        kdlib.kd_loss(logits, ids.float(), lps)


def test_error_labels_out_of_range_and_validate_flag():
    case = make_case(4, 30, 3)
    logits, ids, lps = _args(case)
    with pytest.raises(ValueError, match=r"labels contain values outside \[0, V=30\).*ignore_index=-100"):
        kdlib.kd_loss(logits, ids, lps, labels=torch.tensor([1, -100, 30, 2]), ce_weight=1.0)
    # validate=False only skips the data-dependent range checks (one host sync on CUDA): same result
    kw = dict(labels=case["labels"], ce_weight=1.0, teacher_lse=case["teacher_lse"])
    checked = kdlib.kd_loss(logits, ids, lps, **kw)
    torch.testing.assert_close(kdlib.kd_loss(logits, ids, lps, validate=False, **kw), checked, rtol=0, atol=0)
    torch.testing.assert_close(kdlib.KDLoss(validate=False)(logits, ids, lps, **kw), checked, rtol=0, atol=0)
    with pytest.raises(ValueError, match="topk_logprobs has shape"):  # metadata checks stay on
        kdlib.kd_loss(logits, ids, lps[:, :2], validate=False)


def test_from_batch_refuses_a_student_with_another_vocabulary():
    from kdlib.alignment import AlignmentError

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 3, 4), dtype=torch.int32)
    batch = {"topk_ids": ids, "topk_logprobs": torch.full((2, 3, 4), -3.0, dtype=torch.float16),
             "teacher_vocab_size": torch.tensor(20)}
    kdlib.kd_loss_from_batch(torch.randn(2, 3, 20), batch)  # same vocabulary: fine
    with pytest.raises(AlignmentError, match="vocabulary has 64 entries but the cache's teacher has 20: .*allow_padded_vocab"):
        kdlib.kd_loss_from_batch(torch.randn(2, 3, 64), batch)
    with pytest.raises(AlignmentError, match="vocabulary has 16 entries but the cache's teacher has 20: "):
        kdlib.kd_loss_from_batch(torch.randn(2, 3, 16), batch)
    # Smaller with allow_padded_vocab=True: only when every id fits (tests/test_vocab_mismatch.py).
    with pytest.raises(AlignmentError, match=r"below the student's vocabulary of 16 \(the teacher's has 20\)"):
        kdlib.kd_loss_from_batch(torch.randn(2, 3, 16), batch, allow_padded_vocab=True)
    loss = kdlib.kd_loss_from_batch(torch.randn(2, 3, 24), batch, allow_padded_vocab=True)
    assert torch.isfinite(loss)
