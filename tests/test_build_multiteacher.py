"""`kdcache build --teacher A --teacher B`: the stored targets are those of the weighted mixture of the teachers,
checked against a direct torch computation from their full logits; weights, vocabularies and reruns."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

from cache_server import format as fmt
from cache_server.build.mixture import TeacherMixture, normalize_weights
from cache_server.build.options import BuildInputError
from cache_server.build.teacher import inspect_teacher
from cache_server.cli import main
from tests.teachers import load_llama_teacher, make_llama_teacher, train_tokenizer

V = 97  # not a power of two
T = 11
N = 5
K = 7
TEMPS = (0.5, 2.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiteacher")
    a = make_llama_teacher(root / "a", V, seed=1, logit_scale=8.0)
    b = make_llama_teacher(root / "b", V, seed=2, logit_scale=3.0)
    c = make_llama_teacher(root / "c", V, seed=3, hidden_size=16, num_layers=1, logit_scale=5.0)
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, V, size=(N, T)))
    return root, (a, b, c)


def build(*args) -> int:
    return main(["build", "--no-progress", *map(str, args)])


def read_arrays(out) -> tuple[dict, dict[str, np.ndarray]]:
    manifest = fmt.load_manifest(out)
    layout = fmt.layout_from_manifest(manifest)
    raw = {spec.name: [(out / fmt.shard_relpath(spec.name, i, 1 + len(spec.trailing_shape))).read_bytes()
                       for i in range(layout.num_shards)] for spec in layout.arrays()}
    arrays = {}
    for spec in layout.arrays():
        parts = [fmt.decode_shard(raw[spec.name][i], spec, layout, i,
                                  companions={n: raw[n][i] for n in fmt.decode_inputs(layout, spec.name)[1:]})
                 for i in range(layout.num_shards)]
        arrays[spec.name] = np.concatenate(parts)
    return manifest, arrays


@torch.inference_mode()
def mixture_logprobs(paths, weights, ids: np.ndarray) -> torch.Tensor:
    """log sum_m w_m softmax(z_m) [N, T, V] in float64, straight from each teacher's logits."""
    x = torch.from_numpy(ids.astype(np.int64))
    terms = [torch.log_softmax(load_llama_teacher(p)(input_ids=x).logits.double(), -1) + np.log(w)
             for p, w in zip(paths, weights)]
    return torch.logsumexp(torch.stack(terms), dim=0)


def test_mixture_build_matches_direct_torch(setup, tmp_path):
    root, (a, b, _) = setup
    out = tmp_path / "mix"
    assert build("--teacher", a, "--teacher", b, "--teacher-weights", "7,3", "--data", root / "tokens.npy",
                 "--topk", K, "--seq-len", T, "--temperatures", "0.5,2", "--logprob-dtype", "float32",
                 "--batch-size", 2, "--shard-seqs", 2, "--chunk-seqs", 1, "--out", out) == 0
    manifest, arrays = read_arrays(out)
    logp = mixture_logprobs([a, b], [0.7, 0.3], arrays["input_ids"])  # [N, T, V]
    values, ids = torch.topk(logp, K, dim=-1)
    np.testing.assert_array_equal(arrays["topk_ids"], ids.numpy())
    np.testing.assert_allclose(arrays["topk_logprobs"], values.numpy(), atol=2e-5)
    np.testing.assert_allclose(arrays["lse"], 0.0, atol=2e-5)  # the mixture's log-probs are normalised
    for tau in TEMPS:
        np.testing.assert_allclose(arrays[fmt.temperature_key(tau)], torch.logsumexp(logp / tau, -1).numpy(),
                                   rtol=1e-5, atol=2e-5)
    nxt = torch.from_numpy(arrays["input_ids"][:, 1:].astype(np.int64))
    nll = -logp[:, :-1].gather(-1, nxt[..., None]).squeeze(-1).mean(1)
    entropy = -(logp.exp() * logp).sum(-1).mean(1)
    np.testing.assert_allclose(arrays["seq_nll"], nll.numpy(), rtol=1e-5)
    np.testing.assert_allclose(arrays["seq_entropy"], entropy.numpy(), rtol=1e-5)
    tail = 1 - values.exp().sum(-1)
    assert manifest["stats"]["mean_tail_mass"] == pytest.approx(float(tail.mean()), rel=1e-4)
    # Every teacher's identity (the fingerprint a single-teacher build records) and its normalised weight.
    assert [t["weight"] for t in manifest["teachers"]] == pytest.approx([0.7, 0.3])
    assert [t["weights_sha256"] for t in manifest["teachers"]] == [
        inspect_teacher(p).weights_sha256() for p in (a, b)]
    assert manifest["teacher"]["kind"] == "mixture"
    members = manifest["build_args"]["teacher"]["members"]
    assert [m["weights_sha256"] for m in members] == [inspect_teacher(p).identity()["weights_sha256"] for p in (a, b)]


