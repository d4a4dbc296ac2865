"""Repairing a finished cache: rerunning the SAME `kdcache build` command re-verifies every shard against the
manifest and rebuilds exactly the damaged or missing ones, leaving a cache byte-identical to an undamaged build
(manifest included); an intact cache is checked and left alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_server import format as fmt
from cache_server.cli import main
from tests.teachers import make_llama_teacher, save_factory_teacher

T = 11


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def _shard_file(cache: Path, array: str, shard: int) -> Path:
    manifest = fmt.load_manifest(cache)
    return cache / fmt.shard_relpath(array, shard, len(manifest["arrays"][array]["shape"]))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished cache of 5 shards and a copy of it taken before anything is damaged."""
    root = tmp_path_factory.mktemp("repair")
    teacher = make_llama_teacher(root / "teacher", 80, hidden_size=16, num_layers=1, seed=5, logit_scale=8.0)
    np.save(root / "tokens.npy", np.random.default_rng(5).integers(0, 80, size=18 * T + 3))
    args = ["build", "--teacher", str(teacher), "--data", str(root / "tokens.npy"), "--topk", "5", "--seq-len", str(T),
            "--out", str(root / "cache"), "--shard-seqs", "4", "--chunk-seqs", "2", "--batch-size", "2",
            "--temperatures", "2", "--no-progress"]
    assert main(args) == 0
    shutil.copytree(root / "cache", root / "pristine")
    return root, args


def test_damaged_and_missing_shards_are_rebuilt_byte_identical(built, capsys):
    root, args = built
    cache, pristine = root / "cache", root / "pristine"
    flipped = _shard_file(cache, "topk_logprobs", 1)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 3] ^= 0x40  # one bit of one compressed chunk
    flipped.write_bytes(bytes(raw))
    _shard_file(cache, "lse_t2", 3).unlink()
    _shard_file(cache, "input_ids", 3).unlink()
    capsys.readouterr()
    assert main(["verify", str(cache), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "'topk_logprobs' shard 1" in err and "'lse_t2' shard 3" in err and "rerun the same" in err
    before = _mtimes(cache)

    assert main(args) == 0  # the same command
    out = capsys.readouterr().out
    assert "2 of 5 shards are damaged or missing" in out and "rebuilt shards [1, 3]" in out
    assert "manifest is unchanged" in out
    assert main(["verify", str(cache), "--no-progress"]) == 0
    assert _files(cache) == _files(pristine)  # every file, the manifest too, byte for byte
    after = _mtimes(cache)
    rewritten = {name for name in after if after[name] != before.get(name)}
    # Only shard files of shards 1 and 3 (every array of them) were written again.
    assert rewritten and all(n.split("/")[1:3] in (["c", "1"], ["c", "3"]) for n in rewritten), rewritten
    assert not (cache / ".kdcache-build").exists()


def test_an_intact_cache_is_verified_and_left_alone(built, capsys):
    root, args = built
    cache = root / "cache"
    before = _mtimes(cache)
    capsys.readouterr()
    assert main(args + ["--batch-size", "3"]) == 0  # batch size is not a setting
    out = capsys.readouterr().out
    assert "already complete" in out and "verified against the manifest" in out and "nothing to do" in out
    assert _mtimes(cache) == before
    assert not (cache / ".kdcache-build").exists()


def test_repair_with_other_bytes_rewrites_the_manifest(tmp_path, capsys):
    """A teacher whose output depends on the batch size: the rebuilt shard differs from the old one, so the
    manifest gets the new checksums and statistics recomputed from every shard."""
    weights = save_factory_teacher(tmp_path / "w.safetensors", seed=3)
    np.save(tmp_path / "tokens.npy", np.random.default_rng(3).integers(0, 50, size=12 * T))
    cache = tmp_path / "cache"
    args = ["build", "--teacher", str(weights), "--model-factory", "tests.teachers:batch_dependent_lm_factory",
            "--data", str(tmp_path / "tokens.npy"), "--topk", "4", "--seq-len", str(T), "--out", str(cache),
            "--shard-seqs", "4", "--chunk-seqs", "2", "--no-progress"]
    assert main(args + ["--batch-size", "2"]) == 0
    old = fmt.load_manifest(cache)
    _shard_file(cache, "seq_nll", 2).unlink()
    capsys.readouterr()
    assert main(args + ["--batch-size", "4"]) == 0
    assert "manifest was rewritten" in capsys.readouterr().out
    assert main(["verify", str(cache), "--no-progress"]) == 0
    new = fmt.load_manifest(cache)
    for name, entries in new["shards"].items():
        assert entries[:2] == old["shards"][name][:2]  # untouched shards keep their entries
    assert new["shards"]["topk_logprobs"][2] != old["shards"]["topk_logprobs"][2]
    assert new["build_args"] == old["build_args"] and new["dataset_fingerprint"] == old["dataset_fingerprint"]
    import zarr

    group = zarr.open_group(str(cache), mode="r")
    np.testing.assert_allclose(new["stats"]["mean_nll"], float(np.mean(group["seq_nll"][:].astype(np.float64))),
                               rtol=1e-9)


def test_an_unreadable_manifest_needs_overwrite(built, capsys):
    root, args = built
    cache, pristine = root / "cache", root / "pristine"
    (cache / fmt.MANIFEST_NAME).write_text("{ not json")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "manifest cannot be used" in err and "--overwrite" in err
    assert (cache / fmt.MANIFEST_NAME).read_text() == "{ not json"  # nothing changed
    assert main(args + ["--overwrite"]) == 0
    assert fmt.load_manifest(cache)["shards"] == fmt.load_manifest(pristine)["shards"]
