"""A student vocabulary SMALLER than the teacher's padded embedding (Qwen2.5: 151,936 vs 152,064).

Shape notation: N rows, V_T teacher vocabulary, V_S < V_T student vocabulary, K top-k, H hybrid head, W slots,
R independent trials.

The losses are checked against a naive reference that builds the FULL teacher distribution over V_T from its
logits and restricts it to the student's V_S ids (the teacher's mass on the dropped ids V_S..V_T-1 is not
negligible here, so folding it anywhere but the tail would show): top-k for every divergence × tail × τ in value
and gradient; sampled and hybrid statistically (the mean over R draws, taken as a cache that passes the check
holds them: conditioned on no draw landing on a dropped id). Then end to end through a real cache, the loader,
``kd_step_loss`` and ``check_alignment``, and the errors naming the first offending id.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdlib
from cache_server import format as fmt
from cache_server.build.writer import CacheWriter
from cache_server.format import slots
from kdlib.batch import check_batch_vocab, move_batch
from kdlib.losses import kd_loss_reference
from tests.cachefactory import synthetic_arrays
from tests.unbiased import z_scores

V_T, V_S, K = 40, 32, 5
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TAILS = ("bucket", "renormalize", "none")


def _teacher_logits(n: int, v_teacher: int, v_student: int, k: int, seed: int) -> torch.Tensor:
    """[n, v_teacher] float64 logits with ~10-20 % of the mass on the dropped ids, none of them in the top-k."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v_teacher, generator=gen, dtype=torch.float64) * 1.5
    logits[torch.arange(n), torch.randint(0, v_student, (n,), generator=gen)] += 4.0  # a peaked head
    kth = logits[:, :v_student].topk(k, dim=-1).values[:, -1:]  # [n, 1]
    logits[:, v_student:] = torch.minimum(logits[:, v_student:] + 1.0, kth - 0.05)  # heavy, but below the top-k
    return logits


def _f(div: str, t: torch.Tensor, s: torch.Tensor, beta: float) -> torch.Tensor:
    if div == "forward_kl":
        return torch.xlogy(t, t) - torch.xlogy(t, s)
    if div == "reverse_kl":
        return torch.xlogy(s, s) - torch.xlogy(s, t)
    if div == "jsd":
        m = beta * t + (1 - beta) * s
        return beta * (torch.xlogy(t, t) - torch.xlogy(t, m)) + (1 - beta) * (torch.xlogy(s, s) - torch.xlogy(s, m))
    return 0.5 * (t - s).abs()


