"""A ``kdcache import`` SIGKILLed while it writes resumes on rerun and gives the bytes of an uninterrupted import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
V, K, L, N = 500, 8, 33, 40


def _source(path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (N, L))
    ids = (np.concatenate([x[:, 1:], x[:, :1]], 1)[..., None] + np.arange(K) * 3) % V  # next token first
    lp = np.log(rng.dirichlet(np.ones(K + 1), size=(N, L))[..., :K]).astype(np.float32)
    pq.write_table(pa.table({"input_ids": x.tolist(), "topk_ids": ids.tolist(), "topk_logprobs": lp.tolist()}), path)


def _command(src: Path, out: Path) -> list[str]:
    cli = "import sys; from cache_server.cli import main; sys.exit(main())"
    return [sys.executable, "-c", cli, "import", str(src), "--from", "parquet", "--out", str(out),
            "--vocab-size", str(V), "--shard-seqs", "1", "--chunk-seqs", "1", "--no-progress"]


def test_sigkilled_import_resumes_bitwise(tmp_path):
    src = tmp_path / "src.parquet"
    _source(src)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(src, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = killed / ".kdcache-build" / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_dir() and len(list(journal.glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(journal.glob("*.json")))
    assert not (killed / "manifest.json").exists() and 3 <= written < N, "the import was not stopped mid-way"
    rerun = subprocess.run(_command(src, killed), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stdout
    clean = tmp_path / "clean"
    subprocess.run(_command(src, clean), env=env, check=True, capture_output=True, timeout=300)
    resumed, fresh = (json.loads((d / "manifest.json").read_text()) for d in (killed, clean))
    assert resumed["shards"] == fresh["shards"] and resumed["dataset_fingerprint"] == fresh["dataset_fingerprint"]
