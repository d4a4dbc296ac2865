"""benchmarks/gpu_suite.sh: its dry run passes here (no CUDA needed), and the bf16 check it runs on a GPU.

Shape notation: N rows, V vocabulary, K teacher top-k.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.skipif(ON_GPU, reason="the suite itself runs on the GPU; the dry run is the CPU-side check")
def test_dry_run_checks_every_step_and_passes(tmp_path):
    env = {**os.environ, "KDCACHE_GPU_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SUITE), "--dry-run", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    err = done.stderr
    assert "all checks passed" in err
    for needle in ("ok: tests/test_triton_sparse_kd.py exists", "ok: kernel tests collect",
                   "ok: benchmarks/step_overhead.py accepts --d-model", "ok: benchmarks/bench_loss.py accepts --rows",
                   "ok: benchmarks/bench_build.py accepts --kv-heads", "ok: this script parses"):
        assert needle in err, needle
    assert "FAIL" not in err
    # The flag check tells options apart: bench_build either has the GPU options or the dry run says it lacks them.
    assert ("ok: bench_build accepts --device" in err) != ("note: bench_build has no --device" in err)


def test_a_spent_suite_budget_skips_steps_and_still_writes_the_summary(tmp_path):
    """The real-run path with no time left: every step recorded as skipped, summary.json written last."""
    env = {**os.environ, "KDCACHE_GPU_PYTHON": sys.executable, "KDCACHE_GPU_SUITE_BUDGET_S": "0"}
    done = subprocess.run(["bash", str(SUITE), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary
    names = [s["step"] for s in summary["steps"]]
    assert names[:5] == ["setup", "env", "kernels", "bench_loss", "step_overhead"] and names[-1] == "bench_build_gpu"
    # bench_build has --device/--dtype, so its GPU step is planned and skipped like the others
    assert summary["skipped"] == names and summary["failed"] == []


def test_run_without_out_dir_is_a_usage_error():
    done = subprocess.run(["bash", str(SUITE)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage:" in done.stderr


@pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need CUDA (run by benchmarks/gpu_suite.sh)")
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_triton_bf16_llama3_vocab_matches_reference(tail):
    """bf16 logits at V = 128,256 (Llama 3's vocabulary), N = 96, K = 32: loss and gradient vs float64."""
    import kdlib

    n, vocab, k = 96, 128_256, 32
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    teacher_logp = torch.log_softmax(teacher, -1)
    topk_logprobs, topk_ids = teacher_logp.topk(k, -1)  # [N, K]
    lse = torch.logsumexp(teacher, -1)  # [N]
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100
    logits = (torch.randn(n, vocab, generator=g) * 2.0).cuda().to(torch.bfloat16).requires_grad_()
    kwargs = dict(labels=labels.cuda(), ce_weight=0.5, kd_weight=0.5, tail=tail)
    got = kdlib.kd_loss(logits, topk_ids.int().cuda(), topk_logprobs.half().cuda(), teacher_lse=lse.float().cuda(),
                        backend="triton", **kwargs)
    grad_out = torch.tensor(1.7, device="cuda")
    (got * grad_out).backward()
    ref_logits = logits.detach().double().requires_grad_()
    want = kdlib.losses.kd_loss_reference(ref_logits, topk_ids.cuda(), topk_logprobs.half().double().cuda(),
                                          teacher_lse=lse.cuda(), **kwargs)
    (want * grad_out.double()).backward()
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1.6e-2, atol=2e-5)