def test_three_teachers_equal_weights_k_equals_v(setup, tmp_path):
    root, teachers = setup
    out = tmp_path / "mix3"
    args = [x for p in teachers for x in ("--teacher", p)]
    assert build(*args, "--data", root / "tokens.npy", "--topk", V, "--seq-len", T, "--out", out) == 0
    manifest, arrays = read_arrays(out)
    logp = mixture_logprobs(teachers, [1 / 3] * 3, arrays["input_ids"]).float()
    stored = np.full((N, T, V), np.nan, dtype=np.float32)
    np.put_along_axis(stored, arrays["topk_ids"].astype(np.int64), arrays["topk_logprobs"].astype(np.float32), -1)
    np.testing.assert_allclose(stored, logp.numpy(), atol=4e-3, rtol=2e-3)  # fp16 storage
    assert manifest["teacher"]["weights"] == pytest.approx([1 / 3] * 3)
    assert manifest["stats"]["mean_tail_mass"] < 2e-3  # k = V: no tail beyond fp16 rounding


def test_single_teacher_manifest_keeps_its_fields(setup, tmp_path):
    root, (a, _, _) = setup
    assert build("--teacher", a, "--data", root / "tokens.npy", "--topk", K, "--seq-len", T,
                 "--out", tmp_path / "one") == 0
    manifest = fmt.load_manifest(tmp_path / "one")
    assert "teachers" not in manifest and manifest["teacher"]["kind"] == "transformers"
    assert "members" not in manifest["build_args"]["teacher"]


@pytest.mark.parametrize("weights, message", [
    ("0.5", "1 weights for 2 --teacher"),
    ("1,2,3", "3 weights for 2 --teacher"),
    ("1,0", "positive finite"),
    ("1,-2", "positive finite"),
    ("1,nan", "positive finite"),
    ("1,inf", "positive finite"),
])
def test_bad_weights_are_refused_before_anything_is_written(setup, tmp_path, capsys, weights, message):
    root, (a, b, _) = setup
    out = tmp_path / "never"
    assert build("--teacher", a, "--teacher", b, "--teacher-weights", weights, "--data", root / "tokens.npy",
                 "--topk", K, "--seq-len", T, "--out", out) == 2
    err = capsys.readouterr().err
    assert message in err and "--teacher-weights" in err
    assert not out.exists()


def test_weights_for_a_single_teacher_are_refused(setup, tmp_path, capsys):
    root, (a, _, _) = setup
    assert build("--teacher", a, "--teacher-weights", "1", "--data", root / "tokens.npy", "--topk", K,
                 "--seq-len", T, "--out", tmp_path / "never") == 2
    assert "needs several --teacher" in capsys.readouterr().err


def test_normalize_weights():
    assert normalize_weights(None, 4) == (0.25,) * 4
    assert normalize_weights((7, 3), 2) == pytest.approx((0.7, 0.3))
    assert sum(normalize_weights((1e-300, 3e-300), 2)) == pytest.approx(1.0)
    with pytest.raises(BuildInputError, match="--weights has 3 weights for 2 CACHE"):
        normalize_weights((1, 2, 3), 2, option="--weights", per="CACHE")


def test_vocabulary_mismatch_names_both_sizes(setup, tmp_path, capsys):
    root, (a, _, _) = setup
    other = make_llama_teacher(tmp_path / "wide", V + 20, seed=4)
    assert build("--teacher", a, "--teacher", other, "--data", root / "tokens.npy", "--topk", K, "--seq-len", T,
                 "--out", tmp_path / "never") == 2
    err = capsys.readouterr().err
    assert f"has {V} logits" in err and f"has {V + 20}" in err and "share the vocabulary" in err
    assert not (tmp_path / "never").exists()


