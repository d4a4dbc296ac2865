"""`kdcache build --engine ray` on a real local Ray (2 CPUs, no GPU): the cache is identical, array by array and
manifest, to the local engine's; an actor SIGKILLed mid-build has its shards redone; a driver SIGKILLed
mid-build resumes on rerun, still identical.

One Ray session for the module (started here with 2 CPUs and a small object store); the CLI subprocesses
join it with ``--ray-address``.
"""

from __future__ import annotations

import os
import re
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
from tests.cachecompare import assert_same_shards_and_arrays
from tests.teachers import make_llama_teacher

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
T = 33
NUM_SEQS = 40  # 10 shards of 4 sequences


@pytest.fixture(scope="module")
def ray_address():
    os.environ["RAY_DEDUP_LOGS"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    teachers = [make_llama_teacher(root / f"teacher{i}", 300, hidden_size=64, seed=11 + i, logit_scale=10.0)
                for i in range(2)]
    np.save(root / "tokens.npy", np.random.default_rng(11).integers(0, 300, size=NUM_SEQS * T + 7))
    return root, teachers


def _args(root: Path, teachers: list[Path], out: Path, *extra: str) -> list[str]:
    args = ["build", "--data", str(root / "tokens.npy"), "--topk", "6", "--seq-len", str(T), "--out", str(out),
            "--shard-seqs", "4", "--chunk-seqs", "2", "--batch-size", "3", "--temperatures", "2", "--no-progress"]
    for teacher in teachers:
        args += ["--teacher", str(teacher)]
    return args + list(extra)


def _assert_identical(reference: Path, out: Path) -> None:
    """Every shard file byte for byte, every array value, and the manifest except its creation time."""
    ref_manifest, manifest = fmt.load_manifest(reference), fmt.load_manifest(out)
    ref_manifest.pop("created_at"), manifest.pop("created_at")
    assert manifest == ref_manifest
    assert_same_shards_and_arrays(reference, out)


def _start_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "cache_server", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(proc: subprocess.Popen, pattern: str, timeout_s: float = 90) -> re.Match:
    """Read the subprocess's output lines until one matches ``pattern`` (the lines read so far on failure)."""
    deadline, lines = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(lines)}")


def _wait_for_journal(out: Path, proc: subprocess.Popen, timeout_s: float = 90) -> Path:
    journal = out / STATE_DIR / "shards"
    deadline = time.monotonic() + timeout_s
    while not (journal.is_dir() and any(journal.glob("*.json"))):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no shard journal appeared"
        time.sleep(0.005)
    return journal


def test_actor_sigkilled_mid_shard_its_shards_are_redone(setup, ray_address):
    """A two-teacher hybrid cache (every target kind's code path: top-k head + seeded draws) on 2 actors."""
    root, teachers = setup
    sampled = ["--targets", "hybrid", "--topk", "4", "--samples", "8"]
    local, out = root / "mix-local", root / "mix-ray"
    assert main(_args(root, teachers, local, *sampled)) == 0
    proc = _start_cli(_args(root, teachers, out, *sampled, "--engine", "ray", "--workers", "2",
                            "--ray-address", ray_address))
    try:
        pids = [int(p) for p in _read_until(proc, r"workers ready \(pids ([\d, ]+)\)").group(1).split(", ")]
        journal = _wait_for_journal(out, proc)
        os.kill(pids[0], signal.SIGKILL)  # two shards in flight on it: computing one, the next queued
        done_at_kill = len(list(journal.glob("*.json")))
        requeued = _read_until(proc, r"worker 0 died while computing shard (\d+); re-queued")
        assert proc.wait(timeout=120) == 0, proc.stdout.read()
    finally:
        proc.kill()
    print(f"SIGKILL after {done_at_kill} journaled shards; re-queued shard {requeued.group(1)}")
    assert done_at_kill < NUM_SEQS // 4
    _assert_identical(local, out)


def test_driver_sigkilled_then_rerun_resumes_identical(setup, ray_address):
    root, teachers = setup
    reference, out = root / "reference", root / "driver-killed"
    assert main(_args(root, teachers[:1], reference)) == 0
    args = _args(root, teachers[:1], out, "--engine", "ray", "--workers", "2", "--ray-address", ray_address)
    proc = _start_cli(args)
    try:
        journal = _wait_for_journal(out, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    done = len(list(journal.glob("*.json")))
    assert 1 <= done < NUM_SEQS // 4, f"kill landed after {done} shards"
    assert not (out / fmt.MANIFEST_NAME).exists()
    assert main(args[:-2]) == 0  # rerun (in this process's Ray session): resumes from the journal
    _assert_identical(reference, out)


def test_pool_shape_and_refusals():
    from cache_server.build.engine_ray import pool_shape
    from cache_server.build.options import BuildInputError, BuildOptions, check_options

    def opts(**kw):
        return BuildOptions(teacher="t", data="d", out="o", topk=4, seq_len=8, **{"engine": "ray", **kw})

    assert pool_shape(opts(device="cuda"), {"GPU": 16.0, "CPU": 128.0}) == (16, 1.0, None)  # one per GPU
    assert pool_shape(opts(device="cuda", gpus_per_worker=2), {"GPU": 16.0, "CPU": 128.0}) == (8, 2, None)
    assert pool_shape(opts(), {"CPU": 2.0}) == (1, 0.0, 2)  # CPU: one actor with every core
    assert pool_shape(opts(workers=2), {"CPU": 2.0}) == (2, 0.0, 1)
    with pytest.raises(BuildInputError, match="has 0 GPUs"):
        pool_shape(opts(device="cuda"), {"CPU": 8.0})
    with pytest.raises(BuildInputError, match="needs 12 GPUs"):
        pool_shape(opts(device="cuda", workers=12), {"GPU": 8.0, "CPU": 64.0})
    with pytest.raises(BuildInputError, match="the Ray cluster has 2"):
        pool_shape(opts(workers=3), {"CPU": 2.0})
    with pytest.raises(BuildInputError, match="needs --device cuda"):
        pool_shape(opts(gpus_per_worker=1), {"GPU": 1.0, "CPU": 2.0})
    with pytest.raises(BuildInputError, match="drop --rank/--world-size"):
        check_options(opts(world_size=2, rank=1))
    with pytest.raises(BuildInputError, match="--engine must be local or ray"):
        check_options(opts(engine="spark"))
