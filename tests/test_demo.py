"""The demo's pieces on tiny settings: the served cache with a token (and that it always stops), the
side-by-side students (same init, same batches), the table and the curves PNG."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import kdlib  # noqa: E402
from _demo_corpus import heldout_batch, heldout_loss, make_model  # noqa: E402
from _demo_server import serve_cache  # noqa: E402
from _demo_students import format_table, plot_curves, train_side_by_side  # noqa: E402
from benchmarks._common import write_fast_synthetic_cache  # noqa: E402


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return write_fast_synthetic_cache(tmp_path_factory.mktemp("demo") / "cache", 48, 32, 8, 512, shard_seqs=16,
                                      chunk_seqs=8)


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_served_cache_needs_the_token_reads_the_local_bytes_and_stops(tiny_cache, tmp_path):
    with serve_cache(tiny_cache, tmp_path) as served:
        assert served.url.startswith("http://127.0.0.1:") and served.url.endswith("/v1/caches/cache")
        assert (tmp_path / "token.txt").stat().st_mode & 0o777 == 0o600
        meta = served.url + "/manifest"
        assert httpx.get(meta).status_code == 401  # no token: refused
        remote = kdlib.open_cache(served.url, token=served.token, decode_dir=tmp_path / "dec")
        got, want = remote.read(0, 20), kdlib.open_cache(tiny_cache).read(0, 20)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name
        remote.close()
        proc = served.proc
    assert proc.poll() is not None


def test_server_stops_on_an_error_in_the_block(tiny_cache, tmp_path):
    with pytest.raises(ZeroDivisionError):
        with serve_cache(tiny_cache, tmp_path) as served:
            pid = served.proc.pid
            1 / 0
    assert _gone(pid)


def test_server_stops_when_the_demo_gets_sigterm(tiny_cache, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'examples')!r})
        from pathlib import Path
        from _demo_server import serve_cache, sigterm_raises
        with sigterm_raises(), serve_cache(Path({str(tiny_cache)!r}), Path({str(tmp_path)!r})) as served:
            print(served.proc.pid, flush=True)
            time.sleep(120)
    """)
    demo = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    server_pid = int(demo.stdout.readline())
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(timeout=30) != 0  # KeyboardInterrupt ends it
    assert _gone(server_pid)


def test_students_share_init_and_batches_and_kd_weight_zero_is_ce(tiny_cache):
    cache = kdlib.open_cache(tiny_cache)
    ids = cache.read(40, 48, arrays=["input_ids"])["input_ids"].long()  # [8, 32]
    eval_ids, eval_labels = heldout_batch(ids.flatten().numpy(), 32)
    # KD weight 0 and CE weight 1: the "KD" student is the CE student, step for step (same init, same batches).
    result = train_side_by_side(cache, eval_ids, eval_labels, vocab_size=512, steps=6, hidden=32, batch_size=4,
                                eval_every=3, kd_kwargs={"ce_weight": 1.0, "kd_weight": 0.0})
    assert [s for s, _ in result["curves"]["ce"]] == [0, 3, 6]
    assert result["curves"]["ce"][0] == result["curves"]["kd"][0]
    torch.testing.assert_close(torch.tensor(result["train_loss"]["kd"]), torch.tensor(result["train_loss"]["ce"]),
                               rtol=1e-4, atol=1e-4)
    assert result["curves"]["ce"][-1][1] < result["curves"]["ce"][0][1]  # it learned (these are cache sequences)
    assert len(result["step_s"]["kd"]) == len(result["fetch_s"]) == 6
    assert result["kd_over_ce_step_time"] > 0
    # With KD on, the student's losses differ from CE's (the teacher's targets were used).
    kd = train_side_by_side(cache, eval_ids, eval_labels, vocab_size=512, steps=2, hidden=32, batch_size=4)
    assert kd["train_loss"]["kd"][0] != pytest.approx(kd["train_loss"]["ce"][0], abs=1e-3)


def test_heldout_loss_is_the_mean_next_token_ce():
    model = make_model(64, hidden=16, layers=1, seq_len=8)
    ids, labels = heldout_batch(torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(0)).numpy(), 8)
    assert ids.shape == (5, 8) and (labels[:, -1] == -100).all() and torch.equal(labels[:, :-1], ids[:, 1:])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert heldout_loss(model, ids, labels, batch_size=2) == pytest.approx(want, rel=1e-5)


def test_table_and_curves_png(tmp_path):
    table = format_table([("teacher", "4.500"), ("CE-only student", "5.007")], "held-out")
    assert table.splitlines()[2] == "teacher          4.500"
    result = {"curves": {"ce": [(0, 8.3), (10, 6.0)], "kd": [(0, 8.3), (10, 5.8)]}}
    png = plot_curves(result, 4.5, tmp_path / "curves.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
