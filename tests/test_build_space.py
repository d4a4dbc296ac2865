"""A full disk during `kdcache build`, for real: the cache is written to a small tmpfs.

Up front, a build whose estimated size exceeds the free space is refused with the numbers (nothing is
created). A build that runs out of space anyway (``--no-space-check``) stops with one clear error, keeps the
shards it finished and nothing half-written, and after space is freed the same command resumes to a cache
equal to one built on a roomy disk. Mounting needs root (CAP_SYS_ADMIN); without it the tests are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cache_server import format as fmt
from cache_server.build import space
from cache_server.build.writer import STATE_DIR
from cache_server.cli import main
from tests.teachers import make_llama_teacher

T = 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    teacher = make_llama_teacher(root / "teacher", 300, hidden_size=16, num_layers=1, seed=17, logit_scale=4.0)
    np.save(root / "tokens.npy", np.random.default_rng(17).integers(0, 300, size=80 * T))
    return root, teacher


def _args(root: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--teacher", str(teacher), "--data", str(root / "tokens.npy"), "--topk", "16",
            "--seq-len", str(T), "--out", str(out), "--shard-seqs", "8", "--chunk-seqs", "4", "--batch-size", "4",
            "--logprob-dtype", "float32", "--no-progress", *extra]


def test_a_cache_larger_than_the_free_space_is_refused_up_front(env, small_fs, capsys):
    root, teacher = env
    mount_point, _ = small_fs
    out = mount_point / "cache"
    assert main(_args(root, teacher, out)) == 2
    err = capsys.readouterr().err
    assert "not enough free space for this cache: it needs about" in err
    assert f"the filesystem of {str(out)!r} (mounted at {mount_point})" in err and "free" in err
    assert "--no-space-check" in err
    assert not out.exists()


def test_running_out_of_space_keeps_finished_shards_and_the_rerun_resumes(env, small_fs, capsys):
    root, teacher = env
    mount_point, remount = small_fs
    reference = root / "reference"
    if not reference.exists():
        assert main(_args(root, teacher, reference)) == 0
    out = mount_point / "cache"
    capsys.readouterr()
    assert main(_args(root, teacher, out, "--no-space-check")) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (transformers may print its loading bar before)
    assert err.startswith("kdcache build: error: ")
    assert "no space left on device while writing shard" in err
    assert f"the filesystem of {str(out)!r} (mounted at {mount_point}) is full" in err
    assert "The cache needs about" in err and "rerun the same command: it resumes" in err
    assert re.search(r"Free at least (?!0 B)\d+(\.\d)? (B|KiB|MiB) there", err), err  # never "at least 0 B"
    journaled = sorted(int(p.stem) for p in (out / STATE_DIR / "shards").glob("*.json"))
    num_shards = fmt.load_manifest(reference)["num_shards"]
    assert 1 <= len(journaled) < num_shards and journaled == list(range(len(journaled)))
    failed = len(journaled)
    assert f"writing shard {failed}:" in err
    for spec in fmt.layout_from_manifest(fmt.load_manifest(reference)).arrays():
        assert not (out / fmt.shard_relpath(spec.name, failed, 1 + len(spec.trailing_shape))).exists()
    leftovers = [p for p in out.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]
    assert not leftovers, leftovers
    assert not (out / fmt.MANIFEST_NAME).exists()

    remount(64 << 20)  # "free space"
    assert main(_args(root, teacher, out, "--no-space-check")) == 0
    assert "resuming: " in capsys.readouterr().out
    assert fmt.load_manifest(out)["shards"] == fmt.load_manifest(reference)["shards"]
    assert main(["verify", str(out), "--no-progress"]) == 0


def test_out_of_space_when_the_estimate_says_it_fits_says_the_estimate_was_too_low(tmp_path):
    """The ENOSPC error on a filesystem with room to spare by the estimate (another writer filled it, or the
    estimate was low): no "free at least 0 B", but what is true."""
    layout = fmt.CacheLayout(num_sequences=4, seq_len=8, topk=2, vocab_size=50, shard_seqs=2, chunk_seqs=1)
    message = str(space.out_of_space_error(tmp_path, layout, [], "writing shard 0"))
    assert "Free at least" not in message, message
    assert re.search(r"so it was too low: free clearly more than the (?!0 B)\d+(\.\d)? (B|KiB) still to write", message)
    assert "rerun the same command: it resumes" in message
