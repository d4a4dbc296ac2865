"""`kdcache build --targets sample|hybrid`: sampled targets from a real tiny transformers teacher.

What is checked: counts sum to --samples at every position; slots hold distinct valid ids by descending count
(ties: ascending id) with id 0 / count 0 padding; sample_logprobs equal log_softmax of the teacher logits
(fp16 tolerance); lse and lse_t{τs} exact; the draws equal a naive float64 inverse-CDF reference fed the same
uniforms; a re-run, a SIGKILLed-then-resumed build and another --batch-size give byte-identical shards, and
compute_targets' draws do not depend on chunking, batching or bf16 vs fp32 logits of the same values; the
empirical frequencies over many positions with one distribution match the teacher's (|z| < 5 per id, see
test_draw_frequencies_match_the_teacher); hybrid samples never hit the exact head; W < N truncation is
recorded; bad flags are clear errors; open_cache + read_batch and a real `kdcache serve` subprocess return
the arrays and `sample_temperature`, and read_batch refuses a sample id outside the vocabulary; `kdcache info` prints a build command that reruns as "already complete".
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_server import format as fmt
from cache_server.build import sampling
from cache_server.build.targets import compute_targets
from cache_server.build.writer import STATE_DIR
from cache_server.cli import main
from kdlib import open_cache
from kdlib.batch import read_batch
from tests.serverproc import ServerProcess
from tests.teachers import load_llama_teacher, make_llama_teacher

REPO = Path(__file__).resolve().parents[1]
V, T, N_SEQ = 300, 17, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    teacher = make_llama_teacher(root / "teacher", V, hidden_size=32, seed=5, logit_scale=4.0)
    np.save(root / "tokens.npy", np.random.default_rng(5).integers(0, V, size=40 * T + 3))
    return root, teacher


def _args(root: Path, teacher: Path, out: Path, *extra) -> list[str]:
    return ["build", "--teacher", str(teacher), "--data", str(root / "tokens.npy"), "--seq-len", str(T),
            "--out", str(out), "--shard-seqs", "4", "--chunk-seqs", "2", "--max-sequences", str(N_SEQ),
            "--no-progress", *map(str, extra)]


def _build(setup, name: str, *extra) -> Path:
    root, teacher = setup
    out = root / name
    if not (out / fmt.MANIFEST_NAME).exists():
        assert main(_args(root, teacher, out, *extra)) == 0
    return out


def _all(cache_dir: Path, decode_dir: Path) -> dict[str, np.ndarray]:
    cache = open_cache(cache_dir, decode_dir=decode_dir)
    batch = read_batch(cache, np.arange(cache.num_sequences))
    return {k: v.numpy() for k, v in batch.items()}


@torch.inference_mode()
def _teacher_logits(teacher: Path, input_ids: np.ndarray) -> torch.Tensor:
    model = load_llama_teacher(teacher)
    return model(torch.from_numpy(input_ids.astype(np.int64))).logits.double()  # [N, T, V]


def _dense(ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[..., W] slots → [..., V] counts."""
    out = np.zeros((*ids.shape[:-1], V), dtype=np.int64)
    flat_out, flat_ids, flat_counts = out.reshape(-1, V), ids.reshape(-1, ids.shape[-1]), counts.reshape(-1, ids.shape[-1])
    for r in range(flat_out.shape[0]):
        np.add.at(flat_out[r], flat_ids[r].astype(np.int64), flat_counts[r].astype(np.int64))
    return out


def _reference_draws(logits: torch.Tensor, uniforms: torch.Tensor, tau: float, head: np.ndarray | None) -> np.ndarray:
    """Naive float64 inverse CDF of softmax(z / tau) (head ids removed) at the given uniforms → [N, T, D] ids."""
    p = torch.softmax(logits / tau, dim=-1)  # [N, T, V] float64
    if head is not None:
        p.scatter_(-1, torch.from_numpy(head.astype(np.int64)), 0.0)
    cdf = p.cumsum(-1)
    x = uniforms.double() * cdf[..., -1:]
    return torch.searchsorted(cdf.contiguous(), x.contiguous(), right=True).clamp_(max=V - 1).numpy()


