"""Bad input to `kdcache build`: exit code 2, a message saying what is wrong and how to fix it, and no output
directory created when validation fails up front. NaN logits stop the build, keeping earlier shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_server.cli import main
from cache_server.build.writer import STATE_DIR
from tests.teachers import NAN_TOKEN, make_llama_teacher, save_factory_teacher

T = 9
V = 40


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    teacher = make_llama_teacher(root / "teacher", V, hidden_size=16, num_layers=1, seed=3)
    np.save(root / "ok.npy", np.random.default_rng(0).integers(0, V, size=5 * T))
    return root, teacher


def _fails(capsys, args, *needles, out: Path | None = None) -> str:
    rc = main(["build", "--no-progress", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2, err
    for needle in needles:
        assert needle in err, err
    if out is not None:
        assert not out.exists(), "validation failure must not create the output directory"
    return err


def _base(root, teacher, data=None, out=None, topk=4, seq_len=T):
    return ["--teacher", teacher, "--data", data or root / "ok.npy", "--topk", topk, "--seq-len", seq_len,
            "--out", out or root / "out"]


def test_bad_arguments_and_data(env, capsys, tmp_path):
    root, teacher = env
    out = tmp_path / "never"
    _fails(capsys, _base(root, teacher, out=out, topk=V + 1), f"--topk {V + 1} is larger", f"--topk {V}", out=out)
    _fails(capsys, _base(root, teacher, out=out, seq_len=1), "--seq-len must be at least 2", out=out)
    _fails(capsys, _base(root, teacher, out=out) + ["--temperatures", "2,-1"], "positive", out=out)

    np.save(tmp_path / "empty.npy", np.zeros(0, np.int32))
    _fails(capsys, _base(root, teacher, tmp_path / "empty.npy", out), "empty", out=out)
    np.save(tmp_path / "short.npy", np.arange(T - 1))
    _fails(capsys, _base(root, teacher, tmp_path / "short.npy", out), "fewer than one sequence", out=out)
    np.save(tmp_path / "rows.npy", np.zeros((3, T + 2), np.int64))
    _fails(capsys, _base(root, teacher, tmp_path / "rows.npy", out), f"--seq-len {T + 2}", out=out)
    np.save(tmp_path / "big.npy", np.full(3 * T, V, np.int64))
    _fails(capsys, _base(root, teacher, tmp_path / "big.npy", out), f"token id {V} is outside", "vocab_size=40",
           out=out)
    np.save(tmp_path / "neg.npy", np.full(3 * T, -3, np.int64))
    _fails(capsys, _base(root, teacher, tmp_path / "neg.npy", out), "non-negative", out=out)
    # ids that do not fit the chosen dtype: a uint16 stream read as uint32 → huge ids; an odd byte count.
    np.arange(4 * T, dtype=np.uint16).tofile(tmp_path / "u16.bin")
    _fails(capsys, _base(root, teacher, tmp_path / "u16.bin", out) + ["--data-dtype", "uint32"],
           "--data-dtype uint16", out=out)
    (tmp_path / "odd.bin").write_bytes(b"\x00" * (2 * T + 1))
    _fails(capsys, _base(root, teacher, tmp_path / "odd.bin", out), "not a multiple of 2", out=out)
    (tmp_path / "doc.txt").write_text("def f():\n    return 1\n" * 20)
    _fails(capsys, _base(root, teacher, tmp_path / "doc.txt", out), "--tokenizer", out=out)
    _fails(capsys, _base(root, teacher, tmp_path / "nope.npy", out), "does not exist", out=out)


def test_bad_teachers(env, capsys, tmp_path):
    root, teacher = env
    out = tmp_path / "never"
    _fails(capsys, _base(root, tmp_path / "missing-teacher", out=out), "does not exist", out=out)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(teacher / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    _fails(capsys, _base(root, pickled, out=out), "never unpickles", "safetensors", out=out)
    (tmp_path / "model.pt").write_bytes(b"x")
    _fails(capsys, _base(root, tmp_path / "model.pt", out=out) + ["--model-factory", "tests.teachers:tiny_lm_factory"],
           "never unpickles", out=out)

    broken = tmp_path / "broken"
    shutil.copytree(teacher, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    _fails(capsys, _base(root, broken, out=out), "cannot load the teacher", out=out)

    weights = save_factory_teacher(tmp_path / "w.safetensors")
    _fails(capsys, _base(root, weights, out=out), "--model-factory", out=out)
    _fails(capsys, _base(root, weights, out=out) + ["--model-factory", "no_such_module_xyz:f"], "cannot import",
           out=out)
    # Weights that do not fit the factory's model (the Llama teacher's safetensors with TinyLM).
    _fails(capsys, _base(root, teacher / "model.safetensors", out=out)
           + ["--model-factory", "tests.teachers:tiny_lm_factory"], "do not fit", out=out)


def test_nan_logits_stop_the_build_and_keep_earlier_shards(tmp_path, capsys):
    weights = save_factory_teacher(tmp_path / "w.safetensors", seed=1)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, size=(10, T))
    ids[ids == NAN_TOKEN] = NAN_TOKEN + 1
    ids[5, 7] = NAN_TOKEN  # first NaN logits: sequence 5, position 7 (shard 2 with 2 sequences per shard)
    np.save(tmp_path / "rows.npy", ids)
    out = tmp_path / "cache"
    args = ["--teacher", weights, "--model-factory", "tests.teachers:nan_lm_factory", "--data",
            tmp_path / "rows.npy", "--topk", 3, "--seq-len", T, "--out", out, "--shard-seqs", 2, "--chunk-seqs", 1,
            "--batch-size", 1]
    _fails(capsys, args, "NaN/inf logits at sequence 5, position 7", "shard 2")
    journals = sorted(p.name for p in (out / STATE_DIR / "shards").glob("*.json"))
    assert journals == ["0.json", "1.json"]
    assert (out / "topk_ids" / "c" / "1" / "0" / "0").exists()
    assert not (out / "topk_ids" / "c" / "2" / "0" / "0").exists() and not (out / "manifest.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in (out / "topk_ids" / "c").rglob("*") if p.is_file()}
    # Rerunning the same command resumes (shards 0-1 untouched) and stops at the same place again.
    _fails(capsys, args, "sequence 5, position 7")
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_unavailable_devices_are_refused_up_front(env, capsys, tmp_path):
    import torch

    root, teacher = env
    out = tmp_path / "never"
    _fails(capsys, _base(root, teacher, out=out) + ["--device", "tpu9"], "'tpu9' is not a torch device", out=out)
    if torch.cuda.is_available():
        beyond = torch.cuda.device_count() + 3
        _fails(capsys, _base(root, teacher, out=out) + ["--device", f"cuda:{beyond}"],
               f"only {torch.cuda.device_count()} CUDA device(s) are visible", out=out)
    else:
        for device in ("cuda", "cuda:3"):
            _fails(capsys, _base(root, teacher, out=out) + ["--device", device],
                   f"--device {device}: CUDA is not available", "use --device cpu", out=out)
    if not torch.backends.mps.is_available():
        _fails(capsys, _base(root, teacher, out=out) + ["--device", "mps"], "--device mps: MPS is not available",
               out=out)


def test_seq_len_beyond_the_teachers_positions_is_refused(env, capsys, tmp_path):
    root, teacher = env  # max_position_embeddings = 1024
    out = tmp_path / "never"
    np.save(tmp_path / "long.npy", np.random.default_rng(1).integers(0, V, size=3 * 2000))
    _fails(capsys, _base(root, teacher, tmp_path / "long.npy", out, seq_len=2000),
           "--seq-len 2000 is longer than the teacher can see", "takes at most 1024 positions",
           "max_position_embeddings = 1024 in its config.json",
           "use --seq-len 1024 or less", out=out)


def test_more_bad_inputs_end_in_one_clear_line(env, capsys, tmp_path, monkeypatch):
    """Paths that used to end in a traceback (or an internal error): each is a one-line error, exit 2."""
    root, teacher = env
    out = tmp_path / "never"
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(teacher / "config.json", no_weights / "config.json")
    _fails(capsys, _base(root, no_weights, out=out), "no *.safetensors weights", out=out)
    weights = save_factory_teacher(tmp_path / "w.safetensors")
    _fails(capsys, _base(root, weights, out=out) + ["--model-factory", "tests.teachers:failing_factory"],
           "raised RuntimeError: this factory needs a GPU with 80 GB", out=out)
    _fails(capsys, _base(root, weights, out=out) + ["--model-factory", "tests.teachers:wrong_output_lm_factory"],
           "must return logits [B, T, V]", out=out)
    (tmp_path / "broken_factory_module.py").write_text("raise ImportError('boom') if False else 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _fails(capsys, _base(root, weights, out=out) + ["--model-factory", "broken_factory_module:make"],
           "importing 'broken_factory_module' failed with ZeroDivisionError", out=out)

    np.save(tmp_path / "floats.npy", np.random.default_rng(0).random(5 * T))
    _fails(capsys, _base(root, teacher, tmp_path / "floats.npy", out), "holds float64 values", out=out)
    (tmp_path / "fake.npy").write_bytes(b"not a numpy file at all")
    _fails(capsys, _base(root, teacher, tmp_path / "fake.npy", out), "is not a .npy file", out=out)
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 but not really")
    _fails(capsys, _base(root, teacher, tmp_path / "fake.parquet", out), "cannot read", "as a Parquet file", out=out)
    (tmp_path / "empty.txt").write_text("")
    _fails(capsys, _base(root, teacher, tmp_path / "empty.txt", out) + ["--tokenizer", _tokenizer(tmp_path)],
           "empty (0 tokens)", out=out)
    _fails(capsys, _base(root, teacher, out=out) + ["--max-sequences", "0"], "--max-sequences must be positive",
           out=out)
    _fails(capsys, _base(root, teacher, out=out) + ["--rank", "2", "--world-size", "2"], "--rank 2 must be in",
           out=out)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _fails(capsys, _base(root, teacher, out=a_file / "cache"), "cannot create the build lock", out=a_file / "cache")
    assert a_file.read_text() == "x"


def _tokenizer(tmp_path: Path) -> Path:
    from tests.teachers import train_tokenizer

    return train_tokenizer(tmp_path / "tok", vocab_size=V, max_chars=20_000)
