"""Triton sparse-KD kernels (run on CPU tensors under TRITON_INTERPRET=1) vs the naive reference.

Shape notation: N rows, V vocabulary, K teacher top-k. Shapes are small: the interpreter is slow.
V = 1100 spans two BLOCK_V = 1024 blocks with a ragged tail; K = 70 spans two BLOCK_K = 64 blocks.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import kdlib
from kdlib.losses import DIVERGENCES, TAILS

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TEMPERATURES = (1.0, 2.0)
# (N, V, K)
SHAPES = ((6, 1100, 70), (3, 37, 1), (3, 37, 37))
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 1.6e-2), torch.float16: (2e-5, 2e-3)}


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
        lse_t={tau: torch.logsumexp(teacher / tau, -1).float().to(DEVICE) for tau in TEMPERATURES})


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
    case = make_case(6, 1100, 70, id_dtype=torch.int32)
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
