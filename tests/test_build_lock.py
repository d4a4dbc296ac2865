"""One build per cache directory, with real `kdcache build` processes: a second build refuses at once and
writes nothing, a rank of another world size included; two builds started together never crash each other
and never both hold the directory; ranks of one build run side by side.
(A SIGKILLed build's lock is released by the OS, so the rerun resumes: tests/test_build_resume.py.)"""

from __future__ import annotations

import json
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
from cache_server.format.build_lock import BuildLockedError, acquire_build_lock, build_lock_holder
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


# ------------------------------------------------------------------ one build per directory, not per rank

_HOLD = (
    "import sys, time\n"
    "from cache_server.format.build_lock import acquire_build_lock\n"
    "lock = acquire_build_lock(sys.argv[1], rank=int(sys.argv[2]), world_size=int(sys.argv[3]))\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_rank_of_another_world_size_refuses_while_a_single_process_build_runs(setup, reference):
    """Before, `--rank 1 --world-size 2` took lock.rank1 beside a single-process build's lock.rank0 and wrote
    the same shards concurrently."""
    root, teacher = setup
    out = root / "mixed"
    first = _start(_args(root, teacher, out))
    try:
        _wait_for_first_shard(first, out)
        first.send_signal(signal.SIGSTOP)
        before = _snapshot(out)
        second = _start(_args(root, teacher, out, "--rank", "1", "--world-size", "2"))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert err.startswith("kdcache build: error: another `kdcache build` is already writing")
        assert f"pid {first.pid}" in err
        assert "rank 0 of 1" in err and "a build with --world-size 2 cannot share the directory with it" in err
        assert _snapshot(out) == before  # no lock file of its own left behind either
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    _same_shards(out, reference)
    assert not (out / STATE_DIR).exists()


@pytest.mark.parametrize("held,starting,refused", [
    ((0, 1), (1, 2), True),  # a single-process build runs: no rank of any build may join
    ((1, 2), (0, 1), True),  # a rank of a 2-process build runs: a single-process build may not start
    ((1, 3), (0, 2), True),  # ranks of builds with different world sizes
    ((0, 2), (0, 2), True),  # the same rank twice
    ((1, 2), (0, 2), False),  # the other rank of the same build
])
def test_which_lock_holders_a_starting_build_refuses(tmp_path, held, starting, refused):
    out = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), *map(str, held)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        if refused:
            with pytest.raises(BuildLockedError, match=f"pid {holder.pid} .*rank {held[0]} of {held[1]}"):
                acquire_build_lock(out, rank=starting[0], world_size=starting[1])
            # The refused starter leaves nothing of its own: only the holder's lock file is there.
            assert sorted(os.listdir(out / STATE_DIR)) == [f"lock.rank{held[0]}"]
        else:
            acquire_build_lock(out, rank=starting[0], world_size=starting[1]).release()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    acquire_build_lock(out, rank=starting[0], world_size=starting[1]).release()  # the kernel dropped the lock


_RACE = (
    "import json, sys, time\n"
    "from pathlib import Path\n"
    "from cache_server.format.build_lock import BuildLockedError, acquire_build_lock\n"
    "out, rank, world_size, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])\n"
    "print('ready', flush=True)\n"
    "while not go.exists():\n"
    "    time.sleep(0.0005)\n"
    "try:\n"
    "    lock = acquire_build_lock(out, rank=rank, world_size=world_size)\n"
    "except BuildLockedError:\n"
    "    print(json.dumps(None), flush=True)\n"
    "    sys.exit(0)\n"
    "held_from = time.monotonic()\n"  # CLOCK_MONOTONIC: one clock for every process of the machine
    "time.sleep(0.3)\n"
    "held_until = time.monotonic()\n"
    "lock.release()\n"
    "print(json.dumps([held_from, held_until]), flush=True)\n"
)


def test_starters_that_race_never_both_hold_the_directory(tmp_path):
    """Pairs of processes that start at the same instant: at most one of each pair holds the directory at
    any moment (one that starts after the other released it may take it), and one of them always gets it."""
    go = tmp_path / "go"
    pairs = [((0, 1), (1, 2)), ((1, 2), (0, 1)), ((0, 1), (0, 1)), ((0, 2), (1, 3))] * 2
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = []
    for i, pair in enumerate(pairs):
        for rank, world_size in pair:
            procs.append((i, subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path / f"c{i}"), str(rank),
                                               str(world_size), str(go)], stdout=subprocess.PIPE, text=True, env=env)))
    try:
        for _, proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        held: dict[int, list] = {i: [] for i in range(len(pairs))}
        for i, proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out
            interval = json.loads(out)
            if interval is not None:
                held[i].append(interval)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, intervals in held.items():
        assert intervals, f"pair {pairs[i]}: both refused"
        if len(intervals) == 2:
            (a0, a1), (b0, b1) = intervals
            assert a1 <= b0 or b1 <= a0, f"pair {pairs[i]}: both held the directory at once: {intervals}"
