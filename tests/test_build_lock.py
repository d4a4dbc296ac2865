"""One build per cache directory (and rank), with real `kdcache build` processes: a second build refuses at once
and writes nothing; two builds started together never crash each other; ranks of one build run side by side.
(A SIGKILLed build's lock is released by the OS, so the rerun resumes: tests/test_build_resume.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cache_server import format as fmt
from cache_server.build.writer import STATE_DIR
from cache_server.cli import main
from cache_server.format.build_lock import build_lock_holder
from tests.teachers import make_llama_teacher

REPO = Path(__file__).resolve().parents[1]
T = 33


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    teacher = make_llama_teacher(root / "teacher", 300, hidden_size=64, seed=13, logit_scale=10.0)
    np.save(root / "tokens.npy", np.random.default_rng(13).integers(0, 300, size=60 * T))
    return root, teacher


def _args(root: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--teacher", str(teacher), "--data", str(root / "tokens.npy"), "--topk", "6",
            "--seq-len", str(T), "--out", str(out), "--shard-seqs", "2", "--chunk-seqs", "1",
            "--batch-size", "1", "--no-progress", *extra]


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "cache_server", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_shard(proc: subprocess.Popen, out: Path) -> None:
    journal = out / STATE_DIR / "shards"
    deadline = time.monotonic() + 120
    while not (journal.is_dir() and any(journal.glob("*.json"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard journal appeared"
        time.sleep(0.01)


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _same_shards(a: Path, b: Path) -> None:
    assert fmt.load_manifest(a)["shards"] == fmt.load_manifest(b)["shards"]


@pytest.fixture(scope="module")
def reference(setup):
    root, teacher = setup
    out = root / "reference"
    assert main(_args(root, teacher, out)) == 0
    return out


def test_second_build_of_a_running_directory_refuses_and_writes_nothing(setup, reference):
    root, teacher = setup
    out = root / "busy"
    first = _start(_args(root, teacher, out))
    try:
        _wait_for_first_shard(first, out)
        first.send_signal(signal.SIGSTOP)  # hold still: the directory must not change while we look
        holder = build_lock_holder(out)
        assert holder is not None and f"pid {first.pid}" in holder
        before = _snapshot(out)
        started = time.monotonic()
        second = _start(_args(root, teacher, out))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert err.count("\n") == 1 and err.startswith("kdcache build: error: another `kdcache build` is already")
        assert f"pid {first.pid}" in err and "wait for it to finish" in err
        assert time.monotonic() - started < 60  # refused at once, not after waiting for the first build
        assert _snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    _same_shards(out, reference)
    assert not (out / STATE_DIR).exists() and build_lock_holder(out) is None


def test_two_builds_started_together_never_crash(setup, reference):
    """Before the lock, two builds of one new directory could delete each other's files mid-write (a raw
    FileNotFoundError); now one builds and the other refuses, or finds the cache complete."""
    root, teacher = setup
    out = root / "race"
    procs = [_start(_args(root, teacher, out)) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in results)
    for stdout, stderr, rc in results:
        assert "Traceback" not in stderr and "internal error" not in stderr, stderr
        if rc == 2:
            assert "another `kdcache build` is already writing" in stderr
    assert codes in ([0, 2], [0, 0]), results
    if codes == [0, 0]:  # the second one started after the first had finished
        assert any("nothing to do" in stdout for stdout, _, _ in results)
    assert main(["verify", str(out), "--no-progress"]) == 0
    _same_shards(out, reference)


def test_ranks_of_one_build_lock_different_files(setup, reference):
    root, teacher = setup
    out = root / "ranks"
    procs = [_start(_args(root, teacher, out, "--rank", str(r), "--world-size", "2")) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    _same_shards(out, reference)
    assert not (out / STATE_DIR).exists()
