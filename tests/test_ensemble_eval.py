"""Ensemble evaluation (kdlib.ensemble.evaluate) against a naive computation, and ECE on cases of known value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kdlib
from kdlib.ensemble import CalibrationBins, PackedEnsemble, evaluate_ensemble, expected_calibration_error
from tests.cachefactory import make_synthetic_cache

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

V, T = 80, 10


def make_gpt() -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=T, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def naive_ece(confidence: np.ndarray, correct: np.ndarray, num_bins: int) -> float:
    """Guo et al.: bins (i/nb, (i+1)/nb], a confidence of 0 in the first bin; a loop over bins."""
    total = 0.0
    for i in range(num_bins):
        lo, hi = i / num_bins, (i + 1) / num_bins
        inside = (confidence > lo) & (confidence <= hi) | ((i == 0) & (confidence == 0))
        if inside.any():
            total += inside.sum() / len(confidence) * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


@torch.no_grad()
def naive_evaluation(models, tokens: torch.Tensor, weights: list[float], num_bins: int) -> dict:
    """Every member's softmax, their weighted average, NLL / accuracy / ECE written out position by position."""
    ids = tokens.long()
    labels = ids[:, 1:].reshape(-1)  # the last position of each sequence has no next token
    probs = [torch.softmax(m.eval()(ids).logits[:, :-1].double(), -1).reshape(-1, V) for m in models]
    mix = sum(w * p for w, p in zip(weights, probs)) / sum(weights)
    scores = []
    for p in [*probs, mix]:
        conf, pred = p.max(-1)
        correct = (pred == labels).numpy()
        nll = -p[torch.arange(len(labels)), labels].log().mean().item()
        scores.append((nll, correct.mean(), naive_ece(conf.numpy(), correct, num_bins)))
    losses, accuracies, eces = (list(column) for column in zip(*scores))
    return {"member_losses": losses[:-1], "member_accuracies": accuracies[:-1], "member_eces": eces[:-1],
            "ensemble_loss": losses[-1], "ensemble_accuracy": accuracies[-1], "ensemble_ece": eces[-1]}


def assert_matches(result, expected, positions):
    assert result.num_positions == positions
    for key in ("ensemble_loss", "ensemble_accuracy", "ensemble_ece"):
        assert getattr(result, key) == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    for key in ("member_losses", "member_accuracies", "member_eces"):
        assert list(getattr(result, key)) == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3]])
def test_packed_and_listed_members_match_a_naive_evaluation(weights):
    ensemble = PackedEnsemble(make_gpt, 3, seeds=[1, 2, 3])
    tokens = torch.randint(0, V, (7, T), generator=torch.Generator().manual_seed(0))
    expected = naive_evaluation(ensemble.members(), tokens, weights or [1, 1, 1], num_bins=10)
    packed = evaluate_ensemble(ensemble, tokens, batch_size=3, member_weights=weights, num_bins=10)
    assert_matches(packed, expected, 7 * (T - 1))
    listed = evaluate_ensemble(ensemble.members(), tokens.numpy(), batch_size=4, member_weights=weights,
                               num_bins=10)
    assert_matches(listed, expected, 7 * (T - 1))
    flat = evaluate_ensemble(ensemble, tokens.reshape(-1), seq_len=T, member_weights=weights, num_bins=10)
    assert_matches(flat, expected, 7 * (T - 1))
    assert packed.ensemble_loss < max(packed.member_losses)  # averaging probabilities cannot be worse than all


def test_cache_loader_batches_are_evaluated_with_their_own_labels(tmp_path):
    path, arrays = make_synthetic_cache(tmp_path / "cache", num_sequences=12, seq_len=T, topk=4, vocab_size=V)
    ensemble = PackedEnsemble(make_gpt, 2)
    loader = kdlib.make_loader(kdlib.open_cache(path), 4, shuffle=False, rank=0, world_size=1)
    result = evaluate_ensemble(ensemble, loader)
    expected = naive_evaluation(ensemble.members(), torch.from_numpy(arrays["input_ids"].astype(np.int64)), [1, 1],
                                num_bins=15)
    assert_matches(result, expected, 12 * (T - 1))


def test_members_keep_their_train_or_eval_mode():
    models = [make_gpt().train(), make_gpt().eval()]
    evaluate_ensemble(models, torch.randint(0, V, (2, T)))
    assert models[0].training and not models[1].training


def test_ece_of_a_calibrated_and_an_overconfident_predictor():
    rng = np.random.default_rng(0)
    n = 200_000
    confidence = rng.uniform(0.05, 1.0, n)
    calibrated = rng.uniform(size=n) < confidence  # right with exactly the stated probability
    # sampling noise of each bin's accuracy is ~ sqrt(c(1-c)/n_bin) ≈ 0.004 with 15 bins of ~13k positions
    assert expected_calibration_error(confidence, calibrated, 15) < 0.01
    overconfident = rng.uniform(size=n) < 0.6  # claims 0.9, right 60 % of the time
    assert expected_calibration_error(np.full(n, 0.9), overconfident, 15) == pytest.approx(0.3, abs=0.005)
    assert expected_calibration_error(confidence, calibrated, 15) == pytest.approx(
        naive_ece(confidence, calibrated, 15), abs=1e-12)


def test_ece_by_hand_and_bin_edges():
    # bins of width 0.5: (0, .5] gets 0.0 (edge), 0.25 and 0.5 (edge); (.5, 1] gets 0.75 and 1.0
    confidence = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    correct = np.array([0, 1, 0, 1, 1], dtype=bool)
    low = 3 / 5 * abs(1 / 3 - 0.75 / 3)
    high = 2 / 5 * abs(1.0 - 0.875)
    assert expected_calibration_error(confidence, correct, 2) == pytest.approx(low + high)
    bins = CalibrationBins(2)
    bins.update(torch.tensor(confidence), torch.tensor(correct))
    assert [row["count"] for row in bins.reliability()] == [3.0, 2.0]


def test_bad_inputs_raise_clear_errors():
    model = make_gpt()
    with pytest.raises(ValueError, match="member_weights must be 1 non-negative"):
        evaluate_ensemble([model], torch.randint(0, V, (2, T)), member_weights=[-1.0])
    with pytest.raises(ValueError, match="needs seq_len"):
        evaluate_ensemble([model], torch.randint(0, V, (20,)))
    with pytest.raises(ValueError, match="at least one member"):
        evaluate_ensemble([], torch.randint(0, V, (2, T)))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        expected_calibration_error([1.5], [True])
