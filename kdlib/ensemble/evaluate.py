"""Ensemble evaluation: probability-averaged loss, each member's loss, and expected calibration error.

Shape notation::

    M  members   B  sequences per batch   T  positions per sequence   V  vocabulary
    P  valid positions of a batch (label != ignore_index)   nb  calibration bins

The ensemble predicts the probability average ``p_ens = Σ_m w_m p_m`` (uniform w by default), computed in
log space as ``logsumexp_m(log p_m + log w_m)``; its loss is the mean of ``-log p_ens(label)`` over valid
positions (nats per token), like each member's loss with its own ``p_m``.

Expected calibration error (Guo et al. 2017) of the top-1 prediction: positions are put into ``nb``
equal-width bins by confidence c = max_v p(v), bin i holding ``i/nb < c <= (i+1)/nb`` (c = 0 goes to bin 0),
and ``ECE = Σ_i (n_i / n) · |accuracy_i − mean confidence_i|``. Bins are summed over the whole pass
(:class:`CalibrationBins`), so the value does not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kdlib.batch import DEFAULT_IGNORE_INDEX, batch_labels, shift_labels
from kdlib.integrations.step import logits_of

from .packed import PackedEnsemble

__all__ = ["CalibrationBins", "expected_calibration_error", "EnsembleEvaluation", "evaluate_ensemble"]


class CalibrationBins:
    """Streaming equal-width confidence bins (module docstring) for one predictor, or several side by side.

    Args:
        num_bins: nb, equal-width bins over [0, 1].
        predictors: how many predictors are binned side by side (their ``update`` inputs are [predictors, N]).
    """

    def __init__(self, num_bins: int = 15, predictors: int = 1) -> None:
        if int(num_bins) < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = int(num_bins)
        self.count = torch.zeros(predictors, self.num_bins, dtype=torch.float64)  # [predictors, nb]
        self.confidence_sum = torch.zeros_like(self.count)
        self.correct_sum = torch.zeros_like(self.count)

    def update(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Add positions: ``confidence`` [N] or [predictors, N] in [0, 1], ``correct`` of the same shape (bool)."""
        confidence = torch.as_tensor(confidence).detach().to("cpu", torch.float64)
        correct = torch.as_tensor(correct).detach().to("cpu", torch.float64)
        if confidence.dim() == 1:
            confidence, correct = confidence.unsqueeze(0), correct.unsqueeze(0)
        if confidence.shape != correct.shape or confidence.shape[0] != self.count.shape[0]:
            raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} must both be "
                             f"[{self.count.shape[0]}, N] (or [N] for one predictor)")
        if confidence.numel() and (confidence.min() < 0 or confidence.max() > 1):
            raise ValueError("confidences must be probabilities in [0, 1]")
        bins = (torch.ceil(confidence * self.num_bins).long() - 1).clamp(0, self.num_bins - 1)  # (i/nb, (i+1)/nb]
        self.count.scatter_add_(1, bins, torch.ones_like(confidence))
        self.confidence_sum.scatter_add_(1, bins, confidence)
        self.correct_sum.scatter_add_(1, bins, correct)

    def ece(self) -> torch.Tensor:
        """[predictors] expected calibration errors (0 for a predictor without positions)."""
        total = self.count.sum(1).clamp_min(1)
        gap = (self.correct_sum - self.confidence_sum).abs()  # n_i · |acc_i − conf_i|
        return gap.sum(1) / total

    def reliability(self, predictor: int = 0) -> list[dict[str, float]]:
        """Per bin: its bounds, position count, accuracy and mean confidence (a reliability diagram's data)."""
        rows = []
        for i in range(self.num_bins):
            n = float(self.count[predictor, i])
            rows.append({"lower": i / self.num_bins, "upper": (i + 1) / self.num_bins, "count": n,
                         "accuracy": float(self.correct_sum[predictor, i]) / n if n else float("nan"),
                         "confidence": float(self.confidence_sum[predictor, i]) / n if n else float("nan")})
        return rows


def expected_calibration_error(confidence: Any, correct: Any, num_bins: int = 15) -> float:
    """ECE of top-1 predictions with ``num_bins`` equal-width bins (module docstring).

    Args:
        confidence: [N] the predicted probability of each prediction, in [0, 1].
        correct: [N] whether each prediction was right (bool or 0/1).
        num_bins: nb.
    """
    bins = CalibrationBins(num_bins)
    bins.update(torch.as_tensor(np.asarray(confidence)).reshape(-1), torch.as_tensor(np.asarray(correct)).reshape(-1))
    return float(bins.ece()[0])


