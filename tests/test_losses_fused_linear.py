"""kd_loss_from_hidden vs kd_loss on materialized logits: values, grads, and no [N, V] allocation.

Shape notation: N rows, H hidden, V vocabulary, K teacher top-k.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.allocations import FreshAllocations

import kdlib
from kdlib.losses import DIVERGENCES, TAILS

# (N, H, V, K, chunk_size)
SHAPES = ((37, 16, 301, 8, 8), (5, 4, 50, 50, 2), (9, 8, 77, 1, 16))


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make(n, hdim, vocab, k, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hdim, generator=g, dtype=torch.float64) / hdim**0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(True) if bias else None
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100
    return dict(hidden=hidden, weight=weight, bias=b, ids=ids.int(), logprobs=logprobs.float(), labels=labels,
                lse=torch.logsumexp(teacher, -1).float(), lse_t2=torch.logsumexp(teacher / 2, -1).float())


def both(c, grad_scale=1.0, **kw):
    params = [p for p in (c["hidden"], c["weight"], c["bias"]) if p is not None]
    chunk = kw.pop("chunk_size", 8)
    common = dict(labels=c["labels"], teacher_lse=c["lse"], teacher_lse_at_temperature=c["lse_t2"], **kw)
    logits = c["hidden"] @ c["weight"].t()
    if c["bias"] is not None:
        logits = logits + c["bias"]
    ref = kdlib.kd_loss(logits, c["ids"], c["logprobs"], backend="torch", **common)
    ref_grads = torch.autograd.grad(ref * grad_scale, params)
    out = kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["logprobs"], lm_head_bias=c["bias"],
                                    chunk_size=chunk, backend="torch", **common)
    out_grads = torch.autograd.grad(out * grad_scale, params)
    return (ref, *ref_grads), (out, *out_grads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("divergence,tail,temperature", [
    ("forward_kl", "bucket", 1.0), ("forward_kl", "bucket", 2.0), ("reverse_kl", "renormalize", 2.0),
    ("jsd", "none", 2.0), ("tvd", "bucket", 1.0)])
def test_from_hidden_matches_materialized(shape, divergence, tail, temperature):
    n, hdim, vocab, k, chunk = shape
    c = make(n, hdim, vocab, k)
    ref, out = both(c, grad_scale=1.7, divergence=divergence, tail=tail, temperature=temperature, ce_weight=0.5,
                    chunk_size=chunk)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_from_hidden_every_divergence_and_tail(divergence, tail, temperature):
    c = make(13, 8, 97, 5, seed=3)
    ref, out = both(c, grad_scale=1.3, divergence=divergence, tail=tail, temperature=temperature, ce_weight=0.5,
                    beta=0.3, chunk_size=4)
    for a, b in zip(ref, out):  # value, grad hidden, grad weight, grad bias
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-5, atol=2e-6)


def test_from_hidden_bf16_and_sum_reduction():
    c = make(24, 16, 211, 8, dtype=torch.bfloat16, bias=False)
    ref, out = both(c, ce_weight=1.0, reduction="sum", chunk_size=5)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(ref[1:], out[1:]):
        assert b.dtype == torch.bfloat16
        assert (a.float() - b.float()).abs().max() <= 3e-2 * a.float().abs().max()


def test_from_hidden_gradcheck_float64():
    c = make(6, 3, 13, 4, dtype=torch.float64)

    def fn(hidden, weight, bias):
        return kdlib.kd_loss_from_hidden(hidden, weight, c["ids"], c["logprobs"], lm_head_bias=bias,
                                         labels=c["labels"], ce_weight=0.3, temperature=2.0, teacher_lse=c["lse"],
                                         teacher_lse_at_temperature=c["lse_t2"], chunk_size=4, backend="torch")

    assert torch.autograd.gradcheck(fn, (c["hidden"], c["weight"], c["bias"]), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
def test_from_hidden_all_ignored(divergence, tail):
    c = make(6, 4, 20, 3)
    c["labels"][:] = -100
    loss = kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["logprobs"], lm_head_bias=c["bias"],
                                     labels=c["labels"], ce_weight=1.0, chunk_size=4, divergence=divergence,
                                     tail=tail, temperature=2.0, teacher_lse=c["lse"],
                                     teacher_lse_at_temperature=c["lse_t2"])
    grads = torch.autograd.grad(loss, (c["hidden"], c["weight"], c["bias"]))
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_from_hidden_never_allocates_n_by_v():
    n, hdim, vocab, chunk = 256, 16, 1000, 16
    c = make(n, hdim, vocab, 8, bias=False)
    with FreshAllocations() as mode:
        loss = kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["logprobs"], labels=c["labels"],
                                         ce_weight=0.5, temperature=2.0, teacher_lse=c["lse"],
                                         teacher_lse_at_temperature=c["lse_t2"], chunk_size=chunk)
        torch.autograd.grad(loss, (c["hidden"], c["weight"]))
    # chunk logits / chunk gradient [16, V] and the [V, H] weight gradient; never [N, V]
    assert mode.largest <= max(chunk * vocab, vocab * hdim)
    assert mode.largest < n * vocab // 8


def test_from_hidden_errors():
    c = make(4, 4, 20, 3)
    with pytest.raises(ValueError, match="lm_head_weight must be"):
        kdlib.kd_loss_from_hidden(c["hidden"], c["weight"][:, :3], c["ids"], c["logprobs"])
    with pytest.raises(ValueError, match="reduction"):
        kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["logprobs"], reduction="none")
    with pytest.raises(ValueError, match="needs labels"):
        kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["logprobs"], ce_weight=1.0)


    def count(self, numel):
        return sum(n == numel for n, _ in self.allocs)


# N*H, V*H, C*V and N*K all differ, so each buffer kind is recognisable by its size
N_ROWS, HID, VOCAB, TOPK, CHUNK = 40, 24, 301, 8, 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_from_hidden_low_precision_grad_weight_has_no_per_chunk_vh_temporaries(dtype):
    c = make(N_ROWS, HID, VOCAB, TOPK, dtype=dtype, seed=2)
    kw = dict(lm_head_bias=c["bias"], labels=c["labels"], ce_weight=0.5, temperature=2.0, teacher_lse=c["lse"],
              teacher_lse_at_temperature=c["lse_t2"], chunk_size=CHUNK, backend="torch")
    with FreshAllocations() as fwd:
        loss = kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["logprobs"], **kw)
    # exactly the fp32 accumulator and the one cast to the parameter dtype, whatever the number of chunks
    # (N / C = 10): a per-chunk (g^T h).to(fp32) would add two [V, H] buffers per chunk
    vh = [d for n, d in fwd.allocs if n == VOCAB * HID]
    assert sorted(map(str, vh)) == sorted([str(torch.float32), str(dtype)])
    with FreshAllocations() as bwd:
        gh, gw, gb = torch.autograd.grad(loss * 1.5, (c["hidden"], c["weight"], c["bias"]))
    assert bwd.count(VOCAB * HID) == 1 and bwd.count(N_ROWS * HID) == 1  # the returned gradients only
    assert (gh.dtype, gw.dtype, gb.dtype) == (dtype, dtype, dtype)
    # and the values: against kd_loss on materialized logits of the same low-precision inputs
    ref, out = both(c, grad_scale=1.5, ce_weight=0.5, temperature=2.0, chunk_size=CHUNK)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(ref[1:], out[1:]):
        assert (a.float() - b.float()).abs().max() <= 3e-2 * a.float().abs().max()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_from_hidden_without_grad_is_forward_only(mode):
    c = make(N_ROWS, HID, VOCAB, TOPK, seed=4)
    kw = dict(lm_head_bias=c["bias"], labels=c["labels"], ce_weight=0.5, temperature=2.0, teacher_lse=c["lse"],
              teacher_lse_at_temperature=c["lse_t2"], chunk_size=CHUNK, backend="torch")
    args = (c["hidden"], c["weight"], c["ids"], c["logprobs"])
    with FreshAllocations() as with_grad:
        expected = kdlib.kd_loss_from_hidden(*args, **kw)
    assert with_grad.count(VOCAB * HID) >= 1 and with_grad.count(N_ROWS * HID) >= 1
    if mode == "nothing_requires_grad":
        args = (c["hidden"].detach(), c["weight"].detach(), c["ids"], c["logprobs"])
        kw["lm_head_bias"] = c["bias"].detach()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "nothing_requires_grad": torch.enable_grad}[mode]
    with context(), FreshAllocations() as eval_only:
        value = kdlib.kd_loss_from_hidden(*args, **kw)
    assert not value.requires_grad
    assert eval_only.count(VOCAB * HID) == 0 and eval_only.count(N_ROWS * HID) == 0 and eval_only.count(VOCAB) == 0
    # no [C, V] gradient per chunk either: only the chunk logits and the pass's own temporaries remain
    assert eval_only.count(CHUNK * VOCAB) < with_grad.count(CHUNK * VOCAB)
    torch.testing.assert_close(value, expected.detach(), rtol=0, atol=0)


# --- sample and hybrid targets: chunked like top-k, against kd_loss on the materialized logits -------------------
@pytest.mark.parametrize("kind", ["sample", "hybrid"])
@pytest.mark.parametrize("tau,ts", [(1.0, 1.0), (2.0, 1.0), (2.0, 2.0), (1.0, 0.7)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_from_hidden_sampled_and_hybrid_match_materialized(kind, tau, ts, dtype, tol):
    from tests.test_losses_targets import make_hybrid

    c = make(13, 8, 97, 1, dtype=dtype, seed=4)
    _, head_ids, head_lp, kw, _ = make_hybrid(13, 97, head=5, n_draws=30, tau=tau, ts=ts, seed=4, n_slots=20)
    args = (head_ids, head_lp) if kind == "hybrid" else ()
    params = [c["hidden"], c["weight"], c["bias"]]
    logits = c["hidden"] @ c["weight"].t() + c["bias"]
    ref = kdlib.kd_loss(logits, *args, ce_weight=0.5, backend="torch", **kw)
    ref_grads = torch.autograd.grad(ref * 1.7, params)
    out = kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], *args, lm_head_bias=c["bias"], ce_weight=0.5,
                                    chunk_size=4, backend="torch", **kw)
    out_grads = torch.autograd.grad(out * 1.7, params)
    for a, b in zip((ref, *ref_grads), (out, *out_grads)):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    with torch.no_grad():  # eval: the loss only, the same value
        torch.testing.assert_close(kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], *args, lm_head_bias=c["bias"],
                                                             ce_weight=0.5, chunk_size=4, **kw), ref.detach(),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_only_skips_ignored_rows_exactly(reduction):
    """CE only (kd_weight=0): ignored rows leave the matmuls; value and grads equal F.cross_entropy (float64)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 15, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 15))
    labels[:, ::4] = -100
    got = kdlib.kd_loss_from_hidden(hidden, weight, labels=labels, ce_weight=1.0, kd_weight=0.0,
                                    reduction=reduction, chunk_size=7)
    want = torch.nn.functional.cross_entropy((hidden @ weight.T).reshape(-1, 50), labels.reshape(-1),
                                             ignore_index=-100, reduction=reduction)
    g_got = torch.autograd.grad(got, (hidden, weight))
    g_want = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    assert g_got[0].shape == hidden.shape and bool((g_got[0][:, ::4] == 0).all())
    labels[:] = -100
    none = kdlib.kd_loss_from_hidden(hidden, weight, labels=labels, ce_weight=1.0, kd_weight=0.0, reduction=reduction)
    assert float(none) == 0.0
