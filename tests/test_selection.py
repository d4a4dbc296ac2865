"""kdlib.selection: streaming per-sequence scores (KL and reference NLL) against naive per-sequence computations,
their resume after a SIGKILL, over a remote cache, and the subset helpers (hardest, bagging, clusters, difference
sampling) feeding make_loader.

Real parts: caches written by the real writer, tiny transformers Llama students saved and loaded with
safetensors, a real ``kdcache serve`` subprocess, a scoring subprocess killed with SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdlib
from kdlib.losses import kd_loss_reference
from kdlib.selection import (bagging, cluster_subsets, difference_sampling, difference_scores, hardest,
                             reference_nll, score_sequences, stream_scores, top_fraction)
from tests.cachefactory import make_synthetic_cache
from tests.serverproc import ServerProcess
from tests.teachers import make_llama_teacher

REPO = Path(__file__).resolve().parents[1]
N, T, K, V, S = 23, 9, 5, 64, 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    path, arrays = make_synthetic_cache(root / "cache", num_sequences=N, seq_len=T, topk=K, vocab_size=V,
                                        temperatures=(2.0,), shard_seqs=S, chunk_seqs=3, seed=7)
    cache = kdlib.open_cache(path, decode_dir=root / "decoded")
    student_dir = make_llama_teacher(root / "student", V, hidden_size=16, num_layers=1, seed=1)
    reference_dir = make_llama_teacher(root / "reference", V, hidden_size=16, num_layers=1, seed=2)
    return {"root": root, "path": path, "arrays": arrays, "cache": cache, "student_dir": student_dir,
            "reference_dir": reference_dir}


def _load(model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir).eval()


def _naive_scores(model, cache, **options):
    """One sequence at a time through the naive torch loss: mean over positions 0..T-2 of the divergence."""
    out = []
    for i in range(cache.num_sequences):
        batch = cache.read(i, i + 1)
        ids = batch["input_ids"].long()
        with torch.no_grad():
            logits = model(ids).logits.double()
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        tau = options.get("temperature", 1.0)
        per_position = kd_loss_reference(
            logits, batch["topk_ids"].long(), batch["topk_logprobs"].double(), labels=labels,
            teacher_lse=batch["lse"].double(),
            teacher_lse_at_temperature=batch.get(f"lse_t{tau:g}", batch["lse"]).double(), reduction="none",
            **options)
        out.append(float(per_position[0, :-1].mean()))
    return np.array(out)


@pytest.mark.parametrize("options", [{}, {"temperature": 2.0, "divergence": "reverse_kl"},
                                     {"divergence": "jsd", "beta": 0.3, "tail": "renormalize"}])
def test_scores_equal_a_naive_per_sequence_computation(world, options):
    student = _load(world["student_dir"])
    got = score_sequences(student, world["cache"], batch_size=4, progress=False, **options)
    assert got.shape == (N,) and got.dtype == np.float32
    want = _naive_scores(student, world["cache"], **options)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
    assert np.ptp(got) > 0  # the sequences differ, so the scores do
    assert not student.training  # it was in eval mode, and stays so


def test_scoring_restores_the_training_flag_and_does_not_touch_gradients(world):
    student = _load(world["student_dir"]).train()
    score_sequences(student, world["cache"], batch_size=8, progress=False)
    assert student.training and all(p.grad is None for p in student.parameters())


def test_reference_nll_equals_a_naive_cross_entropy_and_matches_seq_nll_convention(world):
    model = _load(world["reference_dir"])
    got = reference_nll(model, world["cache"], batch_size=5, progress=False)
    ids = torch.from_numpy(world["arrays"]["input_ids"].astype(np.int64))
    with torch.no_grad():
        logits = model(ids).logits.double()
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(N, T - 1)
    np.testing.assert_allclose(got, want.mean(-1).numpy(), rtol=1e-5, atol=1e-6)
    # Difference scores: reference NLL minus the cache's teacher seq_nll (same convention: positions 0..T-2).
    diff = difference_scores(world["cache"], model, batch_size=5, progress=False)
    np.testing.assert_allclose(diff, got - world["arrays"]["seq_nll"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(difference_scores(world["cache"], world["arrays"]["seq_nll"]), 0.0, atol=0)
    keep = difference_sampling(world["cache"], got, fraction=0.3)
    assert keep.tolist() == sorted(np.argsort(-(got - world["arrays"]["seq_nll"]), kind="stable")[:7].tolist())


def test_a_sequence_without_valid_positions_gets_the_documented_score(world):
    # (A T = 1 cache, where no position has a label, cannot be written today: its all-zero seq_nll chunk is
    # skipped by zarr. The pass is the same for any scorer: here every odd sequence has no valid position.)
    def scorer(batch):
        losses = torch.ones(batch["labels"].shape, dtype=torch.float32)
        valid = (batch["sample_indices"] % 2 == 0)[:, None].expand_as(losses)
        return losses * 3.0, valid

    got = stream_scores(world["cache"], scorer, batch_size=4, progress=False)
    assert got.tolist() == [3.0 if i % 2 == 0 else 0.0 for i in range(N)]  # default empty_score 0.0
    got = stream_scores(world["cache"], scorer, batch_size=4, progress=False, empty_score=-1.0)
    assert got.tolist() == [3.0 if i % 2 == 0 else -1.0 for i in range(N)]
    with pytest.raises(ValueError, match="empty_score must be a finite number"):
        stream_scores(world["cache"], scorer, progress=False, empty_score=float("nan"))


class _NanAtToken(torch.nn.Module):
    """A real Llama whose logits are NaN at every position holding token ``bad``."""

    def __init__(self, model, bad):
        super().__init__()
        self.model, self.bad = model, bad

    def forward(self, ids):
        logits = self.model(ids).logits
        return torch.where((ids == self.bad)[..., None], torch.full_like(logits, float("nan")), logits)


def test_a_nan_score_is_an_error_naming_the_sequence(world):
    ids = world["arrays"]["input_ids"]
    bad_token = int(ids[11, 3])
    first_bad = int(np.flatnonzero((ids[:, :-1] == bad_token).any(-1))[0])
    model = _NanAtToken(_load(world["student_dir"]), bad_token)
    with pytest.raises(ValueError, match=rf"sequence\(s\) \[{first_bad}[,\]].*not finite"):
        score_sequences(model, world["cache"], batch_size=N, progress=False)


_SCORING_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from transformers import LlamaForCausalLM
    import kdlib
    from kdlib.selection import score_sequences

    cache_dir, decode_dir, student_dir, out, delay_s = sys.argv[1:6]

    class Slow(torch.nn.Module):  # the same parameters; each forward waits, so the parent can kill mid-pass
        def __init__(self, model):
            super().__init__()
            self.model = model
        def forward(self, ids):
            time.sleep(float(delay_s))
            return self.model(ids).logits

    student = Slow(LlamaForCausalLM.from_pretrained(student_dir).eval())
    cache = kdlib.open_cache(cache_dir, decode_dir=decode_dir)
    score_sequences(student, cache, batch_size=2, out=out, record_every_s=0, progress=False, temperature=2.0)
    print("done")
""")


