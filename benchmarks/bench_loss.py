"""Benchmark the fused sparse-KD + CE loss against F.cross_entropy alone and the naive reference.

Shape notation: N rows (B·T), V vocabulary, K teacher top-k, H hidden size.

Measures fwd, bwd and fwd+bwd wall time (medians over interleaved repetitions A, B, C, A, B, C, ...) and
peak memory of:

    ce          F.cross_entropy(logits, labels)                         (the cost to match)
    kd_fused    kd_loss(ce_weight=1, forward_kl, tail=bucket), fused backend (torch on CPU, triton on CUDA)
    kd_sampled  kd_loss(ce_weight=1) on sampled targets: W = 64 slots, ~12 of them drawn (count > 0), the
                rest count-0 padding, with sample_logprobs (what a `--targets sample` cache holds)
    kd_hybrid   kd_loss(ce_weight=1) on hybrid targets: an exact head of H = 8 ids + the same W = 64 slots
    reference   the naive kd_loss_reference (full log_softmax + masks + autograd) on the top-k targets

and the fused-linear variant (kd_loss_from_hidden) vs materialized logits (hidden @ Wᵀ then kd_loss):
fwd+bwd time and peak memory, and eval time under torch.no_grad() (interleaved medians; the fused-linear
loss then skips all gradient work, so eval should cost well under its fwd+bwd).

Peak memory, CPU: the process's peak resident set (VmHWM in /proc/self/status) is reset through
/proc/self/clear_refs before each measured fwd+bwd and read after it, minus the resident size before.
glibc serves every allocation above its mmap threshold (at most 32 MiB) with mmap, so freed [N, V] tensors
really leave the resident set, and the number is what the OS had to provide: every buffer (the logits'
gradient, temporaries, heap growth from chunk temporaries, allocator slack) counts, nothing is modelled. CUDA: torch.cuda peak
allocated bytes. Correctness (values and gradients vs the reference: top-k, sampled and hybrid) is checked
before any timing.

Usage:
    python benchmarks/bench_loss.py --quick               # [4096, 32000] fp32 on CPU (+ CUDA shape if present)
    python benchmarks/bench_loss.py --rows 2048 --vocab 50000 --repeats 9
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16 --rows 8192 --vocab 128256 --out OUT_DIR
``--device auto`` (default) runs the CPU shape in ``--dtype`` and, when CUDA is present, also the CUDA shape
[8192, 128256] bf16; ``--device cpu`` / ``cuda`` runs only that device at ``--rows`` x ``--vocab`` in
``--dtype`` (what benchmarks/gpu_suite.sh uses). The last stdout line is one JSON object (the first device's
ratios); rows are appended to OUT/bench_loss.csv and the summary written to OUT/bench_loss.json (``--out``,
default benchmarks/results).

``--section crosstok`` times only the cross-tokenizer loss (``kdlib.crosstok.crosstok_loss``, fused path) vs
F.cross_entropy on the same student logits [B·T_s, V] (B = 8; teacher vocabulary 2V, 75 % of it mapped;
alignment mix EXACT / ULD / NONE = 62 / 19 / 19 %, as the crosstok_quality corpus; ce_weight = kd_weight = 0.5),
after checking it (value and gradient) against ``crosstok_loss_reference`` on a 16-position slice; results go
to OUT/bench_loss_crosstok.{csv,json} so the main reference files are not overwritten.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine_info  # noqa: E402
from kdlib.crosstok import EXACT, NONE, ULD, crosstok_loss, crosstok_loss_reference  # noqa: E402
from kdlib.losses import kd_loss, kd_loss_from_hidden, kd_loss_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024.0


class PeakMemory:
    """Peak extra memory (MB) of a block: CUDA peak allocated, or CPU peak RSS via VmHWM reset."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.peak_mb = _status_mb("VmHWM") - self.base


# Below this, a CPU peak (VmHWM minus the RSS before the block) is allocator noise: pages the heap reuses or
# returns make it 0 or even negative at tiny shapes, and a ratio over it means nothing.
_PEAK_RESOLUTION_MB = 1.0


