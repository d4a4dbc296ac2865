"""Packed ensembles (kdlib.ensemble.packed) against looped members: a real synthetic Zarr cache, real transformers
GPT-2 members (tiny local configs), real AdamW, per-member weights, weight decay and clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import kdlib
from kdlib.batch import read_batch
from kdlib.ensemble import (PackedEnsemble, UnsupportedModuleError, check_per_member_optimizer,
                            clip_grad_norm_per_member, member_mean, packed_kd_loss, packed_step)
from tests.cachefactory import make_synthetic_cache

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

V, T, K, M = 96, 12, 6, 3


def make_gpt() -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"  # SDPA has no vmap batching rule on the CPU
    return GPT2LMHeadModel(config)


def seeded_gpt(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return make_gpt()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path, _ = make_synthetic_cache(tmp_path_factory.mktemp("ens") / "cache", num_sequences=24, seq_len=T, topk=K,
                                   vocab_size=V, temperatures=(2.0,), shard_seqs=8, chunk_seqs=4)
    return kdlib.open_cache(path)


def batches(cache, steps: int, batch_size: int = 4):
    return [read_batch(cache, range(i * batch_size, (i + 1) * batch_size)) for i in range(steps)]


def test_members_get_their_seeds_and_the_caller_rng_is_kept():
    state = torch.random.get_rng_state()
    ensemble = PackedEnsemble(make_gpt, seeds=[5, 7, 5])
    assert torch.equal(torch.random.get_rng_state(), state)
    wte = ensemble.stacked_parameters()["transformer.wte.weight"]  # [M, V, d]
    assert wte.shape == (3, V, 16)
    assert torch.equal(wte[0], seeded_gpt(5).transformer.wte.weight)
    assert torch.equal(wte[0], wte[2]) and not torch.equal(wte[0], wte[1])
    assert len(list(ensemble.parameters())) == len(list(seeded_gpt(0).parameters()))


def test_packed_logits_equal_each_members_own(cache):
    ensemble = PackedEnsemble(make_gpt, M)
    ids = read_batch(cache, range(5))["input_ids"].long()
    logits = ensemble.logits(ids)  # [M, B, T, V]
    assert logits.shape == (M, 5, T, V)
    for m in range(M):
        torch.testing.assert_close(logits[m], seeded_gpt(m)(ids).logits, rtol=1e-5, atol=1e-5)


def test_member_losses_equal_single_member_losses(cache):
    ensemble = PackedEnsemble(make_gpt, M)
    batch = read_batch(cache, range(6))
    batch["labels"][1, 3:] = -100  # some ignored positions
    logits = ensemble.logits(batch["input_ids"].long())
    losses = packed_kd_loss(logits, batch, ce_weight=0.3, temperature=2.0)
    assert losses.shape == (M,)
    for m in range(M):
        single = kdlib.kd_loss_from_batch(logits[m], batch, ce_weight=0.3, temperature=2.0)
        torch.testing.assert_close(losses[m], single, rtol=1e-6, atol=1e-6)


def test_sampled_targets_are_broadcast_to_every_member_too(cache):
    """A sampled batch (issue 10's ``sample_*`` arrays and the 0-dim ``sample_temperature``) goes through the same
    call; each member's loss is its own single-member loss."""
    batch = read_batch(cache, range(4))
    counts = torch.randint(0, 4, batch["topk_ids"].shape, generator=torch.Generator().manual_seed(1))
    counts[..., 0] += 1  # every row has at least one draw
    sampled = {key: value for key, value in batch.items() if not key.startswith("topk_")}
    sampled.update(sample_ids=batch["topk_ids"], sample_counts=counts.to(torch.uint8),
                   sample_logprobs=batch["topk_logprobs"], sample_temperature=torch.tensor(1.0))
    ensemble = PackedEnsemble(make_gpt, M)
    logits = ensemble.logits(batch["input_ids"].long())
    losses = packed_kd_loss(logits, sampled, ce_weight=0.2)
    for m in range(M):
        torch.testing.assert_close(losses[m], kdlib.kd_loss_from_batch(logits[m], sampled, ce_weight=0.2))


def weighted_reference_loss(logits, batch, weights, **kw):
    """A single member's weighted mean written out: Σ_b w_b Σ_t row / Σ_b w_b #valid_b."""
    rows = kdlib.kd_loss_from_batch(logits, batch, reduction="none", **kw)  # [B, T]
    valid = (batch["labels"] != -100).to(rows.dtype)
    numerator, denominator = (rows.sum(1) * weights).sum(), (valid.sum(1) * weights).sum()
    return numerator / denominator if denominator > 0 else numerator * 0.0  # a member seeing no sequence


@pytest.mark.parametrize("bagging", [False, True])
def test_packed_training_equals_looped_members_after_three_adamw_steps(cache, bagging):
    steps, kw = 3, dict(ce_weight=0.5, temperature=2.0)
    data = batches(cache, steps)
    generator = torch.Generator().manual_seed(0)
    # bagging multiplicities per member and sequence (0..2, as a draw with replacement gives)
    weights = [torch.randint(0, 3, (M, 4), generator=generator).float() for _ in range(steps)] if bagging else None
    if bagging:
        weights[0][1] = 0.0  # a member that sees nothing in a step: zero loss and gradient
    ensemble = PackedEnsemble(make_gpt, M)
    opt = torch.optim.AdamW(ensemble.parameters(), lr=1e-2, weight_decay=0.1)
    looped = [seeded_gpt(m) for m in range(M)]
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) for model in looped]
    for step, batch in enumerate(data):
        w = None if weights is None else weights[step]
        losses = packed_step(ensemble, batch, opt, sample_weights=w, max_grad_norm=0.5, **kw)
        for m, (model, o) in enumerate(zip(looped, opts)):
            logits = model(batch["input_ids"].long()).logits
            if w is None:
                loss = kdlib.kd_loss_from_batch(logits, batch, **kw)
            else:
                loss = weighted_reference_loss(logits, batch, w[m], **kw)
            o.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            o.step()
            torch.testing.assert_close(losses[m], loss.detach(), rtol=1e-5, atol=1e-5)
    unstacked = ensemble.members()
    for m in range(M):
        for (name, p), (_, q) in zip(unstacked[m].named_parameters(), looped[m].named_parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=f"member {m} {name}")
    moved = [(p - q).abs().max() for p, q in zip(unstacked[0].parameters(), seeded_gpt(0).parameters())]
    assert max(moved) > 1e-3  # the test trained something


