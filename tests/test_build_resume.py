"""Crash safety of `kdcache build`: SIGKILL mid-build then rerun == uninterrupted build, byte for byte;
reruns with other settings are refused (or replaced with --overwrite); foreign directories are untouched."""

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
from cache_server.cli import main
from cache_server.build.writer import STATE_DIR
from cache_server.format.build_lock import build_lock_holder
from tests.cachecompare import assert_same_shards_and_arrays
from tests.teachers import make_llama_teacher

REPO = Path(__file__).resolve().parents[1]
T = 33


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    teacher = make_llama_teacher(root / "teacher", 300, hidden_size=64, seed=11, logit_scale=10.0)
    np.save(root / "tokens.npy", np.random.default_rng(11).integers(0, 300, size=80 * T + 7))
    return root, teacher


def _args(root: Path, teacher: Path, out: Path, topk: int = 6) -> list[str]:
    return ["build", "--teacher", str(teacher), "--data", str(root / "tokens.npy"), "--topk", str(topk),
            "--seq-len", str(T), "--out", str(out), "--shard-seqs", "2", "--chunk-seqs", "1",
            "--batch-size", "1", "--temperatures", "2", "--no-progress"]


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_sigkill_then_resume_is_bitwise_identical(setup):
    root, teacher = setup
    reference = root / "reference"
    assert main(_args(root, teacher, reference)) == 0

    out = root / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cache_server", *_args(root, teacher, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / STATE_DIR / "shards"
    deadline = time.monotonic() + 120
    while not (journal.is_dir() and any(journal.glob("*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard journal appeared"
        time.sleep(0.005)
    time.sleep(0.3)  # land somewhere mid-way through the following shards
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    num_shards = fmt.layout_from_manifest(fmt.load_manifest(reference)).num_shards
    done = len(list(journal.glob("*.json")))
    assert 1 <= done < num_shards, f"kill landed after {done}/{num_shards} shards"
    print(f"SIGKILL after {done}/{num_shards} journaled shards")
    assert not (out / fmt.MANIFEST_NAME).exists()
    assert (out / STATE_DIR / "lock.rank0").exists()  # the killed build's lock file stays behind...
    assert build_lock_holder(out) is None  # ...but the kernel released its lock: the rerun may take it
    with pytest.raises(fmt.CacheError, match="rerun the same"):
        fmt.load_manifest(out)

    assert main(_args(root, teacher, out)) == 0  # resume
    ref_manifest, manifest = fmt.load_manifest(reference), fmt.load_manifest(out)
    assert manifest["shards"] == ref_manifest["shards"]
    assert manifest["build_args"] == ref_manifest["build_args"]
    assert_same_shards_and_arrays(reference, out)


def test_rerun_complete_different_settings_and_overwrite(setup, capsys):
    root, teacher = setup
    out = root / "refuse"
    args = _args(root, teacher, out) + ["--max-sequences", "6"]
    assert main(args) == 0
    before = _snapshot(out)
    capsys.readouterr()

    assert main(args + ["--batch-size", "3"]) == 0  # batch size is not a setting
    assert "already complete" in capsys.readouterr().out
    assert _snapshot(out) == before

    assert main(_args(root, teacher, out, topk=7) + ["--max-sequences", "6"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "topk" in err and "--overwrite" in err
    assert _snapshot(out) == before  # nothing changed

    assert main(_args(root, teacher, out, topk=7) + ["--max-sequences", "6", "--overwrite"]) == 0
    manifest = fmt.load_manifest(out)
    assert manifest["topk"] == 7 and manifest["arrays"]["topk_ids"]["shape"] == [6, T, 7]


def test_unfinished_build_with_other_settings_is_refused(setup, capsys):
    root, teacher = setup
    out = root / "unfinished"
    out.mkdir()
    # A NaN-free partial build: run rank 0 of 2, which leaves rank 1's shards missing.
    assert main(_args(root, teacher, out) + ["--max-sequences", "4", "--rank", "0", "--world-size", "2"]) == 0
    assert "still missing" in capsys.readouterr().out
    before = _snapshot(out)
    assert main(_args(root, teacher, out, topk=3) + ["--max-sequences", "4", "--rank", "0", "--world-size", "2"]) == 2
    assert "unfinished build with different settings" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_foreign_directory_and_file_are_untouched(setup, capsys):
    root, teacher = setup
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = _snapshot(foreign)
    assert main(_args(root, teacher, foreign)) == 2
    assert "not a kdcache cache" in capsys.readouterr().err
    assert _snapshot(foreign) == before
    a_file = root / "a_file"
    a_file.write_text("x")
    assert main(_args(root, teacher, a_file)) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "x"
