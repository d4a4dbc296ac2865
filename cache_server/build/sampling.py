"""Sampled targets of ``kdcache build --targets sample|hybrid``: reproducible draws from the teacher, in slots.

Per position the build draws D ids with replacement from the teacher at the sampling temperature tau_s,

    sample:  p(y) = softmax(z / tau_s)_y                    over the full vocabulary
    hybrid:  p(y) ∝ exp(z_y / tau_s) · [y not in head]       the top-H head is stored exactly instead

and stores the distinct ids with their counts in W slots (docs/FORMAT.md, "Target kinds").

Shape notation::

    B  sequences per forward batch     T  sequence length       V  teacher vocabulary size
    D  draws per position (--samples)  W  slots per position    P  positions of a batch (B * T)
    n  positions in one row chunk      H  hybrid head size (--topk)

Reproducibility: the D uniforms of every position of sequence i come from a CPU ``torch.Generator``
(MT19937, the same bits on every machine) seeded with ``sequence_seed(seed, i)``, where the cache's
``seed = sample_seed(...)`` hashes the teacher's identity and the sampling settings. So a draw depends only
on the sequence, never on the batch it ran in, the rank, or a resume; the uniforms then move to the logits'
device, where :func:`draw_ids` inverts the fp32 CDF (cumsum + searchsorted).

Precision: the draws follow the fp32 cumulative sums of the unnormalized weights w = exp((z - max z) / tau_s)
(taken group by group, see ``_GROUP_SIZE``; PyTorch's CPU cumsum accumulates in float64), so each id's
probability is off by about 1e-7 (absolute) at most; an id whose fp32 weight is exactly 0 (e^-104 below the
maximum, or in the hybrid head) is never drawn. The uniforms are multiples of 2^-24: an id of probability
below ~6e-8 is drawn at a rate rounded to that grid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["SampleRequest", "sample_seed", "layout_seed", "sequence_seed", "sequence_uniforms", "draw_ids",
           "pack_slots", "slot_logprobs"]


@dataclass(frozen=True)
class SampleRequest:
    """What ``compute_targets`` draws for one batch (``None`` there: no sampling)."""

    uniforms: torch.Tensor  # [B, T, D] fp32 in [0, 1), on the logits' device (from sequence_uniforms)
    slots: int  # W
    temperature: float = 1.0  # tau_s
    hybrid: bool = False  # draw from the vocabulary minus the top-k head
    logprobs: bool = True  # also return sample_logprobs


def sample_seed(teacher: Any, targets: str, topk: int, samples: int, slots: int, temperature: float) -> int:
    """The cache's sampling seed: a stable 63-bit hash of the teacher's identity and the sampling settings.

    Args:
        teacher: the teacher's identity (JSON-serializable: the build settings' ``teacher`` entry).
        targets: ``"sample"`` or ``"hybrid"``.
        topk: the hybrid head H (0 for sample).
        samples: D.
        slots: W.
        temperature: tau_s.
    """
    key = {"teacher": teacher, "targets": targets, "topk": int(topk), "samples": int(samples),
           "slots": int(slots), "sample_temperature": float(temperature)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def layout_seed(layout: Any, settings: Mapping[str, Any]) -> int:
    """:func:`sample_seed` of a sample / hybrid layout and its build settings (whose ``teacher`` it hashes)."""
    return sample_seed(settings.get("teacher"), layout.targets, layout.topk, layout.samples, layout.sample_slots,
                       layout.sample_temperature)


def sequence_seed(seed: int, sequence: int) -> int:
    """The generator seed of one cache sequence (a hash, so nearby sequences get unrelated streams)."""
    digest = hashlib.sha256(f"kdcache-sample:{int(seed)}:{int(sequence)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sequence_uniforms(seed: int, start: int, stop: int, seq_len: int, samples: int) -> torch.Tensor:
    """[stop - start, T, D] fp32 uniforms in [0, 1) of sequences [start, stop), on the CPU, deterministic."""
    out = torch.empty(stop - start, seq_len, samples, dtype=torch.float32)
    generator = torch.Generator(device="cpu")
    for row, sequence in enumerate(range(start, stop)):
        generator.manual_seed(sequence_seed(seed, sequence))
        torch.rand(seq_len, samples, generator=generator, out=out[row])
    return out


# Draws are located in two steps when D * _GROUP_SIZE <= V: first the group of S = _GROUP_SIZE consecutive
# ids (a cumsum over the V / S group sums), then the id inside it (a cumsum over the S weights of that group,
# per draw). A CPU cumsum is a sequential float64-accumulating scan, ~2x the cost of the exp pass over the
# same elements, so the plain cumsum over all of V would cost more than any other pass of a build. Measured
# on [20, 50257] rows, one core, D = 32 (best of 30, interleaved): exp pass 0.90 ms; draws with the full
# cumsum 2.10 ms; grouped with S = 16/32/64/128/256: 1.78/1.29/1.27/1.22/1.56 ms (D = 8: S = 64 1.17 ms).
_GROUP_SIZE = 64


def draw_ids(weights: torch.Tensor, uniforms: torch.Tensor, cdf: torch.Tensor,
             head_ids: torch.Tensor | None = None) -> torch.Tensor:
    """D ids per row drawn from the rows of ``weights`` (unnormalized), by inverting their CDF.

    Draw j of row r is the first id whose cumulative weight exceeds ``u[r, j] · total[r]`` (``right=True``),
    so an id of weight 0 is never drawn: its cumulative weight equals its predecessor's. With D * S <= V the
    cumulative weights are taken group by group (see ``_GROUP_SIZE``): the same inversion, in two steps.

    Args:
        weights: [n, V] non-negative fp32 (not modified).
        uniforms: [n, D] fp32 in [0, 1).
        cdf: [n, V] fp32 scratch (overwritten).
        head_ids: [n, H] ids excluded from the draws (hybrid), or None.

    Returns:
        [n, D] int64 ids (in [0, V); garbage but in range for rows with non-finite weights, which the
        build refuses anyway). A hybrid row whose non-head weights are all 0 in fp32 returns -1: the
        caller puts the best non-head id there.
    """
    n, V = weights.shape
    if head_ids is not None:
        weights = cdf.copy_(weights).scatter_(1, head_ids, 0.0)  # the rest of the vocabulary only
    if uniforms.shape[1] * _GROUP_SIZE <= V:
        ids, total = _draw_grouped(weights, uniforms, _GROUP_SIZE)
    else:
        if weights is cdf:  # hybrid: the masked copy already is in the scratch buffer
            cdf.cumsum_(dim=-1)
        else:
            torch.cumsum(weights, dim=-1, out=cdf)
        total = cdf[:, -1:]  # [n, 1]
        ids = torch.searchsorted(cdf, _below(uniforms * total, total), right=True).clamp_(max=V - 1)  # [n, D]
    if head_ids is not None:
        ids.masked_fill_(total == 0, -1)
    return ids


def _below(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """x, but strictly below ``total`` (u < 1, yet u * total may round up to it); the largest float below the
    total still lands on an id of positive weight."""
    return torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))


def _draw_grouped(weights: torch.Tensor, uniforms: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-step inversion: (ids [n, D] int64, row totals [n, 1])."""
    n, V = weights.shape
    G = V // S
    sums = weights[:, : G * S].view(n, G, S).sum(dim=-1)  # [n, G]
    if G * S < V:  # the < S tail ids are one more, shorter group
        sums = torch.cat([sums, weights[:, G * S :].sum(dim=-1, keepdim=True)], dim=1)  # [n, G + 1]
    group_cdf = sums.cumsum_(dim=-1)  # [n, G']
    total = group_cdf[:, -1:]  # [n, 1]
    x = _below(uniforms * total, total)  # [n, D]
    group = torch.searchsorted(group_cdf, x, right=True).clamp_(max=group_cdf.shape[1] - 1)  # [n, D]
    before = torch.where(group > 0, group_cdf.gather(1, (group - 1).clamp(min=0)), 0.0)  # [n, D]
    # Group g's S weights as one window of the row (no copy until indexed); the short tail group is the
    # window of the last S ids, whose first S - tail ids (of the group before) the search skips.
    start = (group * S).clamp_(max=V - S)  # [n, D]
    rows = torch.arange(n, device=weights.device).unsqueeze(1)  # [n, 1]
    inside = weights.unfold(1, S, 1)[rows, start].cumsum_(dim=-1)  # [n, D, S]: cumsum of weights[r, start + j]
    rest = x - before  # [n, D]; >= 0 exactly, as x >= before (searchsorted)
    if G * S < V:  # tail draws: search past the cumulative weight of the skipped ids
        rest = torch.where(group == G, rest + inside[..., S - (V - G * S) - 1], rest)
    # Below the window's own total, the search picks an id of positive weight inside it even where the group
    # sum and this cumsum round differently.
    rest = _below(rest.unsqueeze(-1), inside[..., -1:])  # [n, D, 1]
    offset = torch.searchsorted(inside, rest, right=True).clamp_(max=S - 1)  # [n, D, 1]
    return start + offset.squeeze(-1), total