def test_padded_embedding_is_allowed_with_a_tokenizer(tmp_path, capsys):
    """A teacher whose embedding is padded past the tokenizer's 300 tokens mixes with an unpadded one: the
    cache has the wider vocabulary and the narrow teacher gives the padding ids probability 0."""
    tok = train_tokenizer(tmp_path / "tok", vocab_size=300, max_chars=60_000)
    narrow = make_llama_teacher(tmp_path / "narrow", 300, seed=5, logit_scale=4.0, tokenizer_dir=tok)
    padded = make_llama_teacher(tmp_path / "padded", 320, seed=6, logit_scale=4.0)
    np.save(tmp_path / "tokens.npy", np.random.default_rng(1).integers(0, 300, size=(3, T)))
    out = tmp_path / "mix"
    assert build("--teacher", narrow, "--teacher", padded, "--data", tmp_path / "tokens.npy", "--topk", 320,
                 "--seq-len", T, "--logprob-dtype", "float32", "--out", out) == 0
    manifest, arrays = read_arrays(out)
    assert manifest["vocab_size"] == 320
    x = torch.from_numpy(arrays["input_ids"].astype(np.int64))
    with torch.inference_mode():
        p_narrow = torch.softmax(load_llama_teacher(narrow)(input_ids=x).logits.double(), -1)
        p_padded = torch.softmax(load_llama_teacher(padded)(input_ids=x).logits.double(), -1)
    p_mix = 0.5 * torch.nn.functional.pad(p_narrow, (0, 20)) + 0.5 * p_padded
    stored = np.zeros((3, T, 320))
    np.put_along_axis(stored, arrays["topk_ids"].astype(np.int64),
                      np.exp(arrays["topk_logprobs"].astype(np.float64)), -1)
    np.testing.assert_allclose(stored, p_mix.numpy(), rtol=1e-5, atol=1e-7)
    # Ids must be real tokens of the narrowest teacher, not only below the cache's (padded) vocabulary.
    np.save(tmp_path / "padding_ids.npy", np.full((3, T), 310))
    assert build("--teacher", narrow, "--teacher", padded, "--data", tmp_path / "padding_ids.npy", "--topk", 8,
                 "--seq-len", T, "--out", tmp_path / "never") == 2
    assert "outside the teacher vocabulary (vocab_size=300)" in capsys.readouterr().err


def test_rerun_is_identical_and_other_weights_are_refused(setup, tmp_path, capsys, monkeypatch):
    root, (a, b, _) = setup
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    common = ["--teacher", a, "--teacher", b, "--teacher-weights", "0.6,0.4", "--data", root / "tokens.npy",
              "--topk", K, "--seq-len", T, "--shard-seqs", 2, "--chunk-seqs", 1]
    assert build(*common, "--batch-size", 1, "--out", tmp_path / "one") == 0
    assert build(*common, "--batch-size", 1, "--out", tmp_path / "two") == 0

    def files(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    assert files(tmp_path / "one") == files(tmp_path / "two")  # byte-identical, manifest included
    capsys.readouterr()
    assert build(*common, "--batch-size", 1, "--out", tmp_path / "one") == 0
    assert "already complete" in capsys.readouterr().out
    swapped = [x if x != "0.6,0.4" else "0.4,0.6" for x in common]
    assert build(*swapped, "--out", tmp_path / "one") == 2
    assert "different settings" in capsys.readouterr().err


def test_info_prints_a_mixture_build_command_that_reruns_as_complete(setup, tmp_path, capsys):
    root, (a, b, _) = setup
    out = tmp_path / "mix"
    assert build("--teacher", a, "--teacher", b, "--teacher-weights", "0.7,0.2", "--data", root / "tokens.npy",
                 "--topk", K, "--seq-len", T, "--out", out) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    command = shlex.split(json.loads(capsys.readouterr().out)["build_command"])
    assert command.count("--teacher") == 2 and "--teacher-weights" in command
    assert main(command[1:] + ["--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_teacher_mixture_module_folds_in_place():
    """The module's output equals the stacked logsumexp, for a narrower first teacher too."""
    torch.manual_seed(0)

    class Fixed(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(width, width) * 3)

        def forward(self, ids):
            return self.w[ids % self.w.shape[0]]

    models = [Fixed(12), Fixed(16), Fixed(16)]
    weights = normalize_weights((1, 2, 5), 3)
    mix = TeacherMixture(models, weights, [12, 16, 16], 16)
    ids = torch.randint(0, 12, (2, 5))
    with torch.inference_mode():
        got = mix(ids)
        terms = [torch.nn.functional.pad(torch.log_softmax(m(ids).double(), -1), (0, 16 - m.w.shape[0]),
                                         value=-np.inf) + np.log(w) for m, w in zip(models, weights)]
    want = torch.logsumexp(torch.stack(terms), 0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(torch.logsumexp(got.double(), -1), torch.zeros(2, 5, dtype=torch.float64), atol=1e-5,
                               rtol=0)