@dataclasses.dataclass(frozen=True)
class EnsembleEvaluation:
    """The result of :func:`evaluate_ensemble`; losses in nats per valid position."""

    ensemble_loss: float
    member_losses: tuple[float, ...]
    ensemble_accuracy: float
    member_accuracies: tuple[float, ...]
    ensemble_ece: float
    member_eces: tuple[float, ...]
    num_positions: int
    num_bins: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _device_of(members: Any) -> torch.device:
    modules = [members] if isinstance(members, nn.Module) else list(members)
    first = next((p for m in modules for p in m.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _batches(data: Any, batch_size: int, seq_len: int | None, ignore_index: int) -> Iterator[tuple[Any, Any]]:
    """(input_ids [B, T], labels [B, T]) from a token array ([N, T], or 1-D with seq_len) or batch dicts."""
    if isinstance(data, (np.ndarray, torch.Tensor)):
        tokens = torch.as_tensor(np.asarray(data) if isinstance(data, np.ndarray) else data)
        if tokens.dim() == 1:
            if not seq_len:
                raise ValueError("a 1-D token array needs seq_len= (it is cut into windows of seq_len tokens)")
            tokens = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"token arrays must be integer [N, T] (or 1-D with seq_len), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start:start + batch_size].long()
            yield ids, shift_labels(ids, ignore_index)
        return
    for batch in data:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError("evaluate_ensemble takes a token array or an iterable of batches with 'input_ids' "
                             "(kdlib.make_loader, CacheDataset)")
        yield torch.as_tensor(batch["input_ids"]).long(), batch_labels(batch, ignore_index)


def _member_logprobs(members: Any, ids: torch.Tensor, model_kwargs: Mapping[str, Any]) -> torch.Tensor:
    """[M, B, T, V] float32 log-probabilities of every member."""
    if isinstance(members, PackedEnsemble):
        logits = members.logits(ids, **model_kwargs)
    else:  # separate modules: one call each (evaluation, not the training hot path)
        logits = torch.stack([logits_of(m(ids, **model_kwargs)) for m in members])
    return torch.log_softmax(logits.float(), dim=-1)


class _Totals:
    """Running sums of one evaluation: NLL and correct counts per predictor (members then the ensemble)."""

    def __init__(self, predictors: int, num_bins: int) -> None:
        self.nll = torch.zeros(predictors, dtype=torch.float64)
        self.correct = torch.zeros(predictors, dtype=torch.float64)
        self.positions = 0
        self.bins = CalibrationBins(num_bins, predictors)

    def add(self, logp: torch.Tensor, labels: torch.Tensor) -> None:
        """``logp`` [predictors, P, V], ``labels`` [P]."""
        index = labels.view(1, -1, 1).expand(logp.shape[0], -1, 1)
        self.nll += -logp.gather(-1, index).squeeze(-1).double().sum(1).cpu()
        top_logp, top = logp.max(-1)  # [predictors, P]
        correct = top == labels.unsqueeze(0)
        self.correct += correct.double().sum(1).cpu()
        self.bins.update(top_logp.exp(), correct)
        self.positions += labels.numel()


def evaluate_ensemble(
    members: PackedEnsemble | Sequence[nn.Module],
    data: Any,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    member_weights: Sequence[float] | None = None,
    num_bins: int = 15,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    model_kwargs: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
) -> EnsembleEvaluation:
    """Probability-averaged loss, each member's loss, accuracies and ECEs in one no-grad pass.

    Args:
        members: a :class:`PackedEnsemble` (one vmapped call per batch) or a sequence of causal LMs
            (``model(input_ids)`` gives [B, T, V] logits, a tuple starting with them, or ``.logits``).
        data: a token array [N, T] (or 1-D with ``seq_len``), labels = the tokens shifted (last position
            ignored); or an iterable of cache batches (``kdlib.make_loader``), labels from them.
        batch_size: sequences per forward pass for token arrays.
        seq_len: window length for a 1-D token array.
        member_weights: [M] mixture weights (normalized here); default uniform.
        num_bins: ECE bins (module docstring).
        ignore_index: label of positions that do not count.
        model_kwargs: extra keyword arguments of the model calls (``{"use_cache": False}``).
        max_batches: stop after this many batches (None: the whole data).

    Returns:
        An :class:`EnsembleEvaluation` (members restored to their train/eval mode afterwards).

    Raises:
        ValueError: no members, bad weights, or data of an unknown kind.
    """
    modules = [members] if isinstance(members, PackedEnsemble) else list(members)
    m = members.num_members if isinstance(members, PackedEnsemble) else len(modules)
    if m < 1:
        raise ValueError("evaluate_ensemble needs at least one member")
    weights = torch.full((m,), 1.0 / m, dtype=torch.float64) if member_weights is None else torch.as_tensor(
        member_weights, dtype=torch.float64)
    if weights.shape != (m,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError(f"member_weights must be {m} non-negative weights with a positive sum, got {member_weights}")
    device = _device_of(members)
    log_w = (weights / weights.sum()).log().to(device, torch.float32).view(m, 1, 1)
    totals = _Totals(m + 1, num_bins)
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            for index, (ids, labels) in enumerate(_batches(data, batch_size, seq_len, ignore_index)):
                if max_batches is not None and index >= max_batches:
                    break
                ids, labels = ids.to(device), labels.to(device)
                valid = labels != ignore_index  # [B, T]
                logp = _member_logprobs(members, ids, dict(model_kwargs or {}))[:, valid]  # [M, P, V]
                mixture = torch.logsumexp(logp + log_w, dim=0, keepdim=True)  # [1, P, V]
                totals.add(torch.cat([logp, mixture]), labels[valid])
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    n = max(totals.positions, 1)
    loss, accuracy, ece = (totals.nll / n).tolist(), (totals.correct / n).tolist(), totals.bins.ece().tolist()
    return EnsembleEvaluation(
        ensemble_loss=loss[-1], member_losses=tuple(loss[:-1]), ensemble_accuracy=accuracy[-1],
        member_accuracies=tuple(accuracy[:-1]), ensemble_ece=ece[-1], member_eces=tuple(ece[:-1]),
        num_positions=totals.positions, num_bins=num_bins)
