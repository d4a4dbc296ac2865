"""Triton sparse-KD kernels (run on CPU tensors under TRITON_INTERPRET=1) vs the naive reference.

Shape notation: N rows, V vocabulary, K teacher top-k. Shapes are small: the interpreter is slow.
V = 4500 spans two BLOCK_V = 4096 blocks with a ragged tail; K = 70 spans two BLOCK_K = 64 blocks.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import kdlib
from kdlib.losses import DIVERGENCES, TAILS
from kdlib.losses.backends import RowStats
from kdlib.losses.sparse_math import LOG_TAIL_FLOOR

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TEMPERATURES = (1.0, 2.0)
# (N, V, K)
SHAPES = ((6, 4500, 70), (3, 37, 1), (3, 37, 37))
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 1.6e-2), torch.float16: (2e-5, 2e-3)}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make_case(n, vocab, k, *, logits_dtype=torch.float32, logprob_dtype=torch.float32, id_dtype=torch.int64,
              seed=0, ignore_frac=0.25, peaked=False):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    if peaked:
        teacher[torch.arange(n), torch.randint(0, vocab, (n,), generator=g)] += 30.0
    student = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 1.5
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    labels[0] = ids[0, min(1, k - 1)]  # a label inside the support
    return dict(
        student_logits=student.to(logits_dtype).to(DEVICE).requires_grad_(True),
        topk_ids=ids.to(id_dtype).to(DEVICE), topk_logprobs=logprobs.to(logprob_dtype).to(DEVICE),
        labels=labels.to(DEVICE), teacher_lse=torch.logsumexp(teacher, -1).float().to(DEVICE),
        lse_t={tau: torch.logsumexp(teacher / tau, -1).float().to(DEVICE) for tau in TEMPERATURES + (0.5,)})


def run(case, backend, grad_scale=1.0, **kw):
    logits = case["student_logits"]
    tau = kw.get("temperature", 1.0)
    loss = kdlib.kd_loss(logits, case["topk_ids"], case["topk_logprobs"], labels=case["labels"],
                         teacher_lse=case["teacher_lse"], teacher_lse_at_temperature=case["lse_t"][tau],
                         backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss * grad_scale, logits)
    return loss.detach(), grad


def assert_close(dtype, ref, out):
    (v_ref, g_ref), (v_out, g_out) = ref, out
    rtol_v, rtol_g = TOLERANCES[dtype]
    assert g_out.dtype == dtype and torch.isfinite(g_out).all()
    torch.testing.assert_close(v_out, v_ref, rtol=rtol_v, atol=rtol_v)
    scale = g_ref.abs().max().float().clamp_min(1e-30)
    err = (g_out.float() - g_ref.float()).abs().max()
    assert err <= rtol_g * scale, f"grad max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_triton_matches_reference(divergence, tail, temperature):
    case = make_case(6, 4500, 70, id_dtype=torch.int32)
    kw = dict(divergence=divergence, tail=tail, temperature=temperature, ce_weight=0.5, beta=0.3)
    assert_close(torch.float32, run(case, "reference", **kw), run(case, "triton", **kw))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tail", TAILS)
def test_triton_forward_kl_shapes_ce(shape, tail):
    case = make_case(*shape, seed=2)
    for temperature in TEMPERATURES:
        kw = dict(tail=tail, temperature=temperature, ce_weight=1.0)
        assert_close(torch.float32, run(case, "reference", **kw), run(case, "triton", grad_scale=1.0, **kw))


@pytest.mark.parametrize("logits_dtype,logprob_dtype,id_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.uint16),
    (torch.float16, torch.float16, torch.int32),
    (torch.float32, torch.float16, torch.int64),
], ids=str)
def test_triton_dtypes(logits_dtype, logprob_dtype, id_dtype):
    case = make_case(5, 515, 16, logits_dtype=logits_dtype, logprob_dtype=logprob_dtype, id_dtype=id_dtype)
    for temperature in TEMPERATURES:
        kw = dict(temperature=temperature, ce_weight=0.5)
        assert_close(logits_dtype, run(case, "reference", **kw), run(case, "triton", **kw))


def test_triton_grad_output_peaked_and_ignored_rows():
    case = make_case(5, 300, 8, peaked=True, seed=4)
    kw = dict(temperature=2.0, ce_weight=0.5, divergence="jsd")
    assert_close(torch.float32, run(case, "reference", grad_scale=3.0, **kw),
                 run(case, "triton", grad_scale=3.0, **kw))
    case = make_case(4, 300, 8, ignore_frac=2.0)
    case["labels"][:] = -100
    value, grad = run(case, "triton", ce_weight=1.0, temperature=2.0)
    assert value.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_triton_fused_linear_matches_torch():
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab, k = 10, 8, 301, 6
    hidden = torch.randn(n, hdim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hdim, generator=g, requires_grad=True)
    teacher = torch.randn(n, vocab, generator=g)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k)
    labels = torch.randint(0, vocab, (n,), generator=g)
    out = []
    for backend in ("torch", "triton"):
        loss = kdlib.kd_loss_from_hidden(hidden, weight, ids, logprobs, labels=labels, ce_weight=0.5,
                                         backend=backend, chunk_size=4)
        out.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def test_launch_config_spans_blocks_in_these_tests():
    from triton_kernels.sparse_kd import launch_config

    assert launch_config(4500, 70)[:2] == (4096, 64)  # the shapes above really cross block boundaries
    for vocab in (37, 1000, 32000, 262144):
        block_v, block_k, num_warps = launch_config(vocab, 64)
        assert block_v >= 16 and block_v & (block_v - 1) == 0 and 1 <= num_warps <= 8
        assert block_v < 256 or block_v // (32 * num_warps) >= 8  # 16-byte loads of bf16 per thread


@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_triton_temperature_below_one(divergence, tail):
    case = make_case(5, 613, 9, seed=6)
    kw = dict(divergence=divergence, tail=tail, temperature=0.5, ce_weight=0.3, beta=0.4)
    assert_close(torch.float32, run(case, "reference", grad_scale=1.7, **kw),
                 run(case, "triton", grad_scale=1.7, **kw))


@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_triton_all_rows_ignored(divergence, tail):
    case = make_case(4, 300, 8, ignore_frac=2.0)
    case["labels"][:] = -100
    value, grad = run(case, "triton", ce_weight=1.0, temperature=2.0, divergence=divergence, tail=tail, beta=0.3)
    assert value.item() == 0.0 and torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


def test_triton_renormalize_reverse_kl_pinned_negative():
    # reverse KL against the renormalized teacher sums over S only (axolotl): here exactly P log P < 0
    n, vocab, k, mass = 3, 200, 5, 0.2
    g = torch.Generator().manual_seed(12)
    logq = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    off = torch.ones(n, vocab, dtype=torch.bool).scatter_(1, ids, False)
    log_off = torch.logsumexp(logits.masked_fill(~off, -torch.inf), -1, keepdim=True)
    logits = logits.scatter(1, ids, logq + log_off + math.log(mass / (1 - mass))).float()
    value = kdlib.kd_loss(logits.to(DEVICE), ids.to(DEVICE), logq.float().to(DEVICE), divergence="reverse_kl",
                          tail="renormalize", backend="triton")
    assert value.item() == pytest.approx(mass * math.log(mass), rel=1e-5) and value.item() < 0


# --- the student tail: estimate from the gathers, exact pass for rows where it would cancel ----------------
def _student_with_tail_fractions(vocab, k, fractions, temperature, seed=0):
    """fp32 logits [N, V] whose softmax(z / τ) puts exactly (in float64) ``fractions[r]`` outside the ids."""
    g = torch.Generator().manual_seed(seed)
    n = len(fractions)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    u = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    off = torch.ones(n, vocab, dtype=torch.bool).scatter_(1, ids, False)
    log_off = torch.logsumexp(u.masked_fill(~off, -torch.inf), -1, keepdim=True)
    weights = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2.0, -1)
    frac = torch.tensor(fractions, dtype=torch.float64).unsqueeze(1)
    u = u.scatter(1, ids, weights + log_off + torch.log1p(-frac) - torch.log(frac))
    return (u * temperature).float(), ids


@pytest.mark.parametrize("temperature", (1.0, 2.0, 0.5))
def test_triton_tail_exact_on_both_paths(temperature):
    from triton_kernels.sparse_kd import EXACT_TAIL_BELOW, row_stats

    vocab, k = 4500, 70
    # above the threshold: the estimate total − Σ_S; below: the exact membership pass (down to K = V-like
    # tails under the 1e-30 floor)
    fractions = [0.9, 0.3, 5e-2, 2 * EXACT_TAIL_BELOW, EXACT_TAIL_BELOW / 2, 1e-4, 1e-9, 1e-15, 1e-40]
    assert any(f >= EXACT_TAIL_BELOW for f in fractions) and any(f < EXACT_TAIL_BELOW for f in fractions)
    logits, ids = _student_with_tail_fractions(vocab, k, fractions, temperature)
    stats = row_stats(logits.to(DEVICE), ids.to(DEVICE), torch.zeros(len(fractions), dtype=torch.int64,
                      device=DEVICE), temperature, need_tail=True, log_tail_floor=LOG_TAIL_FLOOR, stats_type=RowStats)
    u = logits.double() / temperature  # the fp32 logits' own exact tail
    off = torch.ones_like(u, dtype=torch.bool).scatter_(1, ids, False)
    truth = (torch.logsumexp(u.masked_fill(~off, -torch.inf), -1) - torch.logsumexp(u, -1)).clamp_min(LOG_TAIL_FLOOR)
    # 2e-5 relative on the tail mass, plus fp32 rounding of log T itself (|log T| · 2^-23)
    err = (stats.log_tail.cpu().double() - truth).abs()
    assert (err <= 2e-5 + truth.abs() * 2**-23).all(), err.tolist()
    # and the whole loss against the reference (grads included) on the rows above the 1e-30 floor: below it
    # the reference's clamp has zero gradient while the closed form keeps the unclamped one
    rows = [r for r, f in enumerate(fractions) if f > 1e-30]
    logits, ids = logits[rows], ids[rows]
    teacher = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logprobs = torch.log_softmax(teacher, -1).gather(1, ids).float()  # teacher on the same ids
    case = dict(student_logits=logits.to(DEVICE).requires_grad_(True), topk_ids=ids.to(DEVICE),
                topk_logprobs=logprobs.to(DEVICE), labels=torch.randint(0, vocab, (len(rows),)).to(DEVICE),
                teacher_lse=torch.logsumexp(teacher, -1).float().to(DEVICE),
                lse_t={temperature: torch.logsumexp(teacher / temperature, -1).float().to(DEVICE)})
    for divergence in ("forward_kl", "reverse_kl"):
        kw = dict(divergence=divergence, tail="bucket", temperature=temperature, ce_weight=0.5)
        assert_close(torch.float32, run(case, "reference", **kw), run(case, "triton", **kw))


def test_triton_row_stats_takes_the_floor_and_record_from_the_caller():
    from triton_kernels.sparse_kd import row_stats

    # K = V: the student's tail is exactly 0, so log T is the floor kdlib passes (triton_kernels keeps no copy)
    logits = torch.randn(3, 37, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ids = torch.arange(37).repeat(3, 1).to(DEVICE)
    for floor in (LOG_TAIL_FLOOR, math.log(1e-10)):
        stats = row_stats(logits, ids, torch.zeros(3, dtype=torch.int64, device=DEVICE), 2.0, need_tail=True,
                          log_tail_floor=floor, stats_type=RowStats)
        assert isinstance(stats, RowStats)
        torch.testing.assert_close(stats.log_tail.cpu(), torch.full((3,), floor), rtol=0, atol=1e-5)


# --- sample and hybrid targets: the same kernels (weighted ids as the support, duplicates written alike) ------
def _weighted_case(kind, n, vocab, head, n_slots, n_draws, tau, ts, seed=0, ignore_frac=0.25):
    from tests.test_losses_targets import make_hybrid

    logits, head_ids, head_lp, kw, _ = make_hybrid(n, vocab, head=head, n_draws=n_draws, tau=tau, ts=ts,
                                                   dtype=torch.float32, seed=seed, n_slots=n_slots,
                                                   ignore_some=False)
    g = torch.Generator().manual_seed(seed + 1)
    kw["labels"][torch.rand(n, generator=g) < ignore_frac] = -100
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items() if k != "temperature"}
    args = (head_ids.to(DEVICE), head_lp.float().to(DEVICE)) if kind == "hybrid" else ()
    return logits.to(DEVICE).requires_grad_(True), args, kw


def _run_weighted(logits, args, kw, backend, grad_scale=1.0, **options):
    loss = kdlib.kd_loss(logits, *args, backend=backend, **kw, **options)
    (grad,) = torch.autograd.grad(loss * grad_scale, logits)
    return loss.detach(), grad


@pytest.mark.parametrize("kind", ["sample", "hybrid"])
@pytest.mark.parametrize("tau,ts", [(1.0, 1.0), (2.0, 1.0), (2.0, 2.0)])
def test_triton_sampled_and_hybrid_match_reference(kind, tau, ts):
    # V = 4500 spans two BLOCK_V blocks; H = 8 + W = 64 slots span two BLOCK_K = 64 blocks; padding slots hold
    # id 0, also a head id (the duplicate writes must agree); grad_output 1.7
    logits, args, kw = _weighted_case(kind, 6, 4500, 8, 64, 200, tau, ts)
    options = dict(temperature=tau, ce_weight=0.5)
    assert_close(torch.float32, _run_weighted(logits, args, kw, "reference", 1.7, **options),
                 _run_weighted(logits, args, kw, "triton", 1.7, **options))


@pytest.mark.parametrize("kind", ["sample", "hybrid"])
def test_triton_sampled_and_hybrid_odd_shapes_and_ignored_rows(kind):
    # V = 37 (one ragged block), one slot and a one-id head
    logits, args, kw = _weighted_case(kind, 3, 37, 1, 1, 1, 2.0, 1.0, seed=3)
    assert_close(torch.float32, _run_weighted(logits, args, kw, "reference", temperature=2.0, ce_weight=1.0),
                 _run_weighted(logits, args, kw, "triton", temperature=2.0, ce_weight=1.0))
    kw["labels"][:] = -100
    value, grad = _run_weighted(logits, args, kw, "triton", temperature=2.0, ce_weight=1.0)
    assert value.item() == 0.0 and torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


def test_triton_fused_linear_hybrid_matches_torch():
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 10, 8, 301
    hidden = torch.randn(n, hdim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hdim, generator=g, requires_grad=True)
    _, args, kw = _weighted_case("hybrid", n, vocab, 4, 12, 30, 2.0, 1.0, seed=5)
    out = []
    for backend in ("torch", "triton"):
        loss = kdlib.kd_loss_from_hidden(hidden, weight, *args, ce_weight=0.5, temperature=2.0, backend=backend,
                                         chunk_size=4, **kw)
        out.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