def _scoring_process(world, out, delay_s):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _SCORING_SCRIPT, str(world["path"]),
                             str(world["root"] / "decoded"), str(world["student_dir"]), str(out), str(delay_s)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_scoring_resumes_after_sigkill_with_identical_scores(world, tmp_path):
    out = tmp_path / "scores.npy"
    record = tmp_path / "scores.npy.progress.json"
    proc = _scoring_process(world, out, delay_s=0.3)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if record.exists():
            done = json.loads(record.read_text())["done"]
            if done >= 6:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = json.loads(record.read_text())
    assert 6 <= saved["done"] < N and saved["done"] % 2 == 0 and not saved["complete"]
    partial = np.load(out)
    assert np.isnan(partial[saved["done"] + 2:]).all()  # not scored yet: NaN on disk, never returned
    # A rerun (in this process, the wrapper without the wait: same parameters) continues where the record says,
    # with the same batch boundaries: only the remaining batches are computed.
    wrapper = _SlowFree(_load(world["student_dir"]))
    resumed = score_sequences(wrapper, world["cache"], batch_size=2, out=out, progress=False, temperature=2.0)
    assert wrapper.calls == -(-(N - saved["done"]) // 2)
    final = json.loads(record.read_text())
    assert final["done"] == N and final["complete"]
    uninterrupted = score_sequences(_load(world["student_dir"]), world["cache"], batch_size=2, progress=False,
                                    temperature=2.0)
    np.testing.assert_array_equal(np.load(out), uninterrupted)
    np.testing.assert_array_equal(resumed, uninterrupted)
    # A finished file is returned as is by a third run (nothing recomputed).
    again = score_sequences(wrapper, world["cache"], batch_size=2, out=out, progress=False, temperature=2.0)
    np.testing.assert_array_equal(again, uninterrupted)
    assert wrapper.calls == -(-(N - saved["done"]) // 2)


class _SlowFree(torch.nn.Module):
    """The scoring script's wrapper without the wait: the same parameter names, so the same fingerprint."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        return self.model(ids).logits


def test_a_score_file_of_another_pass_is_refused_and_kept(world, tmp_path):
    out = tmp_path / "s.npy"
    student = _load(world["student_dir"])
    first = score_sequences(student, world["cache"], batch_size=4, out=out, progress=False)
    for kwargs, match in [({"batch_size": 3}, "batch_size: 4 \\(saved\\) vs 3"),
                          ({"batch_size": 4, "temperature": 2.0}, "options"),
                          ({"batch_size": 4, "student": _load(world["reference_dir"])}, "model")]:
        model = kwargs.pop("student", student)
        with pytest.raises(ValueError, match=match):
            score_sequences(model, world["cache"], out=out, progress=False, **kwargs)
    np.testing.assert_array_equal(np.load(out), first)  # untouched
    foreign = tmp_path / "foreign.npy"
    np.save(foreign, np.arange(3.0))
    with pytest.raises(ValueError, match="no progress record"):
        score_sequences(student, world["cache"], out=foreign, progress=False)
    assert np.load(foreign).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="sets \\['ce_weight'\\] itself"):
        score_sequences(student, world["cache"], ce_weight=0.5, progress=False)


def test_scores_over_a_remote_cache_equal_the_local_ones(world, tmp_path):
    student = _load(world["student_dir"])
    local = score_sequences(student, world["cache"], batch_size=4, progress=False)
    with ServerProcess([str(world["path"])], token_dir=tmp_path) as server:
        url = server.cache_url(world["path"].name)
        remote = score_sequences(student, url, batch_size=4, progress=False,
                                 open_kwargs={"decode_dir": tmp_path / "remote-dec"})
    np.testing.assert_array_equal(remote, local)


# ----------------------------------------------------------------------------------------------- helpers


def test_hardest_takes_the_top_fraction_with_ties_to_the_lower_index():
    scores = np.array([0.5, 3.0, 1.0, 3.0, 2.0, 0.1, 3.0, 2.5, 0.0, 1.5])
    assert hardest(scores, 0.2).tolist() == [1, 3]  # three tie at 3.0: the two lowest indices
    assert hardest(scores, 0.3).tolist() == [1, 3, 6]
    assert hardest(scores, 0.35).tolist() == [1, 3, 6, 7]  # ceil(3.5) = 4
    assert hardest(scores, 1.0).tolist() == list(range(10))
    assert hardest(scores, 0.01).tolist() == [1]  # at least one
    rng = np.random.default_rng(0)
    big = rng.standard_normal(1000)
    top = hardest(big, 0.1)
    assert top.size == 100 and big[top].min() >= np.sort(big)[-100] and np.all(np.diff(top) > 0)
    for bad, match in [(0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (-0.1, r"in \(0, 1\]")]:
        with pytest.raises(ValueError, match=match):
            hardest(scores, bad)
    with pytest.raises(ValueError, match=r"NaN/inf.*\[2\]"):
        top_fraction([1.0, 2.0, float("nan")], 0.5)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        top_fraction([], 0.5)


def test_bagging_sizes_determinism_and_counts():
    n = 1000
    for seed in range(5):
        counts = bagging(n, seed=seed, as_counts=True)
        assert counts.shape == (n,) and counts.dtype == np.int64 and counts.min() >= 0
        assert 600 <= counts.sum() <= 800  # 60-80 % of N, drawn with replacement
        indices = bagging(n, seed=seed)
        assert indices.tolist() == np.flatnonzero(counts).tolist()  # the distinct sequences of the same bag
        assert np.array_equal(counts, bagging(n, seed=seed, as_counts=True))  # seeded
        # With replacement: about 1 - exp(-f) of N distinct (f in [0.6, 0.8]), some drawn twice or more.
        frac = counts.sum() / n
        assert abs(indices.size / n - (1 - math.exp(-frac))) < 0.05 and counts.max() >= 2
    assert not np.array_equal(bagging(n, seed=0), bagging(n, seed=1))
    assert bagging(n, seed=3, fraction=0.5, as_counts=True).sum() == 500
    assert bagging(n, seed=-1).size > 0  # any 64-bit seed
    for kwargs, match in [({"fraction": 0.0}, r"in \(0, 1\]"), ({"low": 0.9, "high": 0.8}, "low <= high")]:
        with pytest.raises(ValueError, match=match):
            bagging(n, **kwargs)
    with pytest.raises(ValueError, match="num_sequences must be >= 1"):
        bagging(0)


def test_cluster_subsets_partition_the_sequences():
    labels = np.array([2, 0, 2, -1, 1, 0, 2, -1])
    subsets = cluster_subsets(labels)
    assert {k: v.tolist() for k, v in subsets.items()} == {-1: [3, 7], 0: [1, 5], 1: [4], 2: [0, 2, 6]}
    assert sorted(cluster_subsets(labels, ignore=(-1,))) == [0, 1, 2]
    assert {k: v.tolist() for k, v in cluster_subsets(["a", "b", "a"]).items()} == {"a": [0, 2], "b": [1]}
    with pytest.raises(ValueError, match="every label is ignored"):
        cluster_subsets([1, 1], ignore=(1,))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        cluster_subsets(np.zeros((2, 2)))


def test_difference_scores_refuse_a_reference_of_another_length(world):
    with pytest.raises(ValueError, match=f"3 entries but the cache has {N}"):
        difference_scores(world["cache"], np.zeros(3))
    with pytest.raises(ValueError, match="NaN/inf"):
        difference_scores(world["cache"], np.full(N, np.nan))


def test_boosting_round_end_to_end_hardest_scores_feed_a_subset_loader(world):
    student = _load(world["student_dir"])
    scores = score_sequences(student, world["cache"], batch_size=8, progress=False)
    top = hardest(scores, 0.25)  # ceil(0.25 * 23) = 6
    assert top.size == 6 and scores[top].min() >= np.sort(scores)[-6]
    loader = kdlib.make_loader(world["cache"], 2, subset=top, seed=1)
    seen = [i for b in loader for i in b["sample_indices"].tolist()]
    assert sorted(seen) == top.tolist()
    bag = bagging(N, seed=4, as_counts=True)
    bagged = kdlib.make_loader(world["cache"], 2, weights=bag, num_samples=int(bag.sum()), seed=1, drop_last=False)
    assert {i for b in bagged for i in b["sample_indices"].tolist()} <= set(np.flatnonzero(bag).tolist())
