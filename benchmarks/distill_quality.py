"""Distillation quality on real text: does a student trained from the cache beat CE, per step and per second?

Shape notation::

    B  sequences per batch   T  positions per sequence   V  vocabulary (BPE, ~8k)   K  cached top-k

Corpus: the Python standard library's own sources (the demo's corpus and tokenizer code, ``--vocab`` 8192);
held-out: the stdlib files after the training corpus (never in any cache). One teacher several times larger
than the students is trained once and kept in ``--work-dir``; ``kdcache build`` writes its caches there.
Per seed, one student per mode, all from the same initial weights, see the same batches in the same order
(one loader per cache, advanced in lockstep; their tokens are checked equal), with their steps interleaved
in a rotating order so machine load hits every mode alike:

* ``ce``: cross-entropy only.
* ``topk_bucket``: CE + KD from the top-k cache, exact tail bucket (``tail="bucket"``, the default).
* ``topk_renorm``: the same cache, teacher renormalized over its top-k (``tail="renormalize"``).
* ``sample`` / ``hybrid``: CE + KD from caches built with ``kdcache build --targets sample|hybrid``, when
  that option and the losses exist (otherwise reported as not available).
* ``online``: CE + full-vocabulary forward KL with the teacher run live on every batch (the ceiling, and
  what running the teacher online costs).

Correctness before timing: the cache's top-k equals the live teacher's top-k on the first batch, the cached
KD step loss equals ``kdlib.losses.kd_loss_reference``, and the online full-vocabulary KL equals ``kd_loss``
given all V teacher ids (the sparse loss with K = V is exact).

Reported: held-out loss per mode at equal steps (mean ± spread over seeds) and at equal wall-clock (each
mode's curve of held-out loss over its own cumulative step time, interpolated at the CE student's total time),
median step time of every mode over CE, cache bytes/token, a PNG of the curves.

Usage::

    python benchmarks/distill_quality.py --quick     # one seed, fewer steps, < 15 min on 2 CPU cores
    python benchmarks/distill_quality.py             # 3 seeds

Writes ``benchmarks/results/distill_quality{_quick}.{json,csv,png}``; the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "examples"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _demo_corpus import heldout_batch, heldout_loss, make_model, pick_threads, stdlib_files  # noqa: E402
from _demo_corpus import tokenize, train_teacher, train_tokenizer  # noqa: E402
from benchmarks._common import RESULTS_DIR, median, write_results  # noqa: E402

CACHED_MODES = {"topk_bucket": ("topk", {"tail": "bucket"}), "topk_renorm": ("topk", {"tail": "renormalize"}),
                "sample": ("sample", {}), "hybrid": ("hybrid", {})}


def log(msg: str) -> None:
    print(f"[distill_quality] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- caches


def build_flags() -> set[str]:
    """The options ``kdcache build --help`` lists (so modes that need a new option are probed, not assumed)."""
    text = subprocess.run([sys.executable, "-m", "cache_server", "build", "--help"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    return {word.rstrip(",=") for word in text.split() if word.startswith("--")}


def build_cache(kind: str, teacher_dir: Path, tokens_path: Path, out: Path, args, flags: set[str]) -> Path | str:
    """``kdcache build`` of one target kind into ``out`` (skipped when finished); a string says why not."""
    if (out / "manifest.json").exists():
        return out
    cmd = [sys.executable, "-m", "cache_server", "build", "--teacher", str(teacher_dir), "--data", str(tokens_path),
           "--seq-len", str(args.seq_len), "--out", str(out), "--batch-size", "16"]
    if kind != "topk" and "--targets" not in flags:
        return "not available: kdcache build has no --targets option yet"
    if kind == "topk":
        cmd += ["--topk", str(args.topk)]
    else:  # a sample cache has no top-k; a hybrid one has an exact head of H ids plus draws from the rest
        cmd += ["--targets", kind, "--samples", str(args.samples)]
        cmd += ["--topk", str(args.hybrid_head)] if kind == "hybrid" else []
    log("$ kdcache " + " ".join(cmd[3:]))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return f"not available: kdcache build --targets {kind} failed: {done.stderr.strip()[-400:]}"
    log(f"built {kind} cache in {time.perf_counter() - t0:.0f}s -> {out}")
    return out


# ----------------------------------------------------------------------------------------------- losses


def online_kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, ce_weight: float,
                   kd_weight: float) -> torch.Tensor:
    """ce_weight · CE + kd_weight · KL(teacher ‖ student) over the full vocabulary, mean over valid positions."""
    valid = labels.flatten() != -100  # [B·T]
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: the loss in float32
    z = logits.flatten(0, 1)[valid].to(dtype)  # [n, V]
    log_q = torch.log_softmax(teacher_logits.flatten(0, 1)[valid].to(dtype), -1)  # [n, V]
    kl = (log_q.exp() * (log_q - torch.log_softmax(z, -1))).sum(-1).mean()
    return ce_weight * F.cross_entropy(z, labels.flatten()[valid]) + kd_weight * kl


def check_correctness(teacher, batches: dict[str, dict], vocab: int, kd: dict[str, float]) -> dict[str, float]:
    """Cache vs live teacher, cached KD step loss vs the reference, online KL vs kd_loss with K = V."""
    import kdlib
    from kdlib.integrations import distill_loss
    from kdlib.losses import kd_loss_reference

    batch = batches["topk"]
    ids = batch["input_ids"][:2].long()  # [2, T]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits.float()  # [2, T, V]
        k = batch["topk_ids"].shape[-1]
        live = torch.log_softmax(t_logits, -1).topk(k, -1).values
        cached = batch["topk_logprobs"][:2].float()
        err_cache = float((live - cached).abs().max())
        if err_cache > 0.05:
            raise RuntimeError(f"cached top-k log-probs differ from the live teacher by {err_cache}")
        torch.manual_seed(0)
        z = torch.randn(2, ids.shape[1], vocab) * 2
        two = {key: (v[:2] if torch.is_tensor(v) and v.dim() > 0 else v) for key, v in batch.items()}
        step = float(distill_loss(z, two, **kd))
        ref = float(kd_loss_reference(
            z.double(), two["topk_ids"].long(), two["topk_logprobs"].double(), labels=two["labels"],
            teacher_lse=two["lse"].double(), **kd))
        all_ids = torch.arange(vocab).expand(2, ids.shape[1], vocab)
        exact = float(kdlib.kd_loss(z, all_ids, torch.log_softmax(t_logits, -1), labels=two["labels"], **kd))
        online = float(online_kd_loss(z, t_logits, two["labels"], kd["ce_weight"], kd["kd_weight"]))
    for name, a, b in (("cached KD step vs reference", step, ref), ("online KL vs kd_loss(K=V)", online, exact)):
        if abs(a - b) > 1e-3 * max(1.0, abs(b)):
            raise RuntimeError(f"{name}: {a} != {b}")
    return {"cache_vs_live_teacher_max_abs": err_cache, "step_vs_reference_abs": abs(step - ref),
            "online_vs_exact_sparse_abs": abs(online - exact)}


# ----------------------------------------------------------------------------------------------- training


def make_step(mode: str, model, opt, teacher, kd: dict[str, float], kind_options: dict) -> Callable[[dict], float]:
    from kdlib.integrations import distill_loss

    def step(batch: dict) -> float:
        ids = batch["input_ids"].long()  # [B, T]
        logits = model(input_ids=ids).logits  # [B, T, V]
        if mode == "ce":
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        elif mode == "online":
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits  # [B, T, V], the teacher run live
            loss = online_kd_loss(logits, teacher_logits, batch["labels"], kd["ce_weight"], kd["kd_weight"])
        else:
            loss = distill_loss(logits, batch, **kd, **kind_options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


# long: one loop owns the lockstep loaders, the rotating step order, the timing and the evaluation points
def train_seed(seed: int, modes: list[str], caches: dict[str, Any], teacher, eval_ids, eval_labels, vocab: int,
               args) -> dict[str, dict]:
    """All modes of one seed, interleaved; returns per mode its curve [(step, wall_s, heldout)] and step times."""
    import kdlib

    kd = {"ce_weight": args.ce_weight, "kd_weight": args.kd_weight}
    loaders = {kind: iter(kdlib.make_loader(c, batch_size=args.batch_size, shuffle=True, seed=seed, rank=0,
                                            world_size=1)) for kind, c in caches.items()}
    steps, models = {}, {}
    for mode in modes:
        models[mode] = make_model(vocab, hidden=args.student_hidden, layers=args.student_layers, seq_len=args.seq_len,
                                  seed=1000 + seed)
        opt = torch.optim.AdamW(models[mode].parameters(), lr=args.lr)
        steps[mode] = make_step(mode, models[mode], opt, teacher, kd, CACHED_MODES.get(mode, (None, {}))[1])
    first = heldout_loss(models[modes[0]], eval_ids, eval_labels)
    runs = {m: {"curve": [(0, 0.0, first)], "step_s": [], "train_loss": []} for m in modes}
    wall = {m: 0.0 for m in modes}
    if seed == args.seeds[0]:
        batches = {kind: next(iter(kdlib.make_loader(c, batch_size=args.batch_size, shuffle=True, seed=seed)))
                   for kind, c in caches.items()}
        runs["_correctness"] = check_correctness(teacher, batches, vocab, kd)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batches = {kind: next(it) for kind, it in loaders.items()}
        for kind, b in batches.items():
            if not torch.equal(b["input_ids"], batches["topk"]["input_ids"]):
                raise RuntimeError(f"the {kind} cache's batch {step} holds other tokens than the top-k cache's")
        shift = step % len(modes)
        for mode in modes[shift:] + modes[:shift]:  # rotating order: drift and load hit every mode alike
            batch = batches[CACHED_MODES[mode][0]] if mode in CACHED_MODES else batches["topk"]
            t0 = time.perf_counter()
            runs[mode]["train_loss"].append(steps[mode](batch))
            elapsed = time.perf_counter() - t0
            runs[mode]["step_s"].append(elapsed)
            wall[mode] += elapsed
        if step % args.eval_every == 0 or step == args.steps:
            for mode in modes:
                runs[mode]["curve"].append((step, wall[mode], heldout_loss(models[mode], eval_ids, eval_labels)))
            log(f"seed {seed} step {step}/{args.steps} ({time.perf_counter() - started:.0f}s): " + ", ".join(
                f"{m} {runs[m]['curve'][-1][2]:.3f}" for m in modes))
    return runs


def at_wall_time(curve: list[tuple[int, float, float]], wall_s: float) -> tuple[float, bool]:
    """Held-out loss interpolated at ``wall_s`` seconds of training; False when the run ended before it."""
    walls = [w for _, w, _ in curve]
    losses = [loss for _, _, loss in curve]
    if wall_s >= walls[-1]:
        return losses[-1], wall_s <= walls[-1] * 1.0001
    return float(np.interp(wall_s, walls, losses)), True


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


# ----------------------------------------------------------------------------------------------- report


def summarize(runs_by_seed: dict[int, dict], modes: list[str]) -> dict[str, Any]:
    """Equal-steps and equal-wall-clock held-out loss per mode (over seeds), step time over CE, wins per seed."""
    out: dict[str, Any] = {}
    for mode in modes:
        final = [runs[mode]["curve"][-1][2] for runs in runs_by_seed.values()]
        at_ce_wall, reached = [], []
        for runs in runs_by_seed.values():
            value, ok = at_wall_time(runs[mode]["curve"], runs["ce"]["curve"][-1][1])
            at_ce_wall.append(value)
            reached.append(ok)
        ratio = [median(runs[mode]["step_s"]) / median(runs["ce"]["step_s"]) for runs in runs_by_seed.values()]
        ce_final = [runs["ce"]["curve"][-1][2] for runs in runs_by_seed.values()]  # also CE at its own wall time
        out[mode] = {
            "heldout_equal_steps": spread(final),
            "heldout_equal_wall_clock": spread(at_ce_wall),
            "gain_vs_ce_equal_steps_per_seed": [round(c - f, 4) for c, f in zip(ce_final, final)],
            "gain_vs_ce_equal_wall_clock_per_seed": [round(c - f, 4) for c, f in zip(ce_final, at_ce_wall)],
            "ran_past_ce_wall_time": all(reached),
            "step_time_over_ce": spread(ratio),
            "step_median_ms": spread([1e3 * median(runs[mode]["step_s"]) for runs in runs_by_seed.values()]),
        }
    return out


def goals(table: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, checked on the measured numbers (None when the mode did not run)."""
    top = table.get("topk_bucket")
    if top is None:
        return {}
    cached = [m for m in ("topk_bucket", "topk_renorm", "sample", "hybrid") if m in table]
    best = min(cached, key=lambda m: table[m]["heldout_equal_steps"]["mean"])
    online = table.get("online")
    return {
        "topk_bucket_beats_ce_by_0.1_every_seed_equal_steps": min(top["gain_vs_ce_equal_steps_per_seed"]) >= 0.1,
        "topk_bucket_ahead_of_ce_every_seed_equal_wall_clock": min(top["gain_vs_ce_equal_wall_clock_per_seed"]) > 0,
        "topk_bucket_within_1pct_of_online": None if online is None else bool(
            top["heldout_equal_steps"]["mean"] <= 1.01 * online["heldout_equal_steps"]["mean"]),
        "best_cached_mode": best,
        "best_cached_step_time_over_ce_le_1.02": table[best]["step_time_over_ce"]["mean"] <= 1.02,
    }


