"""`kdcache merge`: caches of separately built teachers → their mixture. Exact when k = V (equal to the
multi-teacher build up to fp16), within the documented bounds otherwise (KL measured), refused for caches that
do not hold the same tokens, and crash-safe (SIGKILL mid-merge, rerun → identical to an uninterrupted merge)."""

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
from cache_server.build.merge import merge_error_bound, merge_positions
from cache_server.build.writer import STATE_DIR
from cache_server.cli import main
from tests.teachers import make_llama_teacher
from tests.test_build_multiteacher import read_arrays

REPO = Path(__file__).resolve().parents[1]
V = 128
T = 12
N = 8
WEIGHTS = "0.7,0.3"
KS = (4, 16, 64)


def build(*args) -> int:
    return main(["build", "--no-progress", *map(str, args)])


def merge(*args) -> int:
    return main(["merge", "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a = make_llama_teacher(root / "a", V, seed=21, logit_scale=12.0)
    b = make_llama_teacher(root / "b", V, seed=22, hidden_size=16, logit_scale=6.0)
    np.save(root / "tokens.npy", np.random.default_rng(5).integers(0, V, size=N * T + 3))
    data = ["--data", root / "tokens.npy", "--seq-len", T]
    for dtype in ("float16", "float32"):
        assert build("--teacher", a, "--teacher", b, "--teacher-weights", WEIGHTS, *data, "--topk", V,
                     "--logprob-dtype", dtype, "--out", root / f"exact-{dtype}") == 0
        for name, teacher in (("a", a), ("b", b)):
            for k in (V, *KS):
                assert build("--teacher", teacher, *data, "--topk", k, "--logprob-dtype", dtype,
                             "--out", root / f"{name}-{k}-{dtype}") == 0
    return root, (a, b)


def dense(arrays) -> np.ndarray:
    """[N, T, V] probabilities of a cache whose top-k is the whole vocabulary."""
    p = np.full((N, T, V), np.nan)
    np.put_along_axis(p, arrays["topk_ids"].astype(np.int64), np.exp(arrays["topk_logprobs"].astype(np.float64)), -1)
    assert not np.isnan(p).any()
    return p


def test_merge_equals_the_multiteacher_build_when_k_is_v(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "merged"
    assert merge(root / f"a-{V}-float16", root / f"b-{V}-float16", "--weights", WEIGHTS, "--out", out) == 0
    manifest, got = read_arrays(out)
    _, want = read_arrays(root / "exact-float16")
    assert manifest["topk"] == V and manifest["teacher"]["kind"] == "merge"
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    # Up to fp16: the inputs' log-probs, the merged ones and the build's are each rounded to fp16 (half a unit
    # in the last place each), so they agree within 2 units in the last place of the fp16 log-prob.
    log_got, log_want = np.log(dense(got)), np.log(dense(want))
    ulp = np.spacing(np.abs(log_want).astype(np.float16)).astype(np.float64)
    assert (np.abs(log_got - log_want) <= 2 * ulp).all()
    np.testing.assert_allclose(got["lse"], want["lse"], atol=1e-5)
    np.testing.assert_allclose(got["seq_nll"], want["seq_nll"], rtol=2e-3)
    np.testing.assert_allclose(got["seq_entropy"], want["seq_entropy"], rtol=2e-3)
    lp = got["topk_logprobs"].astype(np.float64)
    assert (np.diff(lp, axis=-1) <= 0).all()  # canonical order: descending log-prob
    assert [t["weight"] for t in manifest["teachers"]] == pytest.approx([0.7, 0.3])
    assert [t["weights_sha256"] for t in manifest["teachers"]] == [
        fmt.load_manifest(root / f"{n}-{V}-float16")["teacher"]["weights_sha256"] for n in "ab"]


def _bucket_kl(merged_ids, merged_lp, p_exact) -> np.ndarray:
    """KL(merged || exact) [N, T] over the K stored ids plus one tail bucket (what a bucketed loss sees)."""
    p_hat = np.exp(merged_lp.astype(np.float64))
    p = np.take_along_axis(p_exact, merged_ids.astype(np.int64), -1)
    t_hat, t = 1 - p_hat.sum(-1), 1 - p.sum(-1)
    t_hat, t = np.clip(t_hat, 1e-300, None), np.clip(t, 1e-300, None)
    return (p_hat * np.log(p_hat / p)).sum(-1) + t_hat * np.log(t_hat / t)


@pytest.mark.parametrize("k", KS)
def test_merge_error_bound_and_kl(setup, tmp_path, k):
    root, _ = setup
    out = tmp_path / f"merged-{k}"
    inputs = [root / f"{n}-{k}-float32" for n in "ab"]
    assert merge(*inputs, "--weights", WEIGHTS, "--out", out) == 0
    _, got = read_arrays(out)
    p_exact = dense(read_arrays(root / "exact-float32")[1])  # the exact multi-teacher build, k = V
    ins = [read_arrays(p)[1] for p in inputs]
    flat = [(a["topk_ids"].reshape(N * T, k), a["topk_logprobs"].reshape(N * T, k)) for a in ins]
    eps = merge_error_bound([f[0] for f in flat], [f[1] for f in flat], [0.7, 0.3],
                            got["topk_ids"].reshape(N * T, k)).reshape(N, T, k)
    p_hat = np.exp(got["topk_logprobs"].astype(np.float64))
    p = np.take_along_axis(p_exact, got["topk_ids"].astype(np.int64), -1)
    assert (p_hat <= p * (1 + 1e-5) + 1e-7).all()  # the known part is a lower bound...
    assert (p <= p_hat + eps + 1e-6).all()  # ...missing entries at most the teachers' k-th probabilities
    t_hat, t = 1 - p_hat.sum(-1), 1 - p.sum(-1)
    assert (t_hat >= t - 1e-5).all()  # the implied tail is an upper bound of the exact one
    exact_where_covered = eps.sum(-1) == 0
    np.testing.assert_allclose(t_hat[exact_where_covered], t[exact_where_covered], atol=1e-5)
    kl = _bucket_kl(got["topk_ids"], got["topk_logprobs"], p_exact)
    eps_total = eps.sum(-1)
    bounded = t_hat > eps_total + 1e-6
    bound = t_hat[bounded] * np.log(t_hat[bounded] / (t_hat[bounded] - eps_total[bounded]))
    assert (kl[bounded] <= bound + 1e-5).all()
    assert (kl >= -1e-6).all()
    print(f"\nk={k}: mean KL(merged || exact) = {kl.mean():.3e} nats (max {kl.max():.3e}), mean tail "
          f"{t_hat.mean():.4f} vs exact {t.mean():.4f}, exact-tail positions {exact_where_covered.mean():.0%}")
    # seq_nll is an upper bound of the mixture's NLL, seq_entropy at least the weighted teachers' entropy.
    exact = read_arrays(root / "exact-float32")[1]
    assert (got["seq_nll"] >= exact["seq_nll"] * (1 - 1e-5)).all()


def test_merge_positions_by_hand():
    """Two teachers, three positions: union, weighted sums, ordering (ties by ascending id), top-K."""
    ids = [np.array([[3, 1], [0, 2], [5, 4]]), np.array([[1, 7], [2, 0], [4, 5]])]
    p = [np.array([[0.5, 0.25], [0.5, 0.25], [0.4, 0.4]]), np.array([[0.5, 0.25], [0.5, 0.25], [0.4, 0.4]])]
    merged = merge_positions(ids, [np.log(x) for x in p], [0.5, 0.5], topk=2)
    np.testing.assert_array_equal(merged.ids, [[1, 3], [0, 2], [4, 5]])
    np.testing.assert_allclose(np.exp(merged.logprobs), [[0.375, 0.25], [0.375, 0.375], [0.4, 0.4]])
    assert merged.jsd.shape == (3,) and (merged.jsd >= 0).all()
    np.testing.assert_allclose(merged.jsd[2], 0.0, atol=1e-12)  # identical teachers: no disagreement


def test_merge_refuses_mismatched_caches(setup, tmp_path, capsys):
    root, (a, _) = setup
    good = root / "a-4-float32"
    other_tokens = tmp_path / "tokens2.npy"
    np.save(other_tokens, np.random.default_rng(6).integers(0, V, size=N * T + 3))
    small_ids = tmp_path / "tokens100.npy"
    np.save(small_ids, np.load(root / "tokens.npy") % 100)
    cases = {
        "tokens": (["--teacher", a, "--data", other_tokens, "--seq-len", T], "different tokens"),
        "seq_len": (["--teacher", a, "--data", root / "tokens.npy", "--seq-len", T - 2], "sequence lengths"),
        "vocab": (["--teacher", make_llama_teacher(tmp_path / "v100", 100, seed=3), "--data", small_ids,
                   "--seq-len", T], "vocabularies"),  # checked before the tokens
    }
    for name, (args, message) in cases.items():
        assert build(*args, "--topk", 4, "--out", tmp_path / name) == 0
        capsys.readouterr()
        assert merge(good, tmp_path / name, "--out", tmp_path / f"never-{name}") == 2, name
        err = capsys.readouterr().err
        assert message in err and str(good) in err, (name, err)
        assert not (tmp_path / f"never-{name}").exists()
    assert merge(good, root / "b-4-float32", "--weights", "1,2,3", "--out", tmp_path / "never") == 2
    assert "3 weights for 2 CACHE" in capsys.readouterr().err
    assert merge(good, "--out", tmp_path / "never") == 2
    assert "at least two caches" in capsys.readouterr().err
    assert merge(good, root / "b-4-float32", "--topk", 5, "--out", tmp_path / "never") == 2
    assert "--topk 5 must be between 1 and 4" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_sigkill_mid_merge_then_rerun_is_identical(tmp_path, capsys, monkeypatch):
    n = 24
    a = make_llama_teacher(tmp_path / "a", V, seed=31, logit_scale=8.0)
    b = make_llama_teacher(tmp_path / "b", V, seed=32, logit_scale=4.0)
    np.save(tmp_path / "tokens.npy", np.random.default_rng(7).integers(0, V, size=n * T))
    for name, teacher in (("a", a), ("b", b)):
        assert build("--teacher", teacher, "--data", tmp_path / "tokens.npy", "--seq-len", T, "--topk", 8,
                     "--out", tmp_path / f"cache-{name}") == 0
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")

    def args(out):
        return ["merge", str(tmp_path / "cache-a"), str(tmp_path / "cache-b"), "--weights", "2,1", "--out", str(out),
                "--shard-seqs", "1", "--no-progress"]

    assert main(args(tmp_path / "reference")) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cache_server", *args(out)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    journal = out / STATE_DIR / "shards"
    deadline = time.monotonic() + 120
    while not (journal.is_dir() and len(list(journal.glob("*.json"))) >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard journal appeared"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = len(list(journal.glob("*.json")))
    assert 2 <= done < n, f"kill landed after {done}/{n} shards"
    assert not (out / fmt.MANIFEST_NAME).exists()
    with pytest.raises(fmt.CacheError, match="rerun the same"):
        fmt.load_manifest(out)
    capsys.readouterr()
    assert main(args(out)) == 0  # resume
    assert f"resuming: {done} of {n} shards already written" in capsys.readouterr().out
    assert _tree(out) == _tree(tmp_path / "reference")  # every file, the manifest included
    assert main(args(out)) == 0
    assert "already complete" in capsys.readouterr().out


def test_manifest_teachers_list_is_validated(setup):
    root, _ = setup
    manifest = fmt.load_manifest(root / "exact-float16")
    assert [t["weight"] for t in manifest["teachers"]] == pytest.approx([0.7, 0.3])
    for bad in ({"weight": 0.5}, [{"name": "a"}], [{"weight": -1}], [{"weight": True}]):
        broken = {**manifest, "teachers": bad}
        with pytest.raises(fmt.CacheError, match="'teachers' must be a list of objects"):
            fmt.parse_manifest(fmt.manifest_bytes(broken), "test")
