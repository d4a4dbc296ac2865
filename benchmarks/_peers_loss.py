"""The loss side of benchmarks/compare_peers.py: kdcache's losses against their peers on identical inputs.

Shape notation: N rows (B·T), V vocabulary, K teacher top-k, H hidden size.

Three comparisons, fwd+bwd wall time (paired interleaved rounds A, B, C, A, B, C, ..., medians) and peak extra
memory (:class:`benchmarks.bench_loss.PeakMemory`: CPU peak RSS over the block, CUDA peak allocated):

* logits [N, V] (default [4096, 32000] fp32, K = 32): ``kdcache`` (kd_loss, forward KL with the tail bucket
  + CE), ``ce`` (F.cross_entropy), ``naive_topk`` (kdlib's naive torch reference, the same loss),
  ``axolotl`` (its top-k forward-KL loss, vendored in benchmarks/peers/axolotl_kd.py), ``trl_gkd``
  (``trl.GKDTrainer.generalized_jsd_loss``, β = 0.5: a dense teacher [N, V], the only input it takes);
* from hidden states [N, H] × lm_head [V, H] (default [4096, 512] × [32000, 512]): ``kdcache_from_hidden``
  (kd_loss_from_hidden, same loss as ``kdcache``), ``materialized`` (hidden @ Wᵀ, then kd_loss),
  ``liger_jsd`` (``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``, torch.compile'd chunks; it needs the
  teacher's hidden states and head too: a dense teacher), ``axolotl_fused`` (axolotl's chunked top-k KL on
  Liger's distillation base, vendored; KD only: its CE term has no gradient there, see :func:`_axolotl_fused`);
* CE only from hidden states: ``kdcache_ce`` (kd_loss_from_hidden with kd_weight = 0) vs ``cce``
  (``cut_cross_entropy.linear_cross_entropy``; on CPU its ``torch_compile`` implementation, the only one
  there: the CCE Triton kernel needs CUDA).

Correctness before timing (:func:`check_peers`): on a small float64 instance each peer's value and gradients
against kdcache's loss under the peer's conventions (axolotl: teacher renormalized over the top-k, student
full-vocab, no CE; TRL / Liger: JSD(β) with the whole vocabulary as support, no τ²; CCE: CE), agreeing to
1e-6 (1e-5 for CCE, which casts logits to float32). A peer that cannot run here is a row with its error.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.bench_loss import PeakMemory, make_inputs, sync
from kdlib.losses import kd_loss, kd_loss_from_hidden, kd_loss_reference

__all__ = ["check_peers", "loss_rows"]

BETA = 0.5  # TRL 0.11 mixes β·student + (1−β)·teacher, Liger and kdlib β·teacher: equal at 0.5


def _trl_jsd():
    """``GKDTrainer.generalized_jsd_loss``: ``trl.GKDTrainer`` up to 0.2x, ``trl.experimental.gkd`` in trl 1.x."""
    try:
        from trl import GKDTrainer
    except ImportError:
        from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def _liger_jsd(weight_hard: float, weight_soft: float, compiled: bool = True):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(weight_hard_loss=weight_hard, weight_soft_loss=weight_soft, beta=BETA,
                                   compiled=compiled, chunk_size=1024)


def _cce(h, w, labels):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if h.is_cuda else "torch_compile"
    return linear_cross_entropy(h, w, labels, impl=impl)


def _axolotl_fused(h, w, ids, lps, labels, weight_hard=0.0, weight_soft=1.0):
    """axolotl's fused-linear top-k KL, KD only by default: its CE term enters the value but not the gradient
    (``torch.func.grad_and_value(..., has_aux=True)`` differentiates the first output, the KD sum, and carries
    the CE sum as aux), so with CE on its gradients are not those of its loss."""
    from benchmarks.peers.axolotl_kd import LigerFusedLinearKLTopKLogprobFunction

    # axolotl shifts labels by one inside (labels[:, 1:], -100 appended); feed it ours shifted right so both see
    # the same labels (the last row's is then -100: the caller makes ours so too); its KD mask: our valid rows
    shifted = torch.cat([torch.full_like(labels[:1], -100), labels[:-1]]).unsqueeze(0)
    mask = (labels != -100).unsqueeze(1).expand(ids.shape).unsqueeze(0)
    return LigerFusedLinearKLTopKLogprobFunction.apply(
        h.unsqueeze(0), w, ids.long().unsqueeze(0), lps.unsqueeze(0), mask, shifted, None, weight_hard,
        weight_soft, -100, 1.0, 0.0, False, 1024, True, False)


def _renormalized(lps: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(lps.double(), -1).to(lps.dtype)


# ------------------------------------------------------------------------------------------------ correctness
def _grads(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.item(), [g.detach() for g in grads]


def _agree(name: str, ours, theirs, tol: float) -> dict[str, Any]:
    dv = abs(ours[0] - theirs[0])
    dg = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() for a, b in zip(ours[1], theirs[1]))
    ok = dv <= tol * max(1.0, abs(ours[0])) and dg <= tol
    return dict(pair=name, abs_value_diff=dv, rel_grad_diff=dg, tolerance=tol, ok=ok)


# long: one small instance per peer, each a few lines
def check_peers(n: int = 24, hdim: int = 8, vocab: int = 97, k: int = 6, seed: int = 0,
                compiled: bool = True) -> list[dict[str, Any]]:
    """Each peer against kdcache under the peer's conventions, float64 (module docstring); returns one record
    per pair (``ok`` False or ``error`` set when a pair disagrees or cannot run). ``compiled=False`` runs
    Liger uncompiled and leaves out CCE (its CPU path is torch.compile only): the same math, no compile time."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    z = torch.randn(n, vocab, generator=g, dtype=f64) * 2
    teacher = torch.randn(n, vocab, generator=g, dtype=f64) * 2
    lps_all, ids_all = torch.log_softmax(teacher, -1).sort(-1, descending=True)
    ids, lps = ids_all[:, :k].contiguous(), lps_all[:, :k].contiguous()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100
    lse = torch.logsumexp(teacher, -1)
    h = torch.randn(n, hdim, generator=g, dtype=f64)
    w = torch.randn(vocab, hdim, generator=g, dtype=f64) / hdim**0.5
    th = torch.randn(n, hdim, generator=g, dtype=f64)
    tw = torch.randn(vocab, hdim, generator=g, dtype=f64) / hdim**0.5
    t_logits = th @ tw.t()
    t_lps, t_ids = torch.log_softmax(t_logits, -1).sort(-1, descending=True)
    valid = labels != -100
    renorm = _renormalized(lps)
    main = dict(labels=labels, ce_weight=1.0, divergence="forward_kl", tail="bucket", teacher_lse=lse)
    out = []

    def pair(name, ours_fn, theirs_fn, tensors, tol=1e-6):
        try:
            out.append(_agree(name, _grads(ours_fn, *tensors), _grads(theirs_fn, *tensors), tol))
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            out.append(dict(pair=name, ok=False, error=f"{type(exc).__name__}: {exc}"[:300]))

    pair("naive_topk vs kdcache", lambda x: kd_loss(x, ids, lps, backend="torch", **main),
         lambda x: kd_loss_reference(x, ids, lps, **main), (z,))
    axo_mask = valid.unsqueeze(1).expand(-1, k)

    def axolotl(x):
        from benchmarks.peers.axolotl_kd import loss

        return loss(x.unsqueeze(0), ids.unsqueeze(0), renorm.unsqueeze(0), axo_mask.unsqueeze(0),
                    num_items_in_batch=int(valid.sum()))

    pair("axolotl vs kdcache", lambda x: kd_loss(x, ids, lps, labels=labels, tail="renormalize", backend="torch"),
         axolotl, (z,))
    jsd = dict(divergence="jsd", beta=BETA, tail="none", tau_squared=False)
    trl_labels = labels.unsqueeze(0)
    pair("trl_gkd vs kdcache",
         lambda x: kd_loss(x, ids_all, lps_all, labels=labels, backend="torch", **jsd),
         lambda x: _trl_jsd()(x.unsqueeze(0), teacher.unsqueeze(0), labels=trl_labels, beta=BETA), (z,))
    pair("materialized vs kdcache_from_hidden",
         lambda a, b: kd_loss_from_hidden(a, b, ids, lps, chunk_size=7, backend="torch", **main),
         lambda a, b: kd_loss(a @ b.t(), ids, lps, backend="torch", **main), (h, w))
    pair("liger_jsd vs kdcache_from_hidden",
         lambda a, b: kd_loss_from_hidden(a, b, t_ids, t_lps, labels=labels, ce_weight=0.5, kd_weight=0.5,
                                          chunk_size=7, backend="torch", **jsd),
         lambda a, b: _liger_jsd(0.5, 0.5, compiled)(a, b, th, tw, labels), (h, w))
    last_ignored = labels.clone()
    last_ignored[-1] = -100  # axolotl's internal shift leaves the last row without a label
    pair("axolotl_fused vs kdcache_from_hidden",
         lambda a, b: kd_loss_from_hidden(a, b, ids, lps, labels=last_ignored, tail="renormalize",
                                          reduction="sum", chunk_size=7, backend="torch"),
         lambda a, b: _axolotl_fused(a, b, ids, renorm, last_ignored), (h, w))
    if not compiled:
        return out
    pair("cce vs kdcache_ce",
         lambda a, b: kd_loss_from_hidden(a, b, labels=labels, ce_weight=1.0, kd_weight=0.0, chunk_size=7),
         lambda a, b: _cce(a, b, labels), (h, w), tol=1e-5)
    return out


