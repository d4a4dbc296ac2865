"""Two students trained side by side from one cache loader: CE only vs CE + KD (the fused sparse-KD loss).

Shape notation::

    B  sequences per batch   T  positions per sequence   V  vocabulary   K  cached top-k

Both students start from the same weights and see the same batch at every step (one ``kdlib.make_loader``
over the cache, here read from ``kdcache serve``); their steps alternate in ABBA order (CE, KD, KD, CE, ...)
so machine load hits both alike, and the ratio of the median step times is measured in the same run. A step
is forward + loss + backward + AdamW; fetching the shared batch is timed separately (``fetch_s``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from _demo_corpus import count_params, heldout_loss, log, make_model

__all__ = ["train_side_by_side", "format_table", "plot_curves"]

MODES = ("ce", "kd")


def _cycle(loader) -> Iterator[dict]:
    while True:
        yield from loader


def _step_fn(mode: str, model, opt, kd_kwargs: dict[str, Any]) -> Callable[[dict], float]:
    from kdlib.integrations import distill_loss

    def step(batch: dict) -> float:
        ids = batch["input_ids"].long()  # [B, T]
        logits = model(input_ids=ids).logits  # [B, T, V]
        if mode == "ce":
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        else:  # fused CE + KD against the teacher's cached top-k and exact tail mass
            loss = distill_loss(logits, batch, **kd_kwargs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


# long: one loop owns the interleaving, the timing and the evaluation points of both students
def train_side_by_side(cache, eval_ids: torch.Tensor, eval_labels: torch.Tensor, *, vocab_size: int, steps: int,
                       hidden: int = 64, layers: int = 1, batch_size: int = 8, lr: float = 3e-3,
                       eval_every: int = 25, kd_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the CE and the KD student for ``steps`` steps each on the same batches, interleaved.

    Args:
        cache: a ``kdlib`` cache reader (local or remote).
        eval_ids, eval_labels: held-out [n, T] ids and labels (never in the cache).
        vocab_size: V of the students (the teacher's).
        steps: training steps per student.
        hidden, layers, batch_size, lr: the students' shape and optimizer.
        eval_every: held-out loss every this many steps (and at the end), for the curves.
        kd_kwargs: ``distill_loss`` options of the KD student (default ce_weight 0.5, kd_weight 0.5).

    Returns:
        ``{"heldout": {mode: loss}, "curves": {mode: [(step, heldout)]}, "train_loss": {mode: [..]},
        "step_s": {mode: [..]}, "fetch_s": [..], "params": n, "kd_over_ce_step_time": ratio}``.
    """
    import kdlib

    kd_kwargs = kd_kwargs or {"ce_weight": 0.5, "kd_weight": 0.5}
    models, steps_by_mode = {}, {}
    for mode in MODES:
        models[mode] = make_model(vocab_size, hidden=hidden, layers=layers, seq_len=cache.seq_len, seed=1)
        opt = torch.optim.AdamW(models[mode].parameters(), lr=lr)
        steps_by_mode[mode] = _step_fn(mode, models[mode], opt, kd_kwargs)
    if not all(torch.equal(a, b) for a, b in zip(models["ce"].parameters(), models["kd"].parameters())):
        raise RuntimeError("the two students must start from the same weights")
    batches = _cycle(kdlib.make_loader(cache, batch_size=batch_size, shuffle=True, seed=0, rank=0, world_size=1))
    curves: dict[str, list] = {m: [(0, heldout_loss(models[m], eval_ids, eval_labels))] for m in MODES}
    train_loss: dict[str, list] = {m: [] for m in MODES}
    step_s: dict[str, list] = {m: [] for m in MODES}
    fetch_s: list[float] = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        fetch_s.append(time.perf_counter() - t0)
        for mode in MODES if step % 2 else MODES[::-1]:  # ABBA: drift and load hit both students alike
            t0 = time.perf_counter()
            train_loss[mode].append(steps_by_mode[mode](batch))
            step_s[mode].append(time.perf_counter() - t0)
        if step % eval_every == 0 or step == steps:
            for mode in MODES:
                curves[mode].append((step, heldout_loss(models[mode], eval_ids, eval_labels)))
            log(f"students step {step}/{steps}: held-out CE {curves['ce'][-1][1]:.3f}, KD {curves['kd'][-1][1]:.3f} "
                f"({step / (time.perf_counter() - started):.2f} steps/s per pair)")
    medians = {m: statistics.median(step_s[m]) for m in MODES}
    return {
        "heldout": {m: curves[m][-1][1] for m in MODES},
        "curves": curves, "train_loss": train_loss, "step_s": step_s, "fetch_s": fetch_s,
        "params": count_params(models["ce"]),
        "step_median_s": medians,
        "kd_over_ce_step_time": medians["kd"] / medians["ce"],
        "kd_over_ce_step_time_paired_median": statistics.median(k / c for k, c in zip(step_s["kd"], step_s["ce"])),
        "kd_kwargs": kd_kwargs,
    }


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    """A two-column plain-text table (label, value) under ``title``."""
    width = max(len(label) for label, _ in rows)
    lines = [title, "-" * max(len(title), width + 30)]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def plot_curves(result: dict[str, Any], teacher_heldout: float, path: Path, title: str) -> Path:
    """Held-out loss per step of both students (and the teacher's as a line) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, label in (("ce", "CE-only student"), ("kd", "KD student (from the served cache)")):
        xs, ys = zip(*result["curves"][mode])
        ax.plot(xs, ys, marker="o", ms=3, label=f"{label}: {ys[-1]:.3f}")
    ax.axhline(teacher_heldout, color="gray", ls="--", lw=1, label=f"teacher: {teacher_heldout:.3f}")
    ax.set_xlabel("training step (same batches for both students)")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(top=min(max(max(y for _, y in result["curves"]["ce"][1:]) + 0.5, teacher_heldout + 1), 9.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
