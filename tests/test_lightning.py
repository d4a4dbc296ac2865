"""PyTorch Lightning: ``CacheDataModule`` + ``DistillModule`` through examples/lightning_distill.py.

A run checkpointed every 3 steps and resumed from a mid-epoch checkpoint (step 3) and from one at the epoch
boundary (step 6) trains on exactly the batches, with exactly the losses, of the uninterrupted run (6 batches
per epoch, 10 steps: the resumed runs cross into the second epoch); so does a run killed with SIGKILL, from the
last complete checkpoint it left. The training step checks the vocabulary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import kdlib  # noqa: E402
from kdlib.integrations.lightning import CacheDataModule, LightningCacheLoader  # noqa: E402
from tests.examples import EXAMPLES, load_example
from tests.cachefactory import make_synthetic_cache  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


def _example():
    return load_example("lightning_distill")


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    path, _ = make_synthetic_cache(tmp_path_factory.mktemp("pl") / "cache", num_sequences=24, seq_len=12, topk=4,
                                   vocab_size=64, shard_seqs=8, chunk_seqs=4, seed=3)
    return path


def _run(cache_path, out, *extra):
    argv = ["--cache", str(cache_path), "--out", str(out), "--workdir", str(out), "--batch-size", "4",
            "--layers", "1", "--d-model", "32", "--seed", "5", *extra]
    return _example().main(argv)


def test_checkpoint_resume_trains_on_the_uninterrupted_runs_batches(cache_path, tmp_path):
    full = _run(cache_path, tmp_path / "full", "--steps", "10")
    assert full["steps"] == 10 and len(full["sequences"]) == 10
    first_epoch = sorted(i for batch in full["sequences"][:6] for i in batch)
    assert first_epoch == list(range(24))  # 6 batches of 4: every sequence once in epoch 0

    saved = _run(cache_path, tmp_path / "saved", "--steps", "10", "--ckpt-every", "3")
    assert saved["sequences"] == full["sequences"] and saved["losses"] == full["losses"]
    names = [Path(p).name for p in saved["checkpoints"]]
    assert names == ["step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]
    checkpoint = torch.load(saved["checkpoints"][0], weights_only=False)
    assert checkpoint["CacheDataModule"]["train_loader"]["cursor"] == 12  # 3 batches of 4 consumed, not 4

    for step, ckpt in ((3, saved["checkpoints"][0]), (6, saved["checkpoints"][1])):
        resumed = _run(cache_path, tmp_path / f"resumed{step}", "--steps", "10", "--resume", ckpt)
        assert resumed["steps"] == 10
        assert resumed["sequences"] == full["sequences"][step:], step
        assert resumed["losses"] == full["losses"][step:], step  # weights and optimizer state restored too


def test_resume_after_sigkill(cache_path, tmp_path):
    """A run killed with SIGKILL (no clean shutdown) resumes from the checkpoint it left on the same batches."""
    out = tmp_path / "killed"
    argv = [sys.executable, str(EXAMPLES / "lightning_distill.py"), "--cache", str(cache_path), "--out", str(out),
            "--workdir", str(out), "--batch-size", "4", "--layers", "1", "--d-model", "32", "--seed", "5",
            "--steps", "1000", "--ckpt-every", "3"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)})
    try:
        deadline = time.monotonic() + 240
        while not (out / "ckpt" / "step=9.ckpt").exists():  # step=6.ckpt is complete once step=9's is begun
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its 9th step"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    full = _run(cache_path, tmp_path / "full", "--steps", "10")
    resumed = _run(cache_path, tmp_path / "resumed", "--steps", "10", "--resume", str(out / "ckpt" / "step=6.ckpt"))
    assert resumed["sequences"] == full["sequences"][6:]
    assert resumed["losses"] == full["losses"][6:]


def test_distill_module_checks_the_vocabulary(cache_path, tmp_path):
    from kdlib.integrations.lightning import DistillModule

    batch = next(iter(kdlib.make_loader(kdlib.open_cache(cache_path, decode_dir=tmp_path / "dec"), 4)))
    wrong = _example().tiny_gpt_student(72, 12, layers=1, d_model=32)  # the cache's teacher has 64
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 72 entries but the cache's teacher has 64"):
        DistillModule(wrong).training_step(batch, 0)
    padded = DistillModule(wrong, loss_kwargs={"allow_padded_vocab": True, "ce_weight": 0.1})
    assert torch.isfinite(padded.training_step(batch, 0))


def test_datamodule_state_round_trip_and_errors(cache_path, tmp_path):
    data = CacheDataModule(cache_path, 4, seed=1, open_kwargs={"decode_dir": tmp_path / "dec"})
    assert data.state_dict() == {}
    loader = data.train_dataloader()
    assert isinstance(loader, LightningCacheLoader) and len(loader) == 6
    batches = iter(loader)
    seen = [next(batches)["sample_indices"].tolist() for _ in range(2)]
    state = data.state_dict()
    assert state["train_loader"]["cursor"] == 8
    rest = [b["sample_indices"].tolist() for b in batches]
    assert len(rest) == 4 and len(loader) == 6  # Lightning's length: a whole epoch, wherever the cursor is
    # A fresh DataModule restored before its loader exists continues after the two batches.
    again = CacheDataModule(cache_path, 4, seed=1, open_kwargs={"decode_dir": tmp_path / "dec"})
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert [b["sample_indices"].tolist() for b in again.train_dataloader()] == rest
    assert seen  # (the first two are not repeated)
    batch = data.transfer_batch_to_device(next(iter(data.train_dataloader())), torch.device("meta"), 0)
    assert batch["input_ids"].dtype == torch.int64 and batch["teacher_vocab_size"].device.type == "cpu"
    with pytest.raises(ValueError, match="Lightning moves the batches"):
        CacheDataModule(cache_path, 4, loader_kwargs={"device": "cpu"})
    with pytest.raises(ValueError, match="saved on another cache"):
        other, _ = make_synthetic_cache(tmp_path / "other", num_sequences=24, seq_len=12, topk=4, vocab_size=64,
                                        shard_seqs=8, chunk_seqs=4, seed=9)
        moved = CacheDataModule(kdlib.open_cache(other), 4)
        moved.load_state_dict(state)
        moved.train_dataloader()
