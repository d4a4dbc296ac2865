"""End to end: `kdcache build --targets sample|hybrid` with a real tiny transformers teacher, read back with
open_cache + read_batch, and the loss through kd_loss_from_batch.

What is checked: kd_loss_from_batch on the real batch equals kd_loss called with the arrays by hand; and the
per-position estimates are unbiased against the exact full-vocabulary KL(p_T^τ ‖ q^τ) computed from the
teacher's own logits: positions draw independently, so the mean of (estimate − exact) over the ~190 valid
positions must be within 4 standard errors of 0 (importance-weighted: the loss is at τ = 1, the draws at
τs = 2 for sample and τs = 0.5 for hybrid). (The test's power is shown by the controls of the unit tests,
tests/test_losses_targets.py and tests/test_losses_sampled.py: this tiny teacher is close to uniform, so τs
misstated would hardly move the mean here.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cache_server.cli import main
from kdlib import open_cache
from kdlib.batch import read_batch
from kdlib.losses import kd_loss, kd_loss_from_batch
from tests.teachers import load_llama_teacher, make_llama_teacher

V, T, N_SEQ = 300, 17, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled_loss")
    teacher = make_llama_teacher(root / "teacher", V, hidden_size=32, seed=7, logit_scale=4.0)
    np.save(root / "tokens.npy", np.random.default_rng(7).integers(0, V, size=40 * T + 3))
    return root, teacher


def _build_and_read(setup, name, *flags):
    root, teacher = setup
    out = root / name
    assert main(["build", "--teacher", str(teacher), "--data", str(root / "tokens.npy"), "--seq-len", str(T),
                 "--out", str(out), "--shard-seqs", "4", "--max-sequences", str(N_SEQ), "--no-progress",
                 *map(str, flags)]) == 0
    cache = open_cache(out, decode_dir=root / f"{name}-decoded")
    return read_batch(cache, np.arange(N_SEQ))


@pytest.mark.parametrize("kind,flags,sample_temperature", [
    ("sample", ("--targets", "sample", "--samples", 48, "--sample-temperature", 2), 2.0),
    ("hybrid", ("--targets", "hybrid", "--topk", 3, "--samples", 24, "--sample-temperature", 0.5), 0.5),
])
def test_real_sampled_cache_through_kd_loss_from_batch(setup, kind, flags, sample_temperature):
    batch = _build_and_read(setup, kind, *flags)
    assert ("topk_ids" in batch) == (kind == "hybrid") and float(batch["sample_temperature"]) == sample_temperature
    student = torch.randn(N_SEQ, T, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = kd_loss_from_batch(student, batch, reduction="none", tau_squared=False)  # [N, T]
    by_hand = kd_loss(student, batch.get("topk_ids"), batch.get("topk_logprobs"), labels=batch["labels"],
                      sample_ids=batch["sample_ids"], sample_counts=batch["sample_counts"],
                      sample_logprobs=batch["sample_logprobs"], sample_temperature=batch["sample_temperature"],
                      teacher_lse=batch["lse"], teacher_lse_sample_temperature=batch[f"lse_t{sample_temperature:g}"],
                      reduction="none", tau_squared=False)
    assert torch.equal(rows, by_hand)

    _, teacher = setup
    with torch.inference_mode():
        logits = load_llama_teacher(teacher)(batch["input_ids"].long()).logits.double()  # [N, T, V]
    log_p, log_q = torch.log_softmax(logits, -1), torch.log_softmax(student, -1)
    exact = (log_p.exp() * (log_p - log_q)).sum(-1)  # [N, T]
    valid = batch["labels"] != -100
    z = _z(rows, exact, valid)
    assert abs(z) < 4, (z, float(rows[valid].mean()), float(exact[valid].mean()))
    assert (rows - exact)[valid].abs().max() > 1e-3  # an estimate, not the exact value


def _z(rows, exact, valid):
    diff = (rows - exact)[valid]
    return float(diff.mean() / (diff.std() / math.sqrt(diff.numel())))