def test_clip_grad_norm_per_member_clips_each_member_by_its_own_norm():
    ensemble = PackedEnsemble(make_gpt, M)
    for i, p in enumerate(ensemble.parameters()):
        scale = torch.tensor([0.01, 1.0, 10.0]).view(-1, *([1] * (p.dim() - 1)))  # member 0 below the limit
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * scale
    reference = []
    for m, member in enumerate(ensemble.members()):
        for q, p in zip(member.parameters(), ensemble.parameters()):
            q.grad = p.grad[m].clone()
        norm = torch.nn.utils.clip_grad_norm_(member.parameters(), 1.0)
        reference.append((norm, [q.grad for q in member.parameters()]))
    norms = clip_grad_norm_per_member(ensemble, 1.0)
    for m, (norm, grads) in enumerate(reference):
        torch.testing.assert_close(norms[m], norm, rtol=1e-5, atol=0)
        for g, p in zip(grads, ensemble.parameters()):
            torch.testing.assert_close(p.grad[m], g, rtol=1e-5, atol=1e-7)
    assert norms[0] < 1.0 < norms[1]


def test_members_round_trip_and_keep_tied_weights(cache):
    ensemble = PackedEnsemble(make_gpt, M, seeds=[3, 4, 5])
    members = ensemble.members()
    assert members[1].lm_head.weight is members[1].transformer.wte.weight
    ids = read_batch(cache, range(2))["input_ids"].long()
    repacked = PackedEnsemble.from_members(members)
    torch.testing.assert_close(repacked.logits(ids), ensemble.logits(ids))


