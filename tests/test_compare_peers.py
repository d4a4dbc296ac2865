"""benchmarks/compare_peers.py: every peer loss agrees with kdcache before timing; the driver's output contract.

Shape notation: N rows, V vocabulary, K teacher top-k, H hidden size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = ("loss_vs_best_peer", "from_hidden_vs_materialized", "ce_from_hidden_vs_cce", "cold_read_vs_litdata",
        "warm_read_vs_litdata", "bytes_vs_best_peer")


@pytest.mark.usefixtures("one_cpu_thread")
def test_peer_losses_agree_with_kdcache_in_float64():
    """The real peers (TRL's GKD loss, Liger's fused-linear JSD, axolotl's vendored losses) against kdcache under
    their conventions; uncompiled (the compiled paths are the same math, checked by the benchmark itself)."""
    pytest.importorskip("trl")
    pytest.importorskip("liger_kernel")
    from benchmarks._peers_loss import check_peers

    checks = check_peers(compiled=False)
    assert {c["pair"] for c in checks} >= {"axolotl vs kdcache", "trl_gkd vs kdcache", "liger_jsd vs kdcache_from_hidden",
                                           "axolotl_fused vs kdcache_from_hidden"}
    for c in checks:
        assert c["ok"], c


def test_driver_writes_table_and_last_line_json(tmp_path):
    """The read and bytes sections only (fast): CSV, JSON and PNG written; the last line carries every key."""
    done = subprocess.run([sys.executable, "benchmarks/compare_peers.py", "--quick", "--sections", "read,bytes",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(KEYS) <= set(final)
    assert final["loss_vs_best_peer"] is None  # the loss section did not run
    payload = json.loads((tmp_path / "compare_peers_quick.json").read_text())
    sections = {r["section"] for r in payload["rows"]}
    assert sections == {"read", "bytes"}
    assert (tmp_path / "compare_peers_quick.csv").read_text().count("\n") == len(payload["rows"]) + 1
    if any(r["section"] == "bytes" and "bytes_per_token" in r for r in payload["rows"]):
        assert final["bytes_vs_best_peer"] is not None and (tmp_path / "compare_peers_quick.png").stat().st_size > 0
        peers = [r for r in payload["rows"] if r["section"] == "bytes" and r["method"] != "kdcache"]
        assert {r["method"] for r in peers} == {"axolotl-parquet-zstd", "distillkit-parquet-zstd",
                                                "distillkit-parquet-zstd-exact"}
        assert all(r["value_check"]["ok"] for r in peers)  # each peer's file read back holds the cache's top-k
        for name in ("axolotl-parquet-zstd", "distillkit-parquet-zstd-exact"):  # the lossless ones: bit for bit
            assert next(r for r in peers if r["method"] == name)["value_check"]["exact"]
        assert final["bytes_vs_best_lossless_peer"] is not None