# ------------------------------------------------------------------------------------------------ timing
def _time_interleaved(fns: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, dict]:
    """fwd+bwd of every fn: one warm-up (compiles), ``rounds`` interleaved rounds (medians), peak memory."""
    res: dict[str, dict] = {}
    live = {}
    for name, fn in fns.items():
        try:
            fn()
            live[name] = fn
        except Exception as exc:
            res[name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(rounds):
        for name, fn in live.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    for name, fn in live.items():
        with PeakMemory(device) as mem:
            fn()
        res[name] = dict(fwd_bwd_s=statistics.median(times[name]), peak_mb=mem.peak_mb,
                         rounds_s=[round(t, 4) for t in times[name]])
    return res


def _step(loss_fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> Callable[[], None]:
    def run():
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        loss_fn(*leaves).backward()

    return run


# long: three comparisons, each a table of closures over the same inputs
def loss_rows(quick: bool, device: str = "cpu", rows: int = 4096, vocab: int = 32000, hidden: int = 512,
              topk: int = 32, rounds: int | None = None,
              sections: set[str] | None = None) -> tuple[list[dict], dict[str, Any]]:
    """The three loss comparisons (module docstring) as table rows and the summary ratios (peer / kdcache)."""
    dev = torch.device(device)
    wanted = sections  # None: all three
    rounds = rounds or (3 if quick else 7)
    checks = check_peers()
    bad = [c for c in checks if not c["ok"] and "error" not in c]
    if bad:
        raise SystemExit(f"peers disagree with kdcache before timing: {bad}")
    broken = {c["pair"].split(" vs ")[0] for c in checks if "error" in c}
    logits, ids, lps, labels = make_inputs(rows, vocab, topk, torch.float32, dev)
    g = torch.Generator(device="cpu").manual_seed(5)
    teacher_logits = (torch.randn(rows, vocab, generator=g) * 2).to(dev)
    lse = torch.logsumexp(teacher_logits, -1)  # any [N] lse above the top-k mass works for timing
    lps = lps.float()
    renorm, mask = _renormalized(lps), torch.ones(rows, topk, dtype=torch.bool, device=dev)
    n_valid = int((labels != -100).sum())
    main = dict(labels=labels, ce_weight=1.0, divergence="forward_kl", tail="bucket", teacher_lse=lse)

    def axolotl(x):
        from benchmarks.peers.axolotl_kd import loss

        return loss(x.unsqueeze(0), ids.long().unsqueeze(0), renorm.unsqueeze(0), mask.unsqueeze(0), n_valid)

    out_rows: list[dict] = []
    sections = {}
    sections["loss_logits"] = lambda: {
        "kdcache": _step(lambda x: kd_loss(x, ids, lps, **main), logits),
        "ce": _step(lambda x: F.cross_entropy(x, labels), logits),
        "naive_topk": _step(lambda x: kd_loss_reference(x, ids, lps, **main), logits),
        "axolotl": _step(axolotl, logits),
        "trl_gkd": _step(lambda x: _trl_jsd()(x.unsqueeze(0), teacher_logits.unsqueeze(0), labels=labels.unsqueeze(0),
                                              beta=BETA), logits),
    }
    gh = torch.Generator(device="cpu").manual_seed(6)
    h = torch.randn(rows, hidden, generator=gh).to(dev)
    w = (torch.randn(vocab, hidden, generator=gh) / hidden**0.5).to(dev)
    th = torch.randn(rows, hidden, generator=gh).to(dev)
    tw = (torch.randn(vocab, hidden, generator=gh) / hidden**0.5).to(dev)
    sections["from_hidden"] = lambda: {
        "kdcache_from_hidden": _step(lambda a, b: kd_loss_from_hidden(a, b, ids, lps, **main), h, w),
        "materialized": _step(lambda a, b: kd_loss(a @ b.t(), ids, lps, **main), h, w),
        "liger_jsd": _step(lambda a, b: _liger_jsd(0.5, 0.5)(a, b, th, tw, labels), h, w),
        "axolotl_fused": _step(lambda a, b: _axolotl_fused(a, b, ids, renorm, labels), h, w),
    }
    sections["ce_from_hidden"] = lambda: {
        "kdcache_ce": _step(lambda a, b: kd_loss_from_hidden(a, b, labels=labels, ce_weight=1.0, kd_weight=0.0), h, w),
        "cce": _step(lambda a, b: _cce(a, b, labels), h, w),
    }
    shapes = {"loss_logits": [rows, vocab], "from_hidden": [rows, hidden, vocab], "ce_from_hidden": [rows, hidden, vocab]}
    results = {}
    for section, make in sections.items():
        if wanted is not None and section not in wanted:
            continue
        fns = {name: fn for name, fn in make().items() if name not in broken}
        res = _time_interleaved(fns, rounds, dev)
        for name in broken & set(make()):
            res[name] = dict(error=next(c["error"] for c in checks if c["pair"].startswith(name + " ")))
        results[section] = res
        for name, r in res.items():
            out_rows.append(dict(section=section, method=name, shape=shapes[section], device=device, dtype="float32",
                                 **{k: r.get(k) for k in ("fwd_bwd_s", "peak_mb", "error")}))
    summary = _ratios(results)
    summary["correctness"] = checks
    return out_rows, summary


def _ratios(results: dict[str, dict]) -> dict[str, Any]:
    def t(section, name):
        return results.get(section, {}).get(name, {}).get("fwd_bwd_s")

    def ratio(a, b):
        return None if a is None or b is None else a / b

    ours = t("loss_logits", "kdcache")
    peers = {name: t("loss_logits", name) for name in ("naive_topk", "axolotl", "trl_gkd")}
    live = {name: v for name, v in peers.items() if v is not None}
    best = min(live, key=live.get) if live else None
    return dict(
        # > 1: the fastest real KD peer takes that many times kdcache's time
        loss_vs_best_peer=ratio(live.get(best), ours), loss_best_peer=best,
        loss_vs_ce=ratio(ours, t("loss_logits", "ce")),
        # < 1: kdcache faster
        from_hidden_vs_materialized=ratio(t("from_hidden", "kdcache_from_hidden"), t("from_hidden", "materialized")),
        liger_vs_from_hidden=ratio(t("from_hidden", "liger_jsd"), t("from_hidden", "kdcache_from_hidden")),
        axolotl_fused_vs_from_hidden=ratio(t("from_hidden", "axolotl_fused"), t("from_hidden", "kdcache_from_hidden")),
        ce_from_hidden_vs_cce=ratio(t("ce_from_hidden", "kdcache_ce"), t("ce_from_hidden", "cce")),
    )


def main() -> None:
    """``python benchmarks/_peers_loss.py --quick [--sections from_hidden,ce_from_hidden] [--out FILE]``."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", default=None, help="comma list of loss_logits, from_hidden, ce_from_hidden")
    parser.add_argument("--out", default=None, help="JSON file for the rows and the summary")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = None if args.sections is None else set(args.sections.split(","))
    rows, summary = loss_rows(args.quick, rounds=args.rounds, sections=sections)
    for row in rows:
        print(row)
    record = dict(command=" ".join(["python"] + sys.argv), rows=rows, summary=summary)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, default=str)
    print(json.dumps({k: v for k, v in summary.items() if k != "correctness"}))


if __name__ == "__main__":
    main()
