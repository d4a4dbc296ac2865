"""kd_loss_from_hidden's in-place PyTorch pass (fused_linear.ScratchPass) and its CE-only mode.

Shape notation: N rows, H hidden, V vocabulary, K teacher top-k, C rows per chunk.

Every case against kd_loss on the materialized logits (the fused pass that keeps its logits) and, for CE only,
F.cross_entropy: odd chunkings (C not dividing N, C > N, C = 1), grad_output ≠ 1, τ ≠ 1 with and without CE
(the pass's three gradient branches), forward-only values equal to the training values, float64 and float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.allocations import FreshAllocations

import kdlib

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make(n, hdim, vocab, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=g, dtype=torch.float64) * 2 / hdim**0.5).to(dtype)
    bias = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::3] = -100
    labels[1] = ids[1, 0]  # a label inside the support: its entry is written by the support scatter
    return dict(hidden=hidden, weight=weight, bias=bias, ids=ids.int(), logprobs=logprobs.float(), labels=labels,
                lse=torch.logsumexp(teacher, -1).float(), lse_t2=torch.logsumexp(teacher / 2, -1).float())


def value_and_grads(fn, c, grad_scale):
    leaves = [c[name].detach().clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    loss = fn(*leaves)
    return (loss.detach(), *torch.autograd.grad(loss * grad_scale, leaves))


CASES = [  # (N, H, V, K, chunk_size)
    (29, 8, 173, 7, 5),  # chunks do not divide N: a short last chunk
    (6, 4, 31, 3, 64),  # one chunk larger than N
    (7, 3, 19, 19, 1),  # C = 1; K = V (every id in the support)
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tau,ce_weight,divergence,tail", [
    (1.0, 1.0, "forward_kl", "bucket"), (2.0, 0.5, "forward_kl", "bucket"), (2.0, 0.0, "jsd", "none"),
    (1.0, 0.0, "reverse_kl", "renormalize"), (0.7, 1.0, "tvd", "bucket")])
def test_scratch_pass_matches_materialized(dtype, tol, case, tau, ce_weight, divergence, tail):
    n, hdim, vocab, k, chunk = case
    c = make(n, hdim, vocab, k, dtype)
    kw = dict(labels=c["labels"], teacher_lse=c["lse"], teacher_lse_at_temperature=c["lse_t2"] if tau == 2.0 else None,
              temperature=tau, ce_weight=ce_weight, divergence=divergence, tail=tail, backend="torch")
    if tau == 0.7:
        kw["teacher_lse_at_temperature"] = None
        kw["tail"] = "renormalize"
    ref = value_and_grads(lambda h, w, b: kdlib.kd_loss(h @ w.t() + b, c["ids"], c["logprobs"], **kw), c, -2.5)
    out = value_and_grads(lambda h, w, b: kdlib.kd_loss_from_hidden(h, w, c["ids"], c["logprobs"], lm_head_bias=b,
                                                                   chunk_size=chunk, **kw), c, -2.5)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    with torch.no_grad():  # forward only: the CE logsumexp comes first, exp((z - m)/τ) overwrites the buffer
        value = kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["logprobs"], lm_head_bias=c["bias"],
                                          chunk_size=chunk, **kw)
    torch.testing.assert_close(value, out[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_only_from_hidden_is_cross_entropy(dtype, tol, reduction):
    c = make(23, 6, 57, 1, dtype, seed=3)
    ref = value_and_grads(lambda h, w, b: F.cross_entropy(h @ w.t() + b, c["labels"], reduction=reduction), c, 0.3)
    out = value_and_grads(lambda h, w, b: kdlib.kd_loss_from_hidden(h, w, lm_head_bias=b, labels=c["labels"],
                                                                   ce_weight=1.0, kd_weight=0.0, chunk_size=4,
                                                                   reduction=reduction), c, 0.3)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_ce_only_needs_kd_weight_zero():
    c = make(4, 4, 20, 1, torch.float32)
    with pytest.raises(ValueError, match="no teacher targets"):
        kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], labels=c["labels"], ce_weight=1.0)


def test_scratch_pass_allocates_one_chunk_buffer_per_call():
    """τ = 1 with the gradient: one [C, V] buffer for the whole call, whatever the number of chunks (N / C = 8),
    and never a [C, V] gradient: the pass writes it over the logits."""
    n, hdim, vocab, k, chunk = 40, 6, 301, 5, 5
    c = make(n, hdim, vocab, k, torch.float32, seed=5)
    leaves = [c[name].requires_grad_(True) for name in ("hidden", "weight")]
    with FreshAllocations() as mode:
        loss = kdlib.kd_loss_from_hidden(*leaves, c["ids"], c["logprobs"], labels=c["labels"], ce_weight=1.0,
                                         teacher_lse=c["lse"], chunk_size=chunk, backend="torch")
        torch.autograd.grad(loss, leaves)
    assert mode.count(chunk * vocab) == 1
    assert mode.largest <= max(chunk * vocab, vocab * hdim)
