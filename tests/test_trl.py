"""TRL: ``KDSFTTrainer`` through examples/trl_distill.py, from a cache directory and from a served URL.

A run checkpointed at step 3 and resumed trains on exactly the uninterrupted run's batches with the same
losses (5 batches per epoch, 6 steps: the resumed run crosses into the second epoch); the alignment check is
on by default; the errors say what to do.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("trl")

import kdlib  # noqa: E402
from tests.examples import load_example
from tests.cachefactory import make_synthetic_cache  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402
from tests.conftest import eventually

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


def _example():
    return load_example("trl_distill")


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    path, _ = make_synthetic_cache(tmp_path_factory.mktemp("trl") / "cache", num_sequences=20, seq_len=12, topk=4,
                                   vocab_size=64, shard_seqs=8, chunk_seqs=4, seed=4)
    return path


def _run(cache, out, *extra):
    return _example().main(["--cache", str(cache), "--out", str(out), "--workdir", str(out), "--batch-size", "4",
                            "--layers", "1", "--d-model", "32", *extra])


def test_checkpoint_resume_trains_on_the_uninterrupted_runs_batches(cache_path, tmp_path):
    full = _run(cache_path, tmp_path / "full", "--steps", "6", "--save-steps", "3")
    assert full["steps"] == 6 and len(full["sequences"]) == 6
    assert sorted(i for batch in full["sequences"][:5] for i in batch) == list(range(20))  # one epoch: all once
    resumed = _run(cache_path, tmp_path / "resumed", "--steps", "6", "--resume", str(tmp_path / "full" / "checkpoint-3"))
    assert resumed["steps"] == 6
    assert resumed["sequences"] == full["sequences"][3:]
    # (the log history of steps 1-3 comes back from the checkpoint; 4-6 are this run's): weights, optimizer and
    # sampler restored
    assert len(resumed["logged_losses"]) == 6 and resumed["logged_losses"][3:] == full["logged_losses"][3:]


def test_trains_from_a_served_url(cache_path, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_DECODE_DIR", str(tmp_path / "decoded"))
    (tmp_path / "server").mkdir()
    with ServerProcess([str(cache_path)], token_dir=tmp_path / "server") as server:
        result = _run(server.cache_url(cache_path.name), tmp_path / "url", "--steps", "2")
    assert result["steps"] == 2 and all(torch.isfinite(torch.tensor(result["logged_losses"])))
    assert eventually(lambda: any((tmp_path / "decoded").rglob("*.npy")))  # shards came over HTTP, decoded here


def test_alignment_check_is_on_and_errors_are_clear(cache_path, tmp_path):
    from trl import SFTConfig

    from kdlib.integrations.trl import KDSFTTrainer

    example = _example()
    cache = kdlib.open_cache(cache_path)
    tokenizer = example.placeholder_tokenizer(cache.vocab_size)

    def config(**kw):
        return SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", **kw)

    wrong = example.tiny_gpt_student(cache.vocab_size + 8, cache.seq_len, layers=1, d_model=32)
    trainer = KDSFTTrainer(model=wrong, args=config(), cache=cache, processing_class=tokenizer)
    assert trainer.args.remove_unused_columns is False and trainer.args.dataset_kwargs["skip_prepare_dataset"]
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 72 entries but the cache's teacher has 64"):
        trainer.train()
    student = example.tiny_gpt_student(cache.vocab_size, cache.seq_len, layers=1, d_model=32)
    with pytest.raises(ValueError, match=r"packing=True\) would concatenate cache rows"):
        KDSFTTrainer(model=student, args=config(packing=True), cache=cache, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass cache="):
        KDSFTTrainer(model=student, args=config(), tokenizer=tokenizer)
    with pytest.raises(TypeError, match="keyword arguments only"):
        KDSFTTrainer(student, config(), cache=cache)
