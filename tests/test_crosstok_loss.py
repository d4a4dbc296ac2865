"""kdlib.crosstok.crosstok_loss: the vectorized loss against its naive twin, gradients, edge cases, errors.

Shapes are odd on purpose (B=3, T_s=7, V_s=13, T=5, K=4); alignments, teacher rows and the vocabulary map are
random but valid (the map is injective, as one built from two vocabularies is).
"""

from __future__ import annotations

import pytest
import torch

import kdlib
from kdlib.crosstok import EXACT, NONE, ULD, crosstok_loss, crosstok_loss_reference

B, TS, VS, T, K, VT = 3, 7, 13, 5, 4, 11


def _case(seed: int = 0, *, kinds=(NONE, ULD, EXACT), unmapped: int = 3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, TS, VS, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, VS, (B, TS), generator=g)
    labels[0, -1] = -100
    labels[2, 3] = -100
    kinds = torch.tensor(kinds)
    align = kinds[torch.randint(0, len(kinds), (B, TS), generator=g)]
    pos = torch.randint(0, T, (B, TS), generator=g)
    pos[align == NONE] = -1
    ids = torch.stack([torch.randperm(VT, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    logits_t = torch.randn(B, T, VT, generator=g, dtype=torch.float64) * 2
    lse = torch.logsumexp(logits_t, -1)
    logprobs = (logits_t - lse.unsqueeze(-1)).gather(-1, ids)
    lse2 = torch.logsumexp(logits_t / 2, -1)
    vmap = torch.randperm(VS, generator=g)[:VT].clone()
    vmap[torch.randperm(VT, generator=g)[:unmapped]] = -1
    return dict(z=z, labels=labels, pos=pos, align=align, ids=ids, logprobs=logprobs, vmap=vmap, lse=lse, lse2=lse2)


def _both(c, z=None, **kw):
    z = c["z"] if z is None else z
    args = (c["labels"], c["pos"], c["align"], c["ids"], c["logprobs"], c["vmap"])
    extra = dict(teacher_lse=c["lse"], teacher_lse_at_temperature=c["lse2"] if kw.get("temperature") == 2.0 else None)
    return crosstok_loss(z, *args, **extra, **kw), crosstok_loss_reference(z, *args, **extra, **kw)


SETTINGS = [dict(), dict(tail="renormalize"), dict(ce_weight=0.3, kd_weight=0.7), dict(temperature=2.0),
            dict(temperature=2.0, tail="renormalize", tau_squared=False), dict(reduction="sum"),
            dict(temperature=0.5, tail="renormalize", ce_weight=1.0)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_vectorized_matches_reference_values_and_gradients(settings):
    c = _case(1)
    z = c["z"].clone().requires_grad_(True)
    fast, ref = _both(c, z, **settings)
    g_fast, = torch.autograd.grad(fast, z)
    g_ref, = torch.autograd.grad(ref, z)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)


def test_gradcheck_float64():
    c = _case(2)
    z = c["z"][:, :5].clone().requires_grad_(True)
    c = {**c, "labels": c["labels"][:, :5], "pos": c["pos"][:, :5], "align": c["align"][:, :5]}

    def f(x):
        return crosstok_loss(x, c["labels"], c["pos"], c["align"], c["ids"], c["logprobs"], c["vmap"], ce_weight=0.4,
                             temperature=1.5, tail="renormalize")

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_grad_output_not_one_with_reduction_none():
    c = _case(3)
    z = c["z"].clone().requires_grad_(True)
    fast, ref = _both(c, z, reduction="none")
    assert fast.shape == (B, TS)
    weights = torch.randn(B, TS, dtype=torch.float64)
    g_fast, = torch.autograd.grad(fast, z, weights)
    g_ref, = torch.autograd.grad(ref, z, weights)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)
    assert (fast[c["labels"] == -100] == 0).all()


def test_all_positions_unaligned_is_weighted_cross_entropy():
    c = _case(4, kinds=(NONE,))
    z = c["z"].clone().requires_grad_(True)
    loss = crosstok_loss(z, c["labels"], c["pos"], c["align"], c["ids"], c["logprobs"], c["vmap"], ce_weight=0.25,
                         kd_weight=0.5)
    ce = torch.nn.functional.cross_entropy(z.flatten(0, 1), c["labels"].flatten(), ignore_index=-100)
    assert loss.item() == pytest.approx(0.75 * ce.item(), rel=1e-12)
    g, = torch.autograd.grad(loss, z)
    g_ce, = torch.autograd.grad(0.75 * ce, z)
    torch.testing.assert_close(g, g_ce)


def test_no_valid_position_is_zero_with_zero_gradient():
    c = _case(5)
    z = c["z"].clone().requires_grad_(True)
    labels = torch.full_like(c["labels"], -100)
    loss = crosstok_loss(z, labels, c["pos"], c["align"], c["ids"], c["logprobs"], c["vmap"])
    assert loss.item() == 0.0
    g, = torch.autograd.grad(loss, z)
    assert (g == 0).all()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_exact_everywhere_with_identity_map_is_kd_loss(tail):
    """Same tokenizer on both sides: EXACT at every position with the identity map is kdlib.kd_loss."""
    g = torch.Generator().manual_seed(6)
    V = 17
    z = torch.randn(2, 6, V, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(2, 6, V, generator=g, dtype=torch.float64) * 3, -1)
    logprobs, ids = teacher.topk(5, -1)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[:, -1] = -100
    pos = torch.arange(6).expand(2, 6)
    align = torch.full((2, 6), EXACT)
    ours = crosstok_loss(z, labels, pos, align, ids, logprobs, torch.arange(V), ce_weight=0.5, kd_weight=0.5,
                         tail=tail)
    theirs = kdlib.kd_loss(z, ids, logprobs, labels=labels, ce_weight=0.5, kd_weight=0.5, tail=tail,
                           backend="reference")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)


def test_exact_row_whose_topk_maps_to_nothing_falls_back_to_uld():
    c = _case(7, kinds=(EXACT,))
    none_mapped = torch.full_like(c["vmap"], -1)
    args = (c["z"], c["labels"], c["pos"])
    as_exact = crosstok_loss(*args, c["align"], c["ids"], c["logprobs"], none_mapped)
    as_uld = crosstok_loss(*args, torch.full_like(c["align"], ULD), c["ids"], c["logprobs"], none_mapped)
    assert as_exact.item() == pytest.approx(as_uld.item(), rel=1e-12)


def test_float32_logits_close_to_float64():
    c = _case(8)
    fast32 = crosstok_loss(c["z"].float(), c["labels"], c["pos"], c["align"], c["ids"], c["logprobs"].half(),
                           c["vmap"])
    fast64 = crosstok_loss(c["z"], c["labels"], c["pos"], c["align"], c["ids"], c["logprobs"].half().double(),
                           c["vmap"])
    assert fast32.dtype == torch.float32
    assert fast32.item() == pytest.approx(fast64.item(), rel=1e-5)


def test_errors_say_what_is_wrong():
    c = _case(9)
    args = (c["z"], c["labels"], c["pos"], c["align"], c["ids"], c["logprobs"], c["vmap"])
    with pytest.raises(ValueError, match="forward KL"):
        crosstok_loss(*args, options=kdlib.KDLossOptions(divergence="reverse_kl"))
    with pytest.raises(ValueError, match="tail='bucket' or 'renormalize'"):
        crosstok_loss(*args, tail="none")
    with pytest.raises(TypeError, match="unexpected keyword.*'backend'"):
        crosstok_loss(*args, backend="torch")
    with pytest.raises(ValueError, match="needs teacher_lse"):
        crosstok_loss(*args, temperature=2.0)
    with pytest.raises(ValueError, match="temperature must be"):
        crosstok_loss(*args, temperature=-1.0)
    bad_pos = c["pos"].clone()
    bad_pos[c["align"] != NONE] = T
    with pytest.raises(ValueError, match="outside"):
        crosstok_loss(c["z"], c["labels"], bad_pos, *args[3:])
    with pytest.raises(ValueError, match=r"labels must be \[B, T_s\]"):
        crosstok_loss(c["z"], c["labels"][:, :3], *args[2:])


def test_bfloat16_logits_backward_in_their_dtype():
    c = _case(10)
    z = c["z"].to(torch.bfloat16).requires_grad_(True)
    loss = crosstok_loss(z, c["labels"], c["pos"], c["align"], c["ids"], c["logprobs"].float(), c["vmap"],
                         temperature=2.0, teacher_lse=c["lse"].float(), teacher_lse_at_temperature=c["lse2"].float())
    loss.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()
    _, ref = _both(c, z.detach().double(), temperature=2.0)
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