def plot(runs_by_seed: dict[int, dict], modes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, mode in enumerate(modes):
        color = f"C{i}"
        for j, runs in enumerate(runs_by_seed.values()):
            steps, walls, losses = zip(*runs[mode]["curve"][1:])
            label = mode if j == 0 else None
            axes[0].plot(steps, losses, color=color, lw=1, marker="o", ms=2, label=label)
            axes[1].plot(walls, losses, color=color, lw=1, marker="o", ms=2, label=label)
    ce_wall = [runs["ce"]["curve"][-1][1] for runs in runs_by_seed.values()]
    axes[1].axvline(statistics.mean(ce_wall), color="gray", ls="--", lw=1, label="CE run's wall time")
    axes[0].set_xlabel("training step (same batches for every mode)")
    axes[1].set_xlabel("cumulative training-step wall time (s, steps interleaved)")
    axes[0].set_ylabel("held-out cross-entropy (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, fewer steps (< 15 min on 2 CPU cores)")
    p.add_argument("--work-dir", type=Path, default=REPO / "demo_out" / "distill_quality",
                   help="tokenizer, tokens, teacher and caches (reused by later runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default 0 1 2; quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="student steps (default 600; quick 150)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation interval (default steps/8)")
    p.add_argument("--corpus-bytes", type=int, default=3_000_000)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--samples", type=int, default=32, help="draws per position of the sample/hybrid caches")
    p.add_argument("--hybrid-head", type=int, default=8, help="exact head H of the hybrid cache")
    p.add_argument("--cache-sequences", type=int, default=None,
                   help="sequences of the training stream in the caches (default: batch x steps, so one epoch)")
    p.add_argument("--teacher-hidden", type=int, default=None, help="default 256; quick 192")
    p.add_argument("--teacher-layers", type=int, default=None, help="default 4; quick 2")
    p.add_argument("--teacher-steps", type=int, default=None, help="default 600; quick 150")
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--modes", default="ce,topk_bucket,topk_renorm,sample,hybrid,online")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: free CPUs)")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. a run of some --modes only)")
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (150 if args.quick else 600)
    args.eval_every = args.eval_every or max(1, args.steps // 8)
    args.teacher_steps = args.teacher_steps or (150 if args.quick else 600)
    args.teacher_hidden = args.teacher_hidden or (192 if args.quick else 256)
    args.teacher_layers = args.teacher_layers or (2 if args.quick else 4)
    args.cache_sequences = args.cache_sequences or args.batch_size * args.steps
    return args


def prepare(args) -> tuple[Any, dict, dict, int, torch.Tensor, torch.Tensor, Path]:
    """Tokenizer, tokens, teacher, caches and the held-out batch (each reused when already in the work dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    files = stdlib_files(args.corpus_bytes)
    tokenizer_dir = train_tokenizer(work, files, args.vocab)
    tokens_path = tokenize(work, tokenizer_dir, files)
    tokens = np.load(tokens_path)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    name = f"teacher_{args.teacher_layers}x{args.teacher_hidden}_{args.teacher_steps}steps"
    teacher_dir = train_teacher(work, tokens, vocab, args.seq_len, args.teacher_steps, hidden=args.teacher_hidden,
                                layers=args.teacher_layers, name=name)
    n = min(args.cache_sequences, len(tokens) // args.seq_len)
    train_path = work / f"train_{n}x{args.seq_len}.npy"
    if not train_path.exists():
        np.save(train_path, tokens[: n * args.seq_len].reshape(n, args.seq_len))
    flags = build_flags()
    caches, notes = {}, {}
    for kind in ("topk", "sample", "hybrid"):
        want = [m for m, (k, _) in CACHED_MODES.items() if k == kind and m in args.modes]
        if not want:
            continue
        tag = f"k{args.topk}" if kind == "topk" else f"n{args.samples}" + (f"h{args.hybrid_head}" if kind == "hybrid" else "")
        got = build_cache(kind, teacher_dir, train_path, work / f"cache_{kind}_{name}_{n}_{tag}", args, flags)
        if isinstance(got, str):
            notes[kind] = got
            log(f"{kind}: {got}")
        else:
            caches[kind] = got
    eval_files = stdlib_files(200_000, skip_bytes=args.corpus_bytes + 1)
    eval_ids, eval_labels = heldout_batch(np.load(tokenize(work, tokenizer_dir, eval_files, "heldout_tokens.npy")),
                                          args.seq_len)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True).eval()
    return teacher, caches, notes, vocab, eval_ids, eval_labels, teacher_dir


# long: the run's sequence (prepare, check, train every seed, summarize, write) reads best in one place
def main(argv: list[str] | None = None) -> dict[str, Any]:
    import kdlib
    from _demo_corpus import count_params

    args = parse_args(argv)
    torch.set_num_threads(pick_threads(args.threads))
    started = time.perf_counter()
    teacher, cache_dirs, notes, vocab, eval_ids, eval_labels, teacher_dir = prepare(args)
    caches = {kind: kdlib.open_cache(path) for kind, path in cache_dirs.items()}
    if "topk" not in caches:
        raise SystemExit("the top-k cache is required (it provides every mode's batches)")
    modes = []
    for mode in args.modes.split(","):
        kind = CACHED_MODES.get(mode, (None,))[0]
        if kind is None or kind in caches:
            modes.append(mode)
        else:
            notes.setdefault(mode, notes.get(kind, f"{kind} cache not built"))
    teacher_heldout = heldout_loss(teacher, eval_ids, eval_labels)
    log(f"teacher {teacher_dir.name}: {count_params(teacher) / 1e6:.2f}M params, held-out {teacher_heldout:.4f}; "
        f"modes {modes}; {len(args.seeds)} seed(s) x {args.steps} steps")
    runs_by_seed = {}
    for seed in args.seeds:
        runs_by_seed[seed] = train_seed(seed, modes, caches, teacher, eval_ids, eval_labels, vocab, args)
    correctness = runs_by_seed[args.seeds[0]].pop("_correctness")
    table = summarize(runs_by_seed, modes)
    student = make_model(vocab, hidden=args.student_hidden, layers=args.student_layers, seq_len=args.seq_len)
    summary = {
        "benchmark": "distill_quality", "quick": args.quick, "seeds": args.seeds, "steps": args.steps,
        "vocab": vocab, "seq_len": args.seq_len, "batch_size": args.batch_size, "topk": args.topk,
        "kd_weights": {"ce_weight": args.ce_weight, "kd_weight": args.kd_weight},
        "teacher": {"dir": str(teacher_dir), "params": count_params(teacher), "heldout": round(teacher_heldout, 4),
                    "layers": args.teacher_layers, "hidden": args.teacher_hidden, "steps": args.teacher_steps},
        "student": {"params": count_params(student), "layers": args.student_layers, "hidden": args.student_hidden},
        "heldout_sequences": len(eval_ids), "cache_sequences": caches["topk"].num_sequences,
        "cache_bytes_per_token": {k: json.loads((p / "manifest.json").read_text())["stats"]["bytes_per_token"]
                                  for k, p in cache_dirs.items()},
        "modes": table, "not_available": notes, "goals": goals(table), "correctness": correctness,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    tag = ("distill_quality_quick" if args.quick else "distill_quality") + (f"_{args.tag}" if args.tag else "")
    rows = [{"seed": seed, "mode": mode, "step": s, "wall_s": round(w, 4), "heldout": round(h, 5)}
            for seed, runs in runs_by_seed.items() for mode in modes for s, w, h in runs[mode]["curve"]]
    write_results(tag, summary, rows)
    plot(runs_by_seed, modes, RESULTS_DIR / f"{tag}.png",
         f"stdlib held-out loss, teacher {args.teacher_layers}x{args.teacher_hidden} ({teacher_heldout:.3f}), "
         f"students {args.student_layers}x{args.student_hidden}, V={vocab}, k={args.topk}, seeds {args.seeds}")
    for mode in modes:
        m = table[mode]
        log(f"{mode:12s} equal steps {m['heldout_equal_steps']['mean']:.4f} "
            f"[{m['heldout_equal_steps']['min']:.4f}, {m['heldout_equal_steps']['max']:.4f}]  equal wall-clock "
            f"{m['heldout_equal_wall_clock']['mean']:.4f}  step time / CE {m['step_time_over_ce']['mean']:.3f}")
    log(f"wrote {RESULTS_DIR / tag}.{{json,csv,png}}")
    print(json.dumps({k: v for k, v in summary.items() if k != "modes"} | {"heldout": {
        m: [round(table[m]["heldout_equal_steps"]["mean"], 4), round(table[m]["heldout_equal_wall_clock"]["mean"], 4),
            round(table[m]["step_time_over_ce"]["mean"], 3)] for m in modes}}))
    return summary


if __name__ == "__main__":
    main()
