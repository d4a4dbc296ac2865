"""kdcache against its peers, side by side on identical inputs: the loss, the loader's read, the bytes stored.

Shape notation: N rows (B·T), V vocabulary, K teacher top-k, H hidden size.

Sections (each a block of rows in one table):

* ``loss_logits``, ``from_hidden``, ``ce_from_hidden``: benchmarks/_peers_loss.py (kdcache vs F.cross_entropy,
  naive torch top-k, axolotl's KD loss, TRL GKD's generalized JSD; from hidden states vs materialized logits,
  Liger's fused-linear JSD and axolotl's fused top-k KL; CE only vs Cut Cross-Entropy). Correctness is checked
  before anything is timed (float64, per-pair tolerances), then paired interleaved rounds, medians, peak memory.
* ``read``: ``benchmarks/_peers_read.py``'s ``read_rows(quick, tmp_dir)`` (the loader vs litdata / mosaic
  streaming, cold and warm), when that module is present; otherwise one row marked missing.
* ``bytes``: ``benchmarks/_peers_bytes.py``'s ``storage_rows(cache_dir, tmp_dir)`` (kdcache vs axolotl-style
  Parquet vs DistillKit's codec, bytes/token) on ``--cache`` or its small synthetic cache; missing if absent.

Setup. The loss peers come from PyPI (``pip install -e '.[peers]'``: trl, liger-kernel, cut-cross-entropy;
axolotl's loss is vendored under benchmarks/peers/ from its source, its package being a whole training stack).
litdata and mosaic streaming need torchvision, which does not import beside this venv's torch 2.13, so the
read rows need the peers venv (torch 2.14.1 + torchvision, made by ``/work/peers_venv``; ``.ready`` marks it
done)::

    .venv/bin/python benchmarks/compare_peers.py --quick            # loss + bytes here (read rows: missing)
    /work/peers_venv/bin/python benchmarks/compare_peers.py --quick # everything, peers venv

Output: ``compare_peers[_quick].{json,csv,png}`` under ``--out`` (default benchmarks/results/); the LAST stdout
line is one JSON object with ``loss_vs_best_peer`` (the fastest KD peer's time over kdcache's: > 1 means
kdcache is faster), ``from_hidden_vs_materialized`` and ``ce_from_hidden_vs_cce`` (kdcache's time over the
other's: < 1 means kdcache is faster), ``cold_read_vs_litdata`` / ``warm_read_vs_litdata`` (throughput ratios
from the read module: > 1 faster) and ``bytes_vs_best_peer`` (kdcache's bytes/token over the smallest peer's:
< 1 smaller; ``bytes_vs_best_lossless_peer`` over the smallest lossless peer's); ``null`` where a section is
missing.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS_DIR, machine_info  # noqa: E402

__all__ = ["main"]


def _optional(module: str):
    """The module, or None when it is not there (a sibling engineer's section not landed yet)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name and module.endswith(exc.name.split(".")[-1]):
            return None
        raise


def _read_section(quick: bool, tmp: Path) -> tuple[list[dict], dict[str, Any]]:
    mod = _optional("benchmarks._peers_read")
    if mod is None:
        return [dict(section="read", method="(missing)", error="benchmarks/_peers_read.py not present")], {}
    try:
        rounds = list(mod.read_rows(quick, tmp))
        ratios = mod.read_ratios(rounds) if hasattr(mod, "read_ratios") else {}
    except Exception as exc:  # e.g. litdata not importable in this venv
        return [dict(section="read", method="(failed)", error=f"{type(exc).__name__}: {exc}"[:300])], {}
    # one row per (system, mode): the median over its paired rounds; the rounds themselves as "read_rounds"
    by: dict[str, list[float]] = {}
    for r in rounds:
        by.setdefault(f"{r['system']}_{r['mode']}", []).append(r["tokens_per_s"])
    rows = [dict(section="read", method=name, tokens_per_s=statistics.median(v), rounds=len(v))
            for name, v in by.items()]
    rows += [dict(section="read_rounds", method=f"{r['system']}_{r['mode']}", **r) for r in rounds]
    summary = {k: ratios.get(k) for k in ("cold_read_vs_litdata", "warm_read_vs_litdata")}
    summary["read_ratios"] = ratios.get("ratios")
    return rows, summary


def _bytes_section(cache: str | None, tmp: Path) -> tuple[list[dict], dict[str, Any]]:
    mod = _optional("benchmarks._peers_bytes")
    if mod is None:
        return [dict(section="bytes", method="(missing)", error="benchmarks/_peers_bytes.py not present")], {}
    try:
        if cache == "real":  # a trained teacher's cache (``real_caches``: about a minute), the default codec
            cache_dir = mod.real_caches(tmp / "real")["kdcache"]
        else:
            cache_dir = Path(cache) if cache else mod._synthetic_cache(tmp)  # its own small synthetic cache
        rows = [dict(section="bytes", method=r["format"], **r) for r in mod.storage_rows(cache_dir, tmp)]
    except Exception as exc:
        return [dict(section="bytes", method="(failed)", error=f"{type(exc).__name__}: {exc}"[:300])], {}
    ours = next((r["bytes_per_token"] for r in rows if r["method"] == "kdcache"), None)
    peers = [r["bytes_per_token"] for r in rows if r["method"] != "kdcache"]
    lossless = [r["bytes_per_token"] for r in rows if r["method"] != "kdcache" and r.get("lossless")]
    return rows, dict(bytes_vs_best_peer=(ours / min(peers)) if ours and peers else None,
                      bytes_vs_best_lossless_peer=(ours / min(lossless)) if ours and lossless else None,
                      bytes_cache=(str(cache) if cache else "synthetic"))


def _write(out_dir: Path, name: str, rows: list[dict], summary: dict[str, Any], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(command=command, when_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   machine=machine_info(), summary=summary, rows=rows)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    keys = sorted({k for r in rows for k in r})
    with open(out_dir / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot(out_dir / f"{name}.png", rows)


def _plot(path: Path, rows: list[dict]) -> None:
    """One bar chart per section: seconds (loss), or the row's main number (read / bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = []
    for r in rows:
        if r["section"] == "read_rounds":
            continue
        value = r.get("fwd_bwd_s") or r.get("tokens_per_s") or r.get("bytes_per_token")
        if value is not None:
            sections.append((r["section"], r["method"], float(value)))
    names = list(dict.fromkeys(s for s, _, _ in sections))
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    units = {"read": "tokens/s", "bytes": "bytes/token"}
    for ax, section in zip(axes[0], names):
        items = [(m, v) for s, m, v in sections if s == section]
        colors = ["tab:green" if m.startswith("kdcache") else "tab:gray" for m, _ in items]
        ax.bar([m for m, _ in items], [v for _, v in items], color=colors)
        ax.set_title(section)
        ax.set_ylabel(units.get(section, "fwd+bwd s (median)"))
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds per loss comparison; the read module's quick mode")
    parser.add_argument("--device", default="cpu", help="torch device of the loss comparisons")
    parser.add_argument("--rows", type=int, default=4096, help="N of the loss comparisons")
    parser.add_argument("--vocab", type=int, default=32000, help="V of the loss comparisons")
    parser.add_argument("--hidden", type=int, default=512, help="H of the from-hidden comparisons")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3 quick, 7 full)")
    parser.add_argument("--cache", default=None, help="cache directory for the bytes rows, or 'real' (a trained teacher's cache built here; default: synthetic)")
    parser.add_argument("--sections", default="loss,read,bytes", help="comma-separated subset to run")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON / CSV / PNG")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    wanted = set(args.sections.split(","))
    rows: list[dict] = []
    summary: dict[str, Any] = dict(loss_vs_best_peer=None, from_hidden_vs_materialized=None,
                                   ce_from_hidden_vs_cce=None, cold_read_vs_litdata=None,
                                   warm_read_vs_litdata=None, bytes_vs_best_peer=None)
    with tempfile.TemporaryDirectory(prefix="compare_peers_") as tmp:
        if "loss" in wanted:
            from benchmarks._peers_loss import loss_rows

            print(f"[compare_peers] loss: N={args.rows} V={args.vocab} H={args.hidden} on {args.device}", flush=True)
            loss, loss_summary = loss_rows(args.quick, args.device, args.rows, args.vocab, args.hidden,
                                           rounds=args.rounds)
            rows += loss
            summary.update(loss_summary)
        if "read" in wanted:
            print("[compare_peers] read", flush=True)
            read, read_summary = _read_section(args.quick, Path(tmp))
            rows += read
            summary.update(read_summary)
        if "bytes" in wanted:
            print("[compare_peers] bytes", flush=True)
            stored, bytes_summary = _bytes_section(args.cache, Path(tmp))
            rows += stored
            summary.update(bytes_summary)
    for r in (r for r in rows if r["section"] != "read_rounds"):
        shown = {k: v for k, v in r.items() if k in ("section", "method", "fwd_bwd_s", "peak_mb", "bytes_per_token",
                                                       "tokens_per_s", "error")}
        print("  " + json.dumps(shown, default=str), flush=True)
    name = "compare_peers_quick" if args.quick else "compare_peers"
    _write(Path(args.out), name, rows, summary, command)
    print(f"[compare_peers] wrote {Path(args.out) / name}.{{json,csv,png}}", flush=True)
    final = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items() if k != "correctness"}
    final["correctness_ok"] = all(c.get("ok") for c in summary.get("correctness", []))
    print(json.dumps(final, default=str))
    return final


if __name__ == "__main__":
    main()