def test_member_mean_weights_and_all_ignored_rows():
    rows = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[4.0, 4.0], [8.0, 0.0]]])  # [M=2, B=2, T=2]
    valid = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(member_mean(rows, valid), torch.tensor([6.0 / 3, 16.0 / 3]))
    w = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(member_mean(rows, valid, w), torch.tensor([(2 * 3.0 + 3.0) / (2 * 2 + 1), 0.0]))
    nothing = torch.zeros(2, 2, dtype=torch.bool)  # all ignored: rows are 0 there (reduction="none")
    torch.testing.assert_close(member_mean(torch.zeros_like(rows), nothing), torch.zeros(2))


def test_all_ignored_batch_gives_zero_losses_and_gradients(cache):
    ensemble = PackedEnsemble(make_gpt, 2)
    batch = read_batch(cache, range(3))
    batch["labels"][:] = -100
    losses = packed_kd_loss(ensemble.logits(batch["input_ids"].long()), batch, ce_weight=0.5)
    losses.sum().backward()
    assert torch.equal(losses.detach(), torch.zeros(2))
    assert all(float(p.grad.abs().max()) == 0.0 for p in ensemble.parameters())


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)  # training mode updates running_mean in place

    def forward(self, x):
        return self.norm(self.proj(x))


class Tally(nn.Module):
    def __init__(self):
        super().__init__()
        self.total = torch.zeros(4)  # a plain tensor attribute, not a buffer: shared by all members

    def forward(self, x):
        self.total += x.sum(0)
        return x * self.total


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.tally = Tally()

    def forward(self, x):
        return self.tally(self.proj(x))


def test_buffers_are_per_member_so_batchnorm_statistics_update_like_separate_models():
    x = torch.randn(5, 4)
    ensemble = PackedEnsemble(WithBatchNorm, 2)
    out = ensemble(x)
    for m in range(2):
        torch.manual_seed(m)
        alone = WithBatchNorm()
        torch.testing.assert_close(out[m], alone(x))
        torch.testing.assert_close(ensemble.stacked_buffers()["norm.running_mean"][m], alone.norm.running_mean)


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        if (x * self.weight).sum() > 0:  # data-dependent Python control flow
            return x
        return -x


def test_unsupported_modules_raise_an_error_naming_the_submodule():
    x = torch.randn(5, 4)
    with pytest.raises(UnsupportedModuleError, match=r"'tally' \(Tally\).*in-place update.*register it as a buffer"):
        PackedEnsemble(Counter, 2)(x)
    with pytest.raises(UnsupportedModuleError, match=r"'gate' \(Gate\).*data-dependent control flow"):
        PackedEnsemble(ValueBranch, 2)(x)


def test_a_bug_of_the_call_keeps_its_own_error():
    with pytest.raises(RuntimeError) as info:
        PackedEnsemble(lambda: nn.Linear(4, 3), 2)(torch.randn(5, 7))  # wrong input width
    assert not isinstance(info.value, UnsupportedModuleError)


def test_clear_errors_for_bad_use(cache):
    batch = read_batch(cache, range(2))
    ensemble = PackedEnsemble(make_gpt, 2)
    logits = ensemble.logits(batch["input_ids"].long())
    with pytest.raises(ValueError, match="sample_weights must be real"):
        packed_kd_loss(logits, batch, sample_weights=torch.ones(3, 2))
    with pytest.raises(ValueError, match="finite and >= 0"):
        packed_kd_loss(logits, batch, sample_weights=-torch.ones(2, 2))
    with pytest.raises(ValueError, match="drop reduction"):
        packed_kd_loss(logits, batch, reduction="sum")
    with pytest.raises(ValueError, match=r"\[M, B, T, V\]"):
        packed_kd_loss(logits[0], batch)
    with pytest.raises(ValueError, match="LBFGS is not known to be elementwise"):
        check_per_member_optimizer(torch.optim.LBFGS(ensemble.parameters()))
    with pytest.raises(ValueError, match="other parameters than member 0"):
        PackedEnsemble.from_members([nn.Linear(4, 3), nn.Linear(4, 5)])
    with pytest.raises(ValueError, match="num_members=2 but 3 seeds"):
        PackedEnsemble(make_gpt, 2, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="at least one member"):
        PackedEnsemble(make_gpt, 0)