def _check_slots(a: dict[str, np.ndarray], samples: int, slots: int) -> None:
    ids, counts = a["sample_ids"].astype(np.int64), a["sample_counts"].astype(np.int64)
    assert ids.shape == counts.shape == (N_SEQ, T, slots)
    assert ((0 <= ids) & (ids < V)).all()
    pad = counts == 0
    assert (ids[pad] == 0).all(), "padding slots hold id 0"
    assert (np.diff(counts, axis=-1) <= 0).all(), "slots by descending count"
    ties = (np.diff(counts, axis=-1) == 0) & ~pad[..., 1:]
    assert (np.diff(ids, axis=-1)[ties] > 0).all(), "equal counts by ascending id"
    assert (pad[..., :-1] <= pad[..., 1:]).all(), "padding only at the end"
    if slots == samples:
        assert (counts.sum(-1) == samples).all()


def test_sample_cache_values_and_manifest(setup, tmp_path):
    root, teacher = setup
    out = _build(setup, "sample", "--targets", "sample", "--samples", 24, "--sample-temperature", 2)
    a = _all(out, tmp_path / "dec")
    assert "topk_ids" not in a and "topk_logprobs" not in a
    _check_slots(a, 24, 24)
    assert float(a["sample_temperature"]) == 2.0 and a["sample_temperature"].dtype == np.float32

    logits = _teacher_logits(teacher, a["input_ids"])
    logprobs = torch.log_softmax(logits, -1).numpy()
    ids, counts = a["sample_ids"].astype(np.int64), a["sample_counts"]
    want = np.where(counts > 0, np.take_along_axis(logprobs, ids, -1), 0.0)
    np.testing.assert_allclose(a["sample_logprobs"].astype(np.float64), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(a["lse"], torch.logsumexp(logits, -1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["lse_t2"], torch.logsumexp(logits / 2, -1).numpy(), rtol=1e-5, atol=1e-5)

    manifest = fmt.load_manifest(out)
    targets = manifest["targets"]
    assert {k: targets[k] for k in ("kind", "samples", "slots", "sample_temperature")} == {
        "kind": "sample", "samples": 24, "slots": 24, "sample_temperature": 2.0}
    layout = fmt.layout_from_manifest(manifest)
    assert targets["sample_seed"] == sampling.layout_seed(layout, manifest["build_args"])
    assert manifest["topk"] == 0 and manifest["temperatures"] == [2.0]
    assert manifest["stats"]["truncated_draws"] == 0 and manifest["stats"]["mean_tail_mass"] is None
    assert manifest["stats"]["mean_unique_per_position"] == pytest.approx((counts > 0).sum(-1).mean())

    # The same uniforms through a naive float64 inverse CDF draw the same ids (a fp32-vs-fp64 CDF boundary
    # case may flip one draw in ~1e7; allow one position).
    uniforms = sampling.sequence_uniforms(targets["sample_seed"], 0, N_SEQ, T, 24)
    ref = _reference_draws(logits, uniforms, 2.0, None)
    ref_counts = np.stack([np.bincount(r, minlength=V) for r in ref.reshape(-1, 24)]).reshape(N_SEQ, T, V)
    assert (ref_counts != _dense(ids, counts)).any(-1).sum() <= 1


def _main_one_thread(args: list[str]) -> int:
    """``kdcache build`` in a fresh process with one OpenMP thread: with two, MKL splits a matmul by its row
    count, so batches of 3 and of 8 round the logits' last bits differently (the build promises identity for the
    same --batch-size; across batch sizes only single-threaded). A fresh process, because threads this one
    started earlier keep the thread count they had."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cache_server", *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL).returncode


def test_rerun_other_batch_size_and_sigkill_resume_are_byte_identical(setup):
    root, teacher = setup
    flags = ("--targets", "hybrid", "--topk", 3, "--samples", 16, "--sample-temperature", 0.5)
    reference = root / "hybrid-1thread"
    assert _main_one_thread(_args(root, teacher, reference, *flags)) == 0
    ref_manifest = fmt.load_manifest(reference)

    def same_shards(other: Path) -> None:
        manifest = fmt.load_manifest(other)
        assert manifest["shards"] == ref_manifest["shards"] and manifest["targets"] == ref_manifest["targets"]
        for _, _, path in fmt.iter_shard_files(reference, ref_manifest):
            assert (other / path.relative_to(reference)).read_bytes() == path.read_bytes()

    other_batch = root / "hybrid-b3"
    assert _main_one_thread(_args(root, teacher, other_batch, *flags, "--batch-size", 3)) == 0
    same_shards(other_batch)

    killed = root / "hybrid-killed"
    args = _args(root, teacher, killed, *flags, "--batch-size", 1, "--shard-seqs", 2, "--chunk-seqs", 1)
    args[args.index("--max-sequences") + 1] = "40"
    full = root / "hybrid-40"
    full_args = list(args)
    full_args[full_args.index("--out") + 1] = str(full)
    assert main(full_args) == 0
    proc = subprocess.Popen([sys.executable, "-m", "cache_server", *args], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    journal, deadline = killed / STATE_DIR / "shards", time.monotonic() + 120
    while not (journal.is_dir() and any(journal.glob("*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard journal appeared"
        time.sleep(0.005)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert 1 <= len(list(journal.glob("*.json"))) < 20, "the kill must land mid-build"
    assert main(args) == 0  # resume
    full_manifest, resumed = fmt.load_manifest(full), fmt.load_manifest(killed)
    assert resumed["shards"] == full_manifest["shards"]
    for _, _, path in fmt.iter_shard_files(full, full_manifest):
        assert (killed / path.relative_to(full)).read_bytes() == path.read_bytes()


def test_hybrid_head_is_exact_and_samples_avoid_it(setup, tmp_path):
    root, teacher = setup
    out = _build(setup, "hybrid", "--targets", "hybrid", "--topk", 3, "--samples", 16, "--sample-temperature", 0.5)
    a = _all(out, tmp_path / "dec")
    _check_slots(a, 16, 16)
    logits = _teacher_logits(teacher, a["input_ids"])
    logprobs = torch.log_softmax(logits, -1)
    head_values, head_ids = logprobs.topk(3, dim=-1)
    np.testing.assert_allclose(a["topk_logprobs"].astype(np.float64), head_values.numpy(), rtol=2e-3, atol=2e-3)
    # The head as a set (within it, equal fp16 values are stored by ascending id).
    np.testing.assert_array_equal(np.sort(a["topk_ids"], -1), np.sort(head_ids.numpy(), -1))
    counted = a["sample_counts"] > 0
    hits = (a["sample_ids"][..., :, None] == a["topk_ids"][..., None, :]).any(-1) & counted
    assert not hits.any(), "a hybrid sample hit the exact head"
    assert "lse_t0.5" in a and float(a["sample_temperature"]) == 0.5
    manifest = fmt.load_manifest(out)
    assert manifest["targets"]["kind"] == "hybrid" and manifest["topk"] == 3
    assert 0 < manifest["stats"]["mean_tail_mass"] < 1
    uniforms = sampling.sequence_uniforms(manifest["targets"]["sample_seed"], 0, N_SEQ, T, 16)
    ref = _reference_draws(logits, uniforms, 0.5, a["topk_ids"])
    ref_counts = np.stack([np.bincount(r, minlength=V) for r in ref.reshape(-1, 16)]).reshape(N_SEQ, T, V)
    assert (ref_counts != _dense(a["sample_ids"], a["sample_counts"])).any(-1).sum() <= 1


def _frequencies(logits_row: torch.Tensor, positions: int, samples: int, tau: float, hybrid_head: int) -> np.ndarray:
    logits = logits_row.expand(1, positions, -1).contiguous()  # [1, P, V]: one distribution at every position
    uniforms = sampling.sequence_uniforms(1234, 0, 1, positions, samples)
    request = sampling.SampleRequest(uniforms, slots=samples, temperature=tau, hybrid=hybrid_head > 0)
    temps = (tau,) if tau != 1.0 else ()
    out = compute_targets(logits, torch.zeros(1, positions, dtype=torch.int64), hybrid_head, temps,
                          chunk_rows=97, sampling_request=request)
    ids, counts = out["sample_ids"].reshape(-1, samples), out["sample_counts"].reshape(-1, samples)
    assert (counts.sum(-1) == samples).all()
    return np.bincount(ids.reshape(-1).numpy(), weights=counts.reshape(-1).numpy(), minlength=logits_row.numel())


def _frequency_logits(vocab: int) -> torch.Tensor:
    """V = 40: a dense random row. V = 2000 (draws located group by group, see sampling._GROUP_SIZE = 64):
    mass on ids spread over the groups, the short tail group (1984..1999) and the ids just before it that
    the last window also covers (1936..1983); every other id at -30 (never drawn in practice)."""
    g = torch.Generator().manual_seed(7)
    if vocab == 40:
        return torch.randn(vocab, generator=g) * 2.0
    hot = torch.tensor([0, 5, 63, 64, 700, 1201, 1935, 1936, 1950, 1983, 1984, 1990, 1999])
    z = torch.full((vocab,), -30.0)
    z[hot] = torch.randn(len(hot), generator=g) * 1.5
    return z


@pytest.mark.parametrize("tau,head,vocab,samples", [
    (1.0, 0, 40, 8), (0.7, 0, 40, 8), (1.0, 3, 40, 8), (2.0, 3, 40, 8),  # one cumsum over V
    (1.0, 0, 2000, 4), (0.5, 0, 2000, 4), (1.0, 3, 2000, 4),  # grouped: D * 64 <= V
])
def test_draw_frequencies_match_the_teacher(tau, head, vocab, samples):
    """M = 3000 positions x D draws of one distribution: each id's count n_y against M D p_y with
    |z| = |n_y - M D p_y| / sqrt(M D p_y (1 - p_y)) < 5 (fixed seed, so the test is deterministic; a correct
    sampler fails it with probability ~ V * 6e-7), ids of probability 0 (the hybrid head) never drawn."""
    z = _frequency_logits(vocab)
    assert (samples * sampling._GROUP_SIZE <= vocab) == (vocab == 2000)  # which inversion runs
    counts = _frequencies(z, 3000, samples, tau, head)
    p = torch.softmax(z.double() / tau, -1)
    if head:
        p[z.double().topk(head).indices] = 0.0
        p /= p.sum()
    expected = counts.sum() * p.numpy()
    assert (counts[expected == 0] == 0).all()
    live = expected > 0
    zscores = (counts[live] - expected[live]) / np.sqrt(expected[live] * (1 - p.numpy()[live]))
    assert np.abs(zscores).max() < 5, zscores


def test_truncated_slots_are_recorded(setup, tmp_path):
    out = _build(setup, "truncated", "--targets", "sample", "--samples", 40, "--sample-slots", 3,
                 "--no-sample-logprobs")
    a = _all(out, tmp_path / "dec")
    assert "sample_logprobs" not in a
    _check_slots(a, 40, 3)
    kept = a["sample_counts"].astype(np.int64).sum(-1)
    assert (kept <= 40).all() and (kept < 40).any()
    stats = fmt.load_manifest(out)["stats"]
    assert stats["truncated_draws"] == int((40 - kept).sum()) > 0
    assert stats["truncated_fraction"] == pytest.approx((40 - kept).sum() / (40 * N_SEQ * T))


def test_info_prints_a_build_command_that_reruns_as_complete(setup, capsys):
    out = _build(setup, "truncated", "--targets", "sample", "--samples", 40, "--sample-slots", 3,
                 "--no-sample-logprobs")
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    command = shlex.split(info["build_command"])
    assert command[:2] == ["kdcache", "build"]
    for flag in ("--targets sample", "--samples 40", "--sample-slots 3", "--no-sample-logprobs"):
        assert flag in info["build_command"]
    assert "--topk" not in command and info["summary"]["targets"] == "sample"
    assert main(command[1:] + ["--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "samples          sample: 40 draws per position" in text and "draws dropped" in text


def test_verify_passes_on_a_sampled_cache(setup):
    out = _build(setup, "sample", "--targets", "sample", "--samples", 24, "--sample-temperature", 2)
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("extra,message", [
    (("--targets", "sample", "--samples", 8, "--topk", 4), "stores no top-k"),
    (("--targets", "hybrid", "--samples", 8), "needs --topk"),
    (("--targets", "sample"), "needs --samples"),
    (("--targets", "sample", "--samples", 70000), "from 1 to 65535"),
    (("--targets", "sample", "--samples", 8, "--sample-slots", 9), "--sample-slots must be from 1 to"),
    (("--targets", "sample", "--samples", 8, "--sample-temperature", 0), "--sample-temperature must be"),
    (("--topk", 4, "--samples", 8), "for --targets sample or hybrid"),
    (("--targets", "hybrid", "--topk", V, "--samples", 8), "leaves nothing of the teacher vocabulary"),
    ((), "--targets topk needs --topk"),
])
def test_bad_flags_are_clear_errors(setup, capsys, extra, message):
    root, teacher = setup
    out = root / "never"
    assert main(_args(root, teacher, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_server_serves_sampled_arrays(setup, tmp_path):
    sample = _build(setup, "sample", "--targets", "sample", "--samples", 24, "--sample-temperature", 2)
    hybrid = _build(setup, "hybrid", "--targets", "hybrid", "--topk", 3, "--samples", 16, "--sample-temperature", 0.5)
    with ServerProcess([str(sample), str(hybrid)], token_dir=tmp_path) as server:
        for cache_dir in (sample, hybrid):
            local = _all(cache_dir, tmp_path / "local")
            remote_cache = open_cache(server.cache_url(cache_dir.name), decode_dir=tmp_path / "remote")
            order = [5, 0, 11, 3]
            remote = read_batch(remote_cache, order)
            assert set(remote) == set(local)
            for key, value in remote.items():
                want = local[key] if value.dim() == 0 or key == "teacher_vocab_size" else local[key][order]
                if key == "sample_indices":
                    want = np.array(order)
                np.testing.assert_array_equal(value.numpy(), want, err_msg=key)
            import pyarrow as pa

            response = server_get(server, cache_dir.name, "sample_ids,sample_counts")
            table = pa.ipc.open_stream(response).read_all()
            got = np.array(table.column("sample_counts").to_pylist(), dtype=np.int64)
            np.testing.assert_array_equal(got, local["sample_counts"][2:6])


def server_get(server: ServerProcess, name: str, arrays: str) -> bytes:
    import httpx

    from cache_server.format import wire

    response = httpx.get(server.base_url + wire.rows_path(name), params={"start": 2, "stop": 6, "arrays": arrays},
                         headers=server.auth_headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.content


def _write_sample_cache(out: Path, bad_id: int | None) -> Path:
    """A 2-sequence sample cache written through the real writer; slot (0, 0, 1) holds ``bad_id`` if given."""
    from cache_server.build.writer import CacheWriter

    Vs, Ts, W = 100, 4, 3
    layout = fmt.CacheLayout(num_sequences=2, seq_len=Ts, topk=0, vocab_size=Vs, targets="sample", samples=5,
                             sample_slots=W, shard_seqs=2, chunk_seqs=1)
    ids = np.tile(np.array([7, 9, 0], dtype=np.uint16), (2, Ts, 1))
    counts = np.tile(np.array([3, 2, 0], dtype=np.uint8), (2, Ts, 1))
    if bad_id is not None:
        ids[0, 0, 1] = bad_id
    arrays = {"input_ids": np.full((2, Ts), 3, np.uint16), "sample_ids": ids, "sample_counts": counts,
              "sample_logprobs": np.where(counts > 0, -1.5, 0.0).astype(np.float16),
              "lse": np.full((2, Ts), 4.5, np.float32), "seq_nll": np.ones(2, np.float32),
              "seq_entropy": np.ones(2, np.float32)}
    writer = CacheWriter(out, layout, settings={"test": "sample ids"}, manifest_fields={})
    assert writer.pending_shards() == [0]
    writer.write_shard(0, arrays)
    writer.finalize()
    return out


def test_read_batch_checks_sample_ids_against_the_vocabulary(tmp_path):
    from kdlib.batch import AlignmentError

    good = read_batch(open_cache(_write_sample_cache(tmp_path / "good", None), decode_dir=tmp_path / "d"), [0, 1])
    assert good["sample_ids"][0, 0].tolist() == [7, 9, 0] and good["sample_counts"][0, 0].tolist() == [3, 2, 0]
    assert float(good["sample_temperature"]) == 1.0
    bad = open_cache(_write_sample_cache(tmp_path / "bad", 150), decode_dir=tmp_path / "d")
    with pytest.raises(AlignmentError, match="sample id 150, outside the teacher's vocabulary of 100"):
        read_batch(bad, [0, 1])


@pytest.mark.parametrize("hybrid,tau,topk", [(False, 1.0, 0), (True, 0.5, 4)])
def test_draws_do_not_depend_on_chunking_batching_or_the_logits_dtype(hybrid, tau, topk):
    """bf16 logits in ragged chunks of 3 rows == the same values in fp32 in one chunk, bit for bit; and a
    batch of 2 sequences == each sequence alone (the uniforms are per sequence). V = 5003, D = 16: the
    grouped inversion (D * 64 <= V) with its short tail group."""
    B, Tn, Vn, D = 2, 7, 5003, 16
    logits = (torch.randn(B, Tn, Vn, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    ids = torch.randint(0, Vn, (B, Tn), generator=torch.Generator().manual_seed(4))
    temps = (tau,) if tau != 1.0 else ()

    def run(x, start, stop, chunk_rows=None):
        u = sampling.sequence_uniforms(99, start, stop, Tn, D)
        request = sampling.SampleRequest(u, slots=D, temperature=tau, hybrid=hybrid)
        return compute_targets(x, ids[start:stop], topk, temps, chunk_rows=chunk_rows, sampling_request=request)

    chunked, whole = run(logits, 0, B, chunk_rows=3), run(logits.float(), 0, B)
    singles = [run(logits[i : i + 1], i, i + 1) for i in range(B)]
    for key in ("sample_ids", "sample_counts", "sample_logprobs", *(["topk_ids"] if topk else [])):
        assert torch.equal(chunked[key], whole[key]), key
        assert torch.equal(torch.cat([s[key] for s in singles]), whole[key]), key
    assert (whole["sample_counts"].sum(-1) == D).all()
