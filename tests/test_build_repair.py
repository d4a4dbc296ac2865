"""Repairing a finished cache: rerunning the SAME `kdcache build` command re-verifies every shard against the
manifest and rebuilds exactly the damaged or missing ones (and rewrites damaged Zarr metadata), leaving a cache
byte-identical to an undamaged build (manifest included); an intact cache is checked and left alone. The
command rerun is the one `kdcache info` prints, run from any directory."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_server import format as fmt
from cache_server.cli import main
from tests.teachers import make_llama_teacher, save_factory_teacher, stdlib_text, train_tokenizer, write_token_file

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


def test_damaged_zarr_metadata_is_named_by_verify_and_rewritten_by_the_rerun(built, capsys):
    """zarr.json files are not in the manifest, yet Zarr readers need them: verify makes them again from the
    layout and compares; the rerun rewrites the damaged ones and leaves the manifest as it is."""
    import zarr

    root, args = built
    cache, pristine = root / "cache", root / "pristine"
    raw = bytearray((cache / "zarr.json").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (cache / "zarr.json").write_bytes(bytes(raw))
    (cache / "topk_ids" / "zarr.json").unlink()
    capsys.readouterr()
    assert main(["verify", str(cache), "--no-progress", "--quick"]) == 1
    err = capsys.readouterr().err
    assert f"Zarr metadata zarr.json ({cache / 'zarr.json'}): differs from the Zarr metadata" in err, err
    assert f"Zarr metadata topk_ids/zarr.json ({cache / 'topk_ids' / 'zarr.json'}): the metadata file is missing" in err
    assert "is DAMAGED (2 problem(s))" in err  # the two metadata files; no shard is blamed
    manifest_mtime = (cache / fmt.MANIFEST_NAME).stat().st_mtime_ns

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rewriting it" in out and "rewrote the Zarr metadata topk_ids/zarr.json, zarr.json" in out, out
    assert "manifest, which is unchanged" in out
    assert (cache / fmt.MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime
    assert main(["verify", str(cache), "--no-progress"]) == 0
    assert _files(cache) == _files(pristine)
    zarr.open_group(str(cache), mode="r")["topk_ids"][:2]  # Zarr reads it again


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


# ------------------------------------------------------------------ the repair command `kdcache info` prints

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The `kdcache` console script (``python -m cache_server`` where it is not installed) in ``cwd``."""
    script = Path(sys.executable).parent / "kdcache"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cache_server"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("KDCACHE_DEBUG", None)
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _bin_case(root: Path) -> tuple[list[str], list[str]]:
    """A uint32 .bin stream (read as uint16 it would be other tokens) and temperatures `:g` would round."""
    teacher = make_llama_teacher(root / "teacher", 80, hidden_size=16, num_layers=1, seed=8, logit_scale=6.0)
    write_token_file(root / "tokens.bin", np.random.default_rng(8).integers(0, 80, size=14 * T), "bin-uint32")
    return ["--teacher", str(teacher), "--data", str(root / "tokens.bin"), "--data-dtype", "uint32",
            "--temperatures", "0.1234567,2.000001", "--topk", "4"], ["--data-dtype uint32",
                                                                      "--temperatures 0.1234567,2.000001"]


def _txt_case(root: Path) -> tuple[list[str], list[str]]:
    """Paragraphs of a .txt file given by a path relative to the directory the build runs in."""
    tokenizer = train_tokenizer(root / "tok", vocab_size=300, max_chars=100_000)
    teacher = make_llama_teacher(root / "teacher", 300, hidden_size=16, num_layers=1, seed=9, tokenizer_dir=tokenizer)
    (root / "data").mkdir()
    (root / "data" / "docs.txt").write_text(stdlib_text(800))
    return ["--teacher", str(teacher), "--data", "data/docs.txt", "--text-documents", "blank-line",
            "--topk", "4"], ["--text-documents blank-line", f"--data {root / 'data' / 'docs.txt'}"]


@pytest.mark.parametrize("case", [_bin_case, _txt_case], ids=["bin-uint32-odd-temperatures", "txt-blank-line-relative"])
def test_the_command_info_prints_repairs_the_cache_from_any_directory(tmp_path, monkeypatch, capsys, case):
    """Build; damage a shard; run EXACTLY the command `kdcache info` prints, from another directory: it must
    repair the cache (not refuse it as "different settings"), leaving it byte-identical to an undamaged one."""
    root = tmp_path / "build-dir"
    root.mkdir()
    options, expected = case(root)
    monkeypatch.chdir(root)  # where the build runs: relative paths are relative to it
    args = ["build", *options, "--seq-len", str(T), "--shard-seqs", "2", "--chunk-seqs", "1", "--out", "cache",
            "--no-progress"]
    assert main(args) == 0
    shutil.copytree(root / "cache", tmp_path / "pristine")
    capsys.readouterr()
    assert main(["info", "cache"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("build command"))
    argv = shlex.split(line.split(None, 2)[2])
    assert argv[:2] == ["kdcache", "build"] and all(option in shlex.join(argv) for option in expected), argv
    assert all(os.path.isabs(argv[argv.index(option) + 1]) for option in ("--teacher", "--data", "--out"))
    cache = root / "cache"
    flipped = _shard_file(cache, "topk_logprobs", 1)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    flipped.write_bytes(bytes(raw))
    _shard_file(cache, "lse", 2).unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    rerun = _cli(*argv[1:], cwd=elsewhere)
    assert rerun.returncode == 0, rerun.stderr
    assert "rebuilt shards [1, 2]" in rerun.stdout and "manifest is unchanged" in rerun.stdout, rerun.stdout
    verify = _cli("verify", str(cache), "--no-progress", cwd=elsewhere)
    assert verify.returncode == 0, verify.stderr
    assert _files(cache) == _files(tmp_path / "pristine")