def _naive_topk(z, teacher_logits, ids, labels, div, tail, tau, beta, ce_weight):
    """KD + CE from the dense teacher over V_T restricted to the student's V_S ids, category by category."""
    p_t = torch.softmax(teacher_logits / tau, dim=-1)  # [N, V_T] the full teacher at τ
    q_s = torch.softmax(z / tau, dim=-1)  # [N, V_S]
    in_s_t = torch.zeros_like(p_t, dtype=torch.bool).scatter_(-1, ids, True)  # S among the teacher's ids
    in_s_s = torch.zeros_like(q_s, dtype=torch.bool).scatter_(-1, ids, True)  # S among the student's ids
    pt_s, qs_s = p_t.gather(-1, ids), q_s.gather(-1, ids)  # [N, K]
    if tail == "bucket":  # teacher tail: every V_T id outside S (the dropped ones included); student: V_S \ S
        d = _f(div, pt_s, qs_s, beta).sum(-1) + _f(div, (p_t * ~in_s_t).sum(-1), (q_s * ~in_s_s).sum(-1), beta)
    elif tail == "renormalize":  # teacher renormalized on S, 0 on the rest of V_S
        dense = torch.zeros_like(q_s).scatter_(-1, ids, pt_s / pt_s.sum(-1, keepdim=True))
        terms = _f(div, dense, q_s, beta)
        d = torch.where(in_s_s, terms, 0).sum(-1) if div == "reverse_kl" else terms.sum(-1)
    else:
        d = _f(div, pt_s, qs_s, beta).sum(-1)
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(z, labels, ignore_index=-100)
    return ce_weight * ce + tau**2 * (d * valid).sum() / valid.sum()


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_topk_losses_equal_the_naive_restricted_teacher(div, tail, tau):
    b, t = 2, 3
    teacher = _teacher_logits(b * t, V_T, V_S, K, seed=7)  # [N, V_T]
    dropped = torch.softmax(teacher, -1)[:, V_S:].sum(-1)
    assert dropped.min() > 0.05  # the dropped ids hold real mass: folding it wrongly would show
    logprobs = torch.log_softmax(teacher, dim=-1)
    ids = logprobs.topk(K, dim=-1).indices  # [N, K] the teacher's own top-k over V_T
    assert int(ids.max()) < V_S
    labels = torch.randint(0, V_S, (b * t,), generator=torch.Generator().manual_seed(3))
    labels[2] = -100
    batch = {
        "topk_ids": ids.to(torch.int32).reshape(b, t, K), "topk_logprobs": logprobs.gather(-1, ids).reshape(b, t, K),
        "lse": torch.logsumexp(teacher, -1).reshape(b, t), "lse_t2": torch.logsumexp(teacher / 2, -1).reshape(b, t),
        "labels": labels.reshape(b, t), "teacher_vocab_size": torch.tensor(V_T), "largest_id": ids.max(),
    }
    z = torch.randn(b, t, V_S, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    kw = dict(divergence=div, tail=tail, temperature=tau, beta=0.3, ce_weight=0.4)
    loss = kdlib.kd_loss_from_batch(z, batch, allow_padded_vocab=True, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    z_ref = z.detach().reshape(-1, V_S).requires_grad_(True)
    ref = _naive_topk(z_ref, teacher, ids, labels, div, tail, tau, 0.3, 0.4)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad.reshape(-1, V_S), z_ref.grad, rtol=1e-8, atol=1e-10)
    # The naive reference module agrees too (it is vocabulary-agnostic: the student's V is the one that counts).
    torch.testing.assert_close(kdlib.kd_loss_from_batch(z, batch, allow_padded_vocab=True, backend="reference", **kw),
                               ref, rtol=1e-9, atol=1e-10)


def _expected_weights(teacher: torch.Tensor, kind: str, head: torch.Tensor, tau: float, tau_s: float, v_s: int):
    """The expected weight ā(y) [V_S] the estimator puts on each student id, from the dense teacher [V_T].

    A cache that passes the check holds no draw on a dropped id, i.e. its D draws are i.i.d. from the sampling
    distribution CONDITIONED on the student's ids: π_c(y) ∝ p^τs(y) on V_S (sample) or on V_S minus the head
    (hybrid). Each draw carries w(y) = p^τ(y) / π(y) with π the UNconditioned sampling distribution, so
    ā(y) = π_c(y) w(y); head ids keep their exact p^τ.
    """
    p, p_s = torch.softmax(teacher / tau, -1), torch.softmax(teacher / tau_s, -1)  # [V_T]
    rest = torch.ones_like(p, dtype=torch.bool)
    rest[head] = False
    rest_s = p_s[rest].sum()  # R^τs (1 for sampled)
    keep = rest.clone()
    keep[v_s:] = False  # the rest's ids the student has
    pi = p_s / rest_s  # unconditioned π on the rest
    pi_c = torch.where(keep, p_s, 0) / p_s[keep].sum()
    a = torch.where(keep, pi_c * p / pi, 0.0)
    a[head] = p[head]
    return a[:v_s], p


@pytest.mark.parametrize("kind", ["sample", "hybrid"])
@pytest.mark.parametrize("tau,tau_s", [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0)])
def test_sampled_and_hybrid_estimate_the_restricted_teacher(kind, tau, tau_s):
    v_t, v_s, h, draws, trials = 16, 12, 3, 16, 2000
    teacher = _teacher_logits(1, v_t, v_s, h, seed=11)[0]  # [V_T]
    student = torch.randn(v_s, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    head = torch.softmax(teacher, -1).topk(h).indices if kind == "hybrid" else torch.empty(0, dtype=torch.int64)
    a_exact, p_tau = _expected_weights(teacher, kind, head, tau, tau_s, v_s)
    if tau == tau_s:  # the folding, in words: the dropped mass joins the sampled rest in proportion
        total = 1.0
        torch.testing.assert_close(a_exact.sum(), torch.tensor(total, dtype=torch.float64))
        scale = a_exact[v_s - 1] / p_tau[v_s - 1]  # every rest id scaled by the same factor
        rest_ids = [y for y in range(v_s) if y not in head.tolist()]
        torch.testing.assert_close(a_exact[rest_ids] / p_tau[rest_ids], scale.expand(len(rest_ids)))
    # Draws as a passing cache holds them: from π_s conditioned on the student's ids outside the head.
    p_s = torch.softmax(teacher / tau_s, -1)
    allowed = torch.ones(v_t, dtype=torch.bool)
    allowed[v_s:] = False
    allowed[head] = False
    gen = torch.Generator().manual_seed(17)
    ids = torch.multinomial(torch.where(allowed, p_s, 0), trials * draws, replacement=True, generator=gen)
    ids = ids.reshape(trials, draws)  # one slot per draw (split slots: duplicates allowed)
    lse = torch.logsumexp(teacher, -1)
    log_p1 = torch.log_softmax(teacher, -1)
    kw = dict(sample_ids=ids, sample_counts=torch.ones_like(ids, dtype=torch.uint8),
              sample_logprobs=log_p1[ids], sample_temperature=tau_s, teacher_lse=lse.expand(trials),
              teacher_lse_at_temperature=torch.logsumexp(teacher / tau, -1).expand(trials),
              teacher_lse_sample_temperature=torch.logsumexp(teacher / tau_s, -1).expand(trials))
    head_args = (head.expand(trials, h), log_p1[head].expand(trials, h)) if kind == "hybrid" else (None, None)
    z = student.expand(trials, v_s).clone().requires_grad_(True)
    rows = kdlib.kd_loss(z, *head_args, temperature=tau, tau_squared=False, reduction="none", **kw)
    rows.sum().backward()
    q = torch.softmax(student / tau, -1)
    exact_grad = (a_exact.sum() * q - a_exact) / tau
    exact_value = (a_exact * (torch.log(p_tau[:v_s]) - torch.log(q))).sum()
    assert z_scores(z.grad, exact_grad).abs().max() < 4
    assert z_scores(rows.detach().unsqueeze(1), exact_value).abs().max() < 4
    # The control: the estimate is NOT of the unrestricted teacher (the dropped mass is visibly elsewhere).
    assert (z.grad.mean(0) - (q - torch.softmax(teacher / tau, -1)[:v_s]) / tau).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- end to end


def _write_cache(path, num_sequences=12, seq_len=8, plant=None):
    """A real cache whose teacher has V_T ids, every top-k id < V_S; ``plant`` = (seq, pos, slot, id) overrides."""
    layout = fmt.CacheLayout(num_sequences=num_sequences, seq_len=seq_len, topk=K, vocab_size=V_T, shard_seqs=4,
                             chunk_seqs=2)
    arrays = synthetic_arrays(num_sequences, seq_len, K, V_T, seed=4)
    logits = _teacher_logits(num_sequences * seq_len, V_T, V_S, K, seed=9)
    logprobs = torch.log_softmax(logits, -1)
    top = logprobs.topk(K, -1)
    shape = (num_sequences, seq_len, K)
    arrays["topk_ids"] = top.indices.reshape(shape).numpy().astype(arrays["topk_ids"].dtype)
    arrays["topk_logprobs"] = top.values.reshape(shape).numpy().astype(np.float16)
    arrays["lse"] = torch.logsumexp(logits, -1).reshape(num_sequences, seq_len).numpy().astype(np.float32)
    arrays["input_ids"] = arrays["input_ids"] % V_S
    if plant is not None:
        seq, pos, slot, value = plant
        if slot is None:
            arrays["input_ids"][seq, pos] = value
        else:
            arrays["topk_ids"][seq, pos, slot] = value
    writer = CacheWriter(path, layout, settings={"synthetic_seed": 4}, manifest_fields={"teacher": {"name": "t"}})
    for i in writer.pending_shards():
        a, b = layout.shard_range(i)
        writer.write_shard(i, {k: v[a:b] for k, v in arrays.items()})
    writer.finalize()
    return kdlib.open_cache(path, decode_dir=path.parent / (path.name + "_dec")), slots.canonicalize(layout, arrays)


class _Student(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def test_end_to_end_smaller_student_trains_from_a_real_cache(tmp_path):
    cache, _ = _write_cache(tmp_path / "cache")
    assert cache.vocab_size == V_T
    torch.manual_seed(0)
    student = _Student(V_S)
    loader = kdlib.make_loader(cache, 4, seed=1, prefetch=0)
    batch = next(iter(loader))
    assert int(batch["largest_id"]) < V_S and batch["largest_id"].dim() == 0
    with pytest.raises(kdlib.AlignmentError, match="has 32 entries but the cache's teacher has 40: .*pass "
                                                   "allow_padded_vocab=True"):
        kdlib.kd_step_loss(student, batch)
    loss, logits = kdlib.kd_step_loss(student, batch, allow_padded_vocab=True, ce_weight=0.2)
    ref = kd_loss_reference(logits, batch["topk_ids"], batch["topk_logprobs"], labels=batch["labels"],
                                  teacher_lse=batch["lse"], ce_weight=0.2)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    # The check reads no device memory: on "meta" (no data at all) it passes from the CPU-side largest_id.
    on_meta = move_batch(batch, "meta")
    assert on_meta["largest_id"].device.type == "cpu"
    kdlib.check_alignment(None, on_meta, student_vocab_size=V_S, allow_padded_vocab=True)
    kdlib.distill_loss(logits, batch, allow_padded_vocab=True)
    # A CacheDataset row, collated by a DataLoader ([B] copies of the batch-wide bound), passes too.
    rows = next(iter(torch.utils.data.DataLoader(kdlib.CacheDataset(cache), batch_size=3)))
    assert rows["largest_id"].shape == (3,)
    check_batch_vocab(V_S, rows, allow_padded_vocab=True)


@pytest.mark.parametrize("plant,kind,where", [
    ((5, 3, 2, 35), "top-k id 35", r"batch row \d \(cache sequence 5\), position 3, slot \d"),
    ((6, 4, None, 33), "input id 33", r"batch row \d \(cache sequence 6\), position 4, not"),
])
def test_the_first_offending_id_is_named(tmp_path, plant, kind, where):
    cache, arrays = _write_cache(tmp_path / "cache", plant=plant)
    batch = kdlib.batch.read_batch(cache, np.arange(4, 8))
    assert int(batch["largest_id"]) == plant[3]
    logits = torch.zeros(4, 8, V_S)
    message = (rf"the cache holds {kind} at {where}.*below the student's vocabulary of 32 \(the teacher's "
               r"has 40\).*resize_token_embeddings\(40\)")
    with pytest.raises(kdlib.AlignmentError, match=message):
        kdlib.kd_loss_from_batch(logits, batch, allow_padded_vocab=True)
    with pytest.raises(kdlib.AlignmentError, match=message):
        kdlib.check_alignment(None, batch, student_vocab_size=V_S, allow_padded_vocab=True)
    # A student holding the planted id passes.
    kdlib.check_alignment(None, batch, student_vocab_size=plant[3] + 1, allow_padded_vocab=True)