def pack_slots(draws: torch.Tensor, slots: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids of each row's draws with their counts, by descending count (ties: ascending id).

    Args:
        draws: [P, D] int64 ids in [0, V).
        slots: W; rows with more than W distinct ids keep the W most frequent (the caller counts the rest).
        vocab_size: V.

    Returns:
        ids [P, W] int64 and counts [P, W] int64; padding slots (fewer than W distinct ids) are id 0, count 0.
    """
    P, D = draws.shape
    ordered = draws.sort(dim=-1).values  # [P, D]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = starts.cumsum(dim=-1) - 1  # [P, D] index of each draw's distinct id
    counts = torch.zeros_like(ordered).scatter_add_(1, run, torch.ones_like(ordered))  # [P, D]
    ids = torch.zeros_like(ordered).scatter_(1, run, ordered)  # equal values per run: deterministic
    # One sort key: -count * V + id (ascending = descending count, then ascending id); padding (count 0,
    # id 0) has key 0, above every real entry (<= -V + V - 1 = -1).
    key = (ids - counts * vocab_size).sort(dim=-1).values[:, :slots]  # [P, W]
    counts = (vocab_size - 1 - key).div(vocab_size, rounding_mode="floor")  # ceil(-key / V) = c; 0 on padding
    return key + counts * vocab_size, counts


def slot_logprobs(flat_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                  lse: torch.Tensor) -> torch.Tensor:
    """log p_teacher(id) at temperature 1 for every slot, in fp32: z[id] - lse; 0 on padding slots.

    Args:
        flat_logits: [P, V] teacher logits (any float dtype; gathered, then upcast exactly).
        ids: [P, W] int64.
        counts: [P, W] (padding where 0).
        lse: [P] fp32 logsumexp of the logits.
    """
    values = flat_logits.gather(1, ids).float() - lse.unsqueeze(1)  # [P, W]
    return values.masked_fill_(counts == 0, 0.0)