def mem_ratio(num_mb: float, den_mb: float) -> float | None:
    """``num_mb / den_mb``, or None (JSON null) when the denominator is below the measurement's resolution."""
    if not den_mb >= _PEAK_RESOLUTION_MB:  # also NaN
        return None
    return max(num_mb, 0.0) / den_mb  # a negative peak is the same noise: nothing measurable was added


def make_inputs(n, vocab, k, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 2).to(device=device, dtype=dtype)
    topk_logprobs = torch.log_softmax(torch.randn(n, k, generator=g) * 3, -1) - 0.05  # sorted below
    topk_logprobs = topk_logprobs.sort(-1, descending=True).values.to(device=device, dtype=torch.float16)
    topk_ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(min(n, 64))])
    topk_ids = topk_ids.repeat((n + 63) // 64, 1)[:n].to(device=device, dtype=torch.int32)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    labels[::17] = -100
    return logits, topk_ids, topk_logprobs, labels


SAMPLE_SLOTS, SAMPLE_UNIQUE, SAMPLE_DRAWS, HYBRID_HEAD = 64, 12, 32, 8


def make_sample_targets(n, vocab, device, seed=0):
    """Sampled targets [N, W] like a `--targets sample` cache: ~12 drawn ids per row (counts summing to 32,
    ascending by nothing in particular), the other slots padding (count 0, id 0), fp16 log-probs; and a
    hybrid head [N, H] of other ids with its fp16 log-probs (descending)."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    base = min(n, 64)  # rows repeat (cheap to make); the loss does not care
    perm = torch.stack([torch.randperm(vocab, generator=g)[:SAMPLE_UNIQUE + HYBRID_HEAD] for _ in range(base)])
    draws = torch.randint(0, SAMPLE_UNIQUE, (base, SAMPLE_DRAWS), generator=g)
    counts = torch.zeros(base, SAMPLE_SLOTS, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    counts = counts.sort(1, descending=True).values
    ids = torch.zeros(base, SAMPLE_SLOTS, dtype=torch.int64)
    ids[:, :SAMPLE_UNIQUE] = perm[:, :SAMPLE_UNIQUE]
    ids = torch.where(counts > 0, ids, 0)
    logprobs = torch.where(counts > 0, -4.0 - 3.0 * torch.rand(base, SAMPLE_SLOTS, generator=g), 0.0)
    head_lps = torch.log_softmax(torch.randn(base, HYBRID_HEAD, generator=g) * 2, -1) - 0.3
    head_lps = head_lps.sort(-1, descending=True).values

    def rows(x, dtype):
        return x.repeat((n + base - 1) // base, 1)[:n].to(device=device, dtype=dtype)

    return dict(sample_ids=rows(ids, torch.int32), sample_counts=rows(counts, torch.uint8),
                sample_logprobs=rows(logprobs, torch.float16), sample_temperature=1.0), (
        rows(perm[:, SAMPLE_UNIQUE:], torch.int32), rows(head_lps, torch.float16))


def methods(backend, sampled, head):
    """Loss functions of the student logits z [N, V] and the top-k targets (ids, lps, labels)."""

    def ce(z, ids, lps, labels):
        return F.cross_entropy(z, labels, ignore_index=-100)

    def fused(z, ids, lps, labels):
        return kd_loss(z, ids, lps, labels=labels, ce_weight=1.0, kd_weight=1.0, divergence="forward_kl",
                       tail="bucket", backend=backend)

    def kd_sampled(z, ids, lps, labels, kd_backend=backend):
        return kd_loss(z, labels=labels, ce_weight=1.0, backend=kd_backend, **sampled)

    def kd_hybrid(z, ids, lps, labels, kd_backend=backend):
        return kd_loss(z, *head, labels=labels, ce_weight=1.0, backend=kd_backend, **sampled)

    def reference(z, ids, lps, labels):
        return kd_loss_reference(z, ids, lps, labels=labels, ce_weight=1.0, kd_weight=1.0)

    return {"ce": ce, "kd_fused": fused, "kd_sampled": kd_sampled, "kd_hybrid": kd_hybrid, "reference": reference}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, logits, args, device):
    z = logits.detach().requires_grad_(True)
    sync(device)
    t0 = time.perf_counter()
    loss = fn(z, *args)
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def peak_once(fn, logits, args, device):
    z = logits.detach().requires_grad_(True)
    with PeakMemory(device) as mem:
        loss = fn(z, *args)
        loss.backward()
        del loss
        z.grad = None
    return mem.peak_mb


def _value_and_grad(fn, logits, args, **kwargs):
    z = logits.detach().requires_grad_(True)
    loss = fn(z, *args, **kwargs)
    loss.backward()
    return loss.item(), z.grad.float()


def check_correct(fns, logits, args, dtype):
    """Each fused loss against its naive reference (values and gradients) before anything is timed."""
    pairs = [("kd_fused", fns["kd_fused"], fns["reference"], {})]
    pairs += [(name, fns[name], fns[name], {"kd_backend": "reference"}) for name in ("kd_sampled", "kd_hybrid")]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, fused, reference, ref_kwargs in pairs:
        value, grad = _value_and_grad(fused, logits, args)
        ref_value, ref_grad = _value_and_grad(reference, logits, args, **ref_kwargs)
        dv = abs(value - ref_value)
        dg = (grad - ref_grad).abs().max().item() / ref_grad.abs().max().item()
        if dv > tol * max(1.0, abs(ref_value)) or dg > tol:
            raise SystemExit(f"{name} disagrees with the reference: |dvalue|={dv:.3g}, rel |dgrad|={dg:.3g}")
        print(f"  checked {name:10s} vs reference: |dvalue|={dv:.2g}, rel |dgrad|={dg:.2g}", flush=True)


def bench_shape(n, vocab, k, dtype, device, backend, repeats, with_reference=True):
    logits, ids, lps, labels = make_inputs(n, vocab, k, dtype, device)
    sampled, head = make_sample_targets(n, vocab, device)
    fns = methods(backend, sampled, head)
    args = (ids, lps, labels)
    if with_reference:
        check_correct(fns, logits, args, dtype)
    else:
        fns.pop("reference")
    for fn in fns.values():  # warm-up
        time_once(fn, logits, args, device)
    times = {name: ([], []) for name in fns}
    for _ in range(repeats):  # interleaved: ce, fused, reference, ce, fused, reference, ...
        for name, fn in fns.items():
            f, b = time_once(fn, logits, args, device)
            times[name][0].append(f)
            times[name][1].append(b)
    peaks = {name: statistics.median(peak_once(fn, logits, args, device) for _ in range(3))
             for name, fn in fns.items()}
    out = {}
    for name in fns:
        fwd, bwd = times[name]
        out[name] = dict(fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd),
                         fwd_bwd_ms=statistics.median([a + b for a, b in zip(fwd, bwd)]), peak_mb=peaks[name])
    return out


def bench_fused_linear(n, hdim, vocab, k, dtype, device, backend, chunk_size, repeats):
    g = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(n, hdim, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(device=device, dtype=dtype)
    _, ids, lps, labels = make_inputs(n, vocab, k, dtype, device)

    def materialized(h, w):
        return kd_loss(h @ w.t(), ids, lps, labels=labels, ce_weight=1.0, backend=backend)

    def from_hidden(h, w):
        return kd_loss_from_hidden(h, w, ids, lps, labels=labels, ce_weight=1.0, backend=backend,
                                   chunk_size=chunk_size)

    res = {}
    for name, fn in (("materialized", materialized), ("from_hidden", from_hidden)):
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        loss = fn(h, w)
        loss.backward()
        res[name + "_value"] = loss.item()
        res[name + "_grads"] = (h.grad.float(), w.grad.float())
        peaks, times = [], []
        for _ in range(2):
            h = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            t0 = time.perf_counter()
            with PeakMemory(device) as mem:
                loss = fn(h, w)
                loss.backward()
                del loss
                h.grad = w.grad = None
            times.append((time.perf_counter() - t0) * 1e3)
            peaks.append(mem.peak_mb)
        res[name] = dict(peak_mb=min(peaks), fwd_bwd_ms=min(times))
    rel = max((a - b).abs().max().item() / a.abs().max().item()
              for a, b in zip(res["materialized_grads"], res["from_hidden_grads"]))
    # fp32: tight; bf16/fp16: materialized logits are rounded to the dtype, the fused-linear pass is not
    value_tol, grad_tol = (1e-4, 1e-3) if dtype in (torch.float32, torch.float64) else (2e-2, 5e-2)
    if abs(res["materialized_value"] - res["from_hidden_value"]) > value_tol * max(1.0, abs(res["materialized_value"])) \
            or rel > grad_tol:
        raise SystemExit(f"fused-linear disagrees with materialized logits (rel grad err {rel:.3g})")
    # eval loop: torch.no_grad(), the loss only; check the value first, then interleave A, B, A, B, ...
    fns = (("materialized", materialized), ("from_hidden", from_hidden))
    eval_ms = {name: [] for name, _ in fns}
    with torch.no_grad():
        for name, fn in fns:
            value = fn(hidden, weight).item()
            if abs(value - res[name + "_value"]) > 1e-6 * max(1.0, abs(value)):
                raise SystemExit(f"{name} under no_grad gives {value}, with grad {res[name + '_value']}")
        for _ in range(repeats):
            for name, fn in fns:
                sync(device)
                t0 = time.perf_counter()
                fn(hidden, weight)
                sync(device)
                eval_ms[name].append((time.perf_counter() - t0) * 1e3)
    for name, _ in fns:
        res[name]["eval_ms"] = statistics.median(eval_ms[name])
    return {k: v for k, v in res.items() if k in ("materialized", "from_hidden")}


CROSSTOK_BATCH, CROSSTOK_MIX = 8, (0.62, 0.19, 0.19)  # (EXACT, ULD, NONE) shares


def _append_csv(csv_path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``csv_path`` (a header first when the file is new): runs accumulate, none is overwritten."""
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def make_crosstok_inputs(n, vocab, k, device, seed=0):
    """Student logits [B, T_s, V] and cross-tokenizer targets (labels, teacher_pos, align, top-k, vocab_map)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, Ts = CROSSTOK_BATCH, n // CROSSTOK_BATCH
    logits = torch.randn(B, Ts, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (B, Ts), generator=g)
    labels[:, ::17] = -100
    u = torch.rand(B, Ts, generator=g)
    align = torch.where(u < CROSSTOK_MIX[0], EXACT, torch.where(u < CROSSTOK_MIX[0] + CROSSTOK_MIX[1], ULD, NONE))
    teacher_pos = torch.where(align == NONE, -1, torch.arange(Ts).expand(B, Ts))
    vocab_t = 2 * vocab
    vocab_map = torch.where(torch.rand(vocab_t, generator=g) < 0.75, torch.randint(0, vocab, (vocab_t,), generator=g), -1)
    lps = (torch.log_softmax(torch.randn(B, Ts, k, generator=g) * 3, -1) - 0.05).sort(-1, descending=True).values
    ids = torch.randint(0, vocab_t, (B, Ts, k), generator=g).to(torch.int32)
    targets = [x.to(device) for x in (labels, teacher_pos, align, ids, lps.to(torch.float16), vocab_map)]
    return logits.to(device), targets


def bench_crosstok(n, vocab, k, device, repeats):
    """fwd/bwd medians and peak MB of crosstok_loss vs CE on the same [N, V] student logits (checked first)."""
    logits, (labels, tpos, align, ids, lps, vmap) = make_crosstok_inputs(n, vocab, k, device)
    opts = dict(ce_weight=0.5, kd_weight=0.5)

    def ce(z):
        return F.cross_entropy(z.flatten(0, 1), labels.flatten(), ignore_index=-100)

    def crosstok(z, sl=(slice(None), slice(None)), loss=crosstok_loss):
        return loss(z, labels[sl], tpos[sl], align[sl], ids[sl], lps[sl], vmap, **opts)

    small = logits[:1, :16]  # the reference loops position by position: check a slice, then time the full shape
    value, grad = _value_and_grad(lambda z: crosstok(z[None], (slice(0, 1), slice(0, 16))), small[0], ())
    ref_value, ref_grad = _value_and_grad(
        lambda z: crosstok(z[None], (slice(0, 1), slice(0, 16)), crosstok_loss_reference), small[0], ())
    dv, dg = abs(value - ref_value), (grad - ref_grad).abs().max().item() / ref_grad.abs().max().item()
    if dv > 1e-5 * max(1.0, abs(ref_value)) or dg > 1e-5:
        raise SystemExit(f"crosstok_loss disagrees with the reference: |dvalue|={dv:.3g}, rel |dgrad|={dg:.3g}")
    print(f"  checked crosstok   vs reference: |dvalue|={dv:.2g}, rel |dgrad|={dg:.2g}", flush=True)
    fns = {"ce": ce, "crosstok_fused": crosstok}
    for fn in fns.values():  # warm-up
        time_once(fn, logits, (), device)
    times = {name: ([], []) for name in fns}
    for _ in range(repeats):  # interleaved: ce, crosstok, ce, crosstok, ...
        for name, fn in fns.items():
            f, b = time_once(fn, logits, (), device)
            times[name][0].append(f)
            times[name][1].append(b)
    out = {}
    for name, fn in fns.items():
        fwd, bwd = times[name]
        out[name] = dict(fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd),
                         fwd_bwd_ms=statistics.median([a + b for a, b in zip(fwd, bwd)]),
                         peak_mb=statistics.median(peak_once(fn, logits, (), device) for _ in range(3)))
    return out


def main_crosstok(args, repeats, command, stamp):
    """``--section crosstok``: the cross-tokenizer row alone, to OUT/bench_loss_crosstok.{csv,json}."""
    dev_name = "cuda" if args.device == "cuda" else "cpu"
    device = torch.device(dev_name)
    n = args.rows - args.rows % CROSSTOK_BATCH
    print(f"[bench_loss] crosstok {dev_name} N={n} V={args.vocab} K={args.topk}, {repeats} interleaved repeats",
          flush=True)
    res = bench_crosstok(n, args.vocab, args.topk, device, repeats)
    rows = []
    for name, r in res.items():
        print(f"  {name:22s} " + "  ".join(f"{k}={v:9.1f}" for k, v in r.items()), flush=True)
        rows.append(dict(timestamp=stamp, device=dev_name, rows=n, vocab=args.vocab, topk=args.topk, dtype="float32",
                         method=name, **r, machine=json.dumps(machine_info(device)), command=command))
    csv_path = args.out / "bench_loss_crosstok.csv"
    _append_csv(csv_path, rows)
    final = dict(crosstok_time_ratio_vs_ce=res["crosstok_fused"]["fwd_bwd_ms"] / res["ce"]["fwd_bwd_ms"],
                 crosstok_fwd_time_ratio_vs_ce=res["crosstok_fused"]["fwd_ms"] / res["ce"]["fwd_ms"],
                 crosstok_bwd_time_ratio_vs_ce=res["crosstok_fused"]["bwd_ms"] / res["ce"]["bwd_ms"],
                 crosstok_peak_mem_ratio_vs_ce=mem_ratio(res["crosstok_fused"]["peak_mb"], res["ce"]["peak_mb"]),
                 align_mix_exact_uld_none=list(CROSSTOK_MIX), shape=[n, args.vocab], dtype="float32",
                 device=dev_name, command=command)
    (args.out / "bench_loss_crosstok.json").write_text(json.dumps(final, indent=2) + "\n")
    print(f"[bench_loss] wrote {csv_path} and {args.out / 'bench_loss_crosstok.json'}", flush=True)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few repetitions of the default shapes")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=256, help="H of the fused-linear comparison")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of kd_loss_from_hidden")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU (+ the CUDA shape when present); cpu / cuda: that device only")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="logits / parameters dtype")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of bench_loss.{csv,json}")
    parser.add_argument("--section", choices=("main", "crosstok"), default="main",
                        help="main: the kd_loss rows (bench_loss.json); crosstok: the cross-tokenizer loss row "
                             "alone (bench_loss_crosstok.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    repeats = args.repeats or (5 if args.quick else 15)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if args.section == "crosstok":
        return main_crosstok(args, repeats, command, stamp)

    dtype = DTYPES[args.dtype]
    if args.device == "auto":
        runs = [("cpu", args.rows, args.vocab, dtype, "torch")]
        if torch.cuda.is_available():
            runs.append(("cuda", 8192, 128256, torch.bfloat16, "auto"))
    else:
        runs = [(args.device, args.rows, args.vocab, dtype, "torch" if args.device == "cpu" else "auto")]
    rows, summary = [], {}
    for dev_name, n, vocab, dtype, backend in runs:
        device = torch.device(dev_name)
        print(f"[bench_loss] {dev_name} N={n} V={vocab} K={args.topk} {dtype}, {repeats} interleaved repeats",
              flush=True)
        res = bench_shape(n, vocab, args.topk, dtype, device, backend, repeats)
        lin = bench_fused_linear(n, args.hidden, vocab, args.topk, dtype, device, backend, args.chunk_size, repeats)
        table = dict(res)
        for name, r in lin.items():  # eval time as its own row: the CSV keeps the columns it started with
            table[f"linear_{name}"] = {k: v for k, v in r.items() if k != "eval_ms"}
            table[f"linear_{name}_nograd"] = {"fwd_ms": r["eval_ms"]}
        for name, r in table.items():
            print(f"  {name:22s} " + "  ".join(f"{k}={v:9.1f}" for k, v in r.items()), flush=True)
            rows.append(dict(timestamp=stamp, device=dev_name, rows=n, vocab=vocab, topk=args.topk,
                             dtype=str(dtype).replace("torch.", ""), method=name, **r,
                             machine=json.dumps(machine_info(device)), command=command))
        summary[dev_name] = dict(
            time_ratio_vs_ce=res["kd_fused"]["fwd_bwd_ms"] / res["ce"]["fwd_bwd_ms"],
            fwd_time_ratio_vs_ce=res["kd_fused"]["fwd_ms"] / res["ce"]["fwd_ms"],
            bwd_time_ratio_vs_ce=res["kd_fused"]["bwd_ms"] / res["ce"]["bwd_ms"],
            peak_mem_ratio_vs_ce=mem_ratio(res["kd_fused"]["peak_mb"], res["ce"]["peak_mb"]),
            sampled_time_ratio_vs_ce=res["kd_sampled"]["fwd_bwd_ms"] / res["ce"]["fwd_bwd_ms"],
            sampled_peak_mem_ratio_vs_ce=mem_ratio(res["kd_sampled"]["peak_mb"], res["ce"]["peak_mb"]),
            hybrid_time_ratio_vs_ce=res["kd_hybrid"]["fwd_bwd_ms"] / res["ce"]["fwd_bwd_ms"],
            hybrid_peak_mem_ratio_vs_ce=mem_ratio(res["kd_hybrid"]["peak_mb"], res["ce"]["peak_mb"]),
            time_ratio_reference_vs_ce=res["reference"]["fwd_bwd_ms"] / res["ce"]["fwd_bwd_ms"],
            peak_mem_ratio_reference_vs_ce=mem_ratio(res["reference"]["peak_mb"], res["ce"]["peak_mb"]),
            fused_linear_peak_mem_ratio_vs_materialized=mem_ratio(lin["from_hidden"]["peak_mb"],
                                                                  lin["materialized"]["peak_mb"]),
            fused_linear_time_ratio_vs_materialized=lin["from_hidden"]["fwd_bwd_ms"] / lin["materialized"]["fwd_bwd_ms"],
            fused_linear_eval_time_ratio_vs_train=lin["from_hidden"]["eval_ms"] / lin["from_hidden"]["fwd_bwd_ms"],
            fused_linear_eval_time_ratio_vs_materialized=lin["from_hidden"]["eval_ms"] / lin["materialized"]["eval_ms"],
        )
    csv_path = out_dir / "bench_loss.csv"
    _append_csv(csv_path, rows)
    first, n0, v0, dtype0, _ = runs[0]
    final = dict(summary[first], shape=[n0, v0], dtype=str(dtype0).replace("torch.", ""), device=first,
                 cuda=summary.get("cuda") if first != "cuda" else None, command=command)
    (out_dir / "bench_loss.json").write_text(json.dumps(final, indent=2) + "\n")
    print(f"[bench_loss] wrote {csv_path} and {out_dir / 'bench_loss.json'}", flush=True)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()}))


if __name__ == "__main__":
    main()
