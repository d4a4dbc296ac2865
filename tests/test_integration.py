"""The training integrations end to end: plain loop (+ resume, + a real server URL), KDTrainer (+ its example),
accelerate with 2 gloo processes, the loader over a RemoteCache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdlib
from kdlib.integrations import distill_loss
from tests.examples import load_example
from tests.cachefactory import make_synthetic_cache
from tests.serverproc import ServerProcess
from tests.conftest import eventually

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _example(name: str):
    return load_example(name)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("integration")
    path, arrays = make_synthetic_cache(root / "cache", num_sequences=24, seq_len=16, topk=4, vocab_size=96,
                                        temperatures=(2.0,), shard_seqs=8, chunk_seqs=4, seed=2)
    return kdlib.open_cache(path, decode_dir=root / "decoded"), arrays


@pytest.fixture(scope="module")
def served_cache(small_cache, tmp_path_factory):
    """``small_cache`` served by a real ``kdcache serve`` subprocess; yields its URL."""
    cache, _ = small_cache
    with ServerProcess([str(cache.path)], token_dir=tmp_path_factory.mktemp("server")) as server:
        yield server.cache_url(cache.path.name)


def test_plain_loop_trains_and_resumes_without_repeats(tmp_path):
    train_plain = _example("train_plain")
    seen = tmp_path / "seen.jsonl"
    ckpt = tmp_path / "ckpt.pt"
    common = ["--workdir", str(tmp_path), "--batch-size", "8", "--seen-file", str(seen), "--checkpoint", str(ckpt)]
    first = train_plain.main(["--steps", "4", *common])
    second = train_plain.main(["--steps", "6", "--resume", "--num-workers", "1", *common])
    assert second["last_loss"] < first["first_loss"]  # it learns from the cache
    runs = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(runs[0]) == 32 and len(runs[1]) == 48
    all_seen = runs[0] + runs[1]
    # 96 sequences: 10 steps x 8 = 80 samples of epoch 0, none twice, across the restart.
    assert len(set(all_seen)) == 80
    assert second["loader_state"]["epoch"] == 0 and second["loader_state"]["cursor"] == 80


def test_distill_loss_raises_on_misaligned_tokens_and_vocab(small_cache):
    cache, _ = small_cache
    batch = next(iter(kdlib.make_loader(cache, 4)))
    logits = torch.randn(4, 16, 96, requires_grad=True)
    loss = distill_loss(logits, batch, ce_weight=0.5, temperature=2.0)
    direct = kdlib.kd_loss(logits, batch["topk_ids"], batch["topk_logprobs"], labels=batch["labels"],
                           ce_weight=0.5, temperature=2.0, teacher_lse=batch["lse"],
                           teacher_lse_at_temperature=batch["lse_t2"])
    torch.testing.assert_close(loss, direct)
    wrong = batch["input_ids"].long().clone()
    wrong[1, 7] = (wrong[1, 7] + 1) % 96
    with pytest.raises(kdlib.AlignmentError, match=r"1 of 64 positions; first at \(sequence 1, position 7\)"):
        distill_loss(logits, batch, student_input_ids=wrong)
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 128 entries but the cache's teacher has 96: "):
        distill_loss(torch.randn(4, 16, 128), batch)
    # A student embedding padded beyond the teacher's tokens passes when asked, and trains on the same targets.
    padded = torch.cat([logits.detach(), torch.full((4, 16, 32), -30.0)], dim=-1)
    torch.testing.assert_close(distill_loss(padded, batch, allow_padded_vocab=True, ce_weight=0.5, temperature=2.0),
                               direct.detach(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- kd_step_loss


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64))


@pytest.mark.parametrize("student", ["llama", "plain"])
def test_kd_step_loss_feeds_the_student_the_batch_s_own_tokens(small_cache, student):
    from kdlib.losses import kd_loss_from_batch
    from tests.teachers import TinyLM

    cache, _ = small_cache
    model = _tiny_llama(cache.vocab_size) if student == "llama" else TinyLM(cache.vocab_size)
    # 24 sequences, drop_last=False over 5 ranks x 4: rank 4's last batch is a padding row (labels ignored).
    batches = list(kdlib.make_loader(cache, 4, rank=4, world_size=5, seed=1, drop_last=False))
    for batch in (batches[0], batches[-1]):
        loss, logits = kdlib.kd_step_loss(model, batch, ce_weight=0.3, temperature=2.0)
        out = model(batch["input_ids"].long())
        expected_logits = out.logits if student == "llama" else out  # [B, T, V]
        torch.testing.assert_close(logits, expected_logits)
        torch.testing.assert_close(loss, kd_loss_from_batch(expected_logits, batch, ce_weight=0.3, temperature=2.0))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad()
    assert batches[-1]["sample_indices"].tolist() == [-1]  # the padding row was the case above
    # A batch straight from the cache (no labels): labels are the tokens shifted per the cache convention.
    raw = cache.read(0, 2)
    loss, logits = kdlib.kd_step_loss(model, raw, ce_weight=1.0, kd_weight=0.0)
    next_tokens = raw["input_ids"][:, 1:].long().flatten()
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), next_tokens)
    torch.testing.assert_close(loss, reference)


def test_kd_step_loss_refuses_what_it_cannot_align(small_cache):
    from tests.teachers import TinyLM

    cache, _ = small_cache
    batch = next(iter(kdlib.make_loader(cache, 2)))
    with pytest.raises(kdlib.AlignmentError, match="vocabulary has 128 entries but the cache's teacher has 96: "):
        kdlib.kd_step_loss(TinyLM(128), batch)
    loss, _ = kdlib.kd_step_loss(TinyLM(128), batch, allow_padded_vocab=True)  # asked for: passes
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="takes the labels from the batch"):
        kdlib.kd_step_loss(TinyLM(96), batch, labels=batch["labels"])
    with pytest.raises(ValueError, match="logits of shape"):
        kdlib.kd_step_loss(lambda ids: torch.zeros(ids.shape[0], 96), batch)
    with pytest.raises(TypeError, match="has no logits"):
        kdlib.kd_step_loss(lambda ids: {"hidden": ids}, batch)


def _trainer(reader, train_dataset, tmp_path, **kw):
    from transformers import TrainingArguments

    from kdlib.integrations.hf_trainer import KDTrainer

    vocab = kw.pop("student_vocab", reader.vocab_size)
    model = _example("_example_utils").tiny_gpt_student(vocab, reader.seq_len, layers=1, d_model=32)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=True, seed=0)
    return KDTrainer(model=model, args=args, train_dataset=train_dataset, kd_kwargs={"ce_weight": 0.2}, **kw)


def test_kd_trainer_uses_kd_loss_on_the_cache_batch(small_cache, tmp_path):
    from kdlib.losses import kd_loss_from_batch

    cache, _ = small_cache
    dataset = kdlib.CacheDataset(cache)
    trainer = _trainer(cache, dataset, tmp_path)
    assert trainer.args.remove_unused_columns is False  # forced, or the teacher columns would be dropped
    batch = trainer.data_collator(dataset.__getitems__([3, 1, 4, 1]))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logits = trainer.model(input_ids=batch["input_ids"].long()).logits
    torch.testing.assert_close(loss, kd_loss_from_batch(logits, batch, ce_weight=0.2))
    output = trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(output.training_loss))


def test_kd_trainer_padded_student_vocab_needs_the_option(small_cache, tmp_path):
    cache, _ = small_cache
    dataset = kdlib.CacheDataset(cache)
    batch = dict(_trainer(cache, dataset, tmp_path).data_collator(dataset.__getitems__([0, 1])))
    with pytest.raises(kdlib.AlignmentError, match="allow_padded_vocab=True"):
        trainer = _trainer(cache, dataset, tmp_path, student_vocab=cache.vocab_size + 32)
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    trainer = _trainer(cache, dataset, tmp_path, student_vocab=cache.vocab_size + 32, allow_padded_vocab=True)
    inputs = trainer._prepare_inputs(batch)
    assert inputs["teacher_vocab_size"].device.type == "cpu"  # read by the check without a device sync
    assert torch.isfinite(trainer.compute_loss(trainer.model, inputs))


def test_kd_trainer_lookup_assembles_the_loader_s_batch(small_cache, tmp_path):
    from kdlib.batch import move_batch, read_batch

    cache, arrays = small_cache
    trainer = _trainer(cache, kdlib.CacheDataset(cache), tmp_path, cache=cache)
    idx = [9, 2, 2, 14]
    inputs = {"input_ids": torch.from_numpy(arrays["input_ids"][idx]).long(), "sample_indices": torch.tensor(idx)}
    student, teacher, compare_tokens = trainer._teacher_batch(inputs, torch.device("cpu"))
    assert compare_tokens and set(student) == {"input_ids"}
    expected = move_batch(read_batch(cache, idx), "cpu")
    assert set(teacher) == set(expected)
    for key, value in expected.items():
        assert teacher[key].dtype == value.dtype and torch.equal(teacher[key], value), key


class _IndexedTokens(torch.utils.data.Dataset):
    """A user's own dataset: tokens plus the cache index of each row (optionally misaligned)."""

    def __init__(self, tokens: torch.Tensor, shift: int = 0) -> None:
        self.tokens, self.shift = tokens, shift

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[(i + self.shift) % len(self.tokens)].long(), "sample_indices": i}


def test_kd_trainer_looks_up_by_index_and_catches_misalignment(small_cache, tmp_path):
    cache, arrays = small_cache
    tokens = torch.from_numpy(arrays["input_ids"].astype("int64"))
    _trainer(cache, _IndexedTokens(tokens), tmp_path, cache=cache).train()
    with pytest.raises(kdlib.AlignmentError, match="student tokens differ"):
        _trainer(cache, _IndexedTokens(tokens, shift=1), tmp_path, cache=cache).train()


@pytest.mark.timeout(240)
def test_accelerate_two_cpu_processes_see_disjoint_parts(tmp_path):
    seen_dir = tmp_path / "seen"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KDCACHE_DECODE_DIR": str(tmp_path / "d")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(EXAMPLES / "train_accelerate.py"), "--workdir", str(tmp_path), "--seen-dir", str(seen_dir),
           "--batch-size", "4", "--epochs", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ranks = [json.loads((seen_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    a, b = (set(r["seen"]) for r in ranks)
    assert not a & b  # disjoint
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(96))  # 96 = 2 ranks x 4 x 12: no remainder
    assert ranks[0]["steps"] == ranks[1]["steps"] == 12
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)
    # DDP kept the replicas in sync: after 12 steps on different data, both ranks hold bit-identical parameters
    # (without the gradient all-reduce, each rank's own data would make them differ).
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]


# ----------------------------------------------------------------------------------------------- remote caches


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_over_a_remote_cache_covers_one_epoch(small_cache, served_cache, tmp_path, num_workers):
    import numpy as np

    _, arrays = small_cache
    remote = kdlib.open_cache(served_cache, decode_dir=tmp_path / "shards")
    assert type(remote).__name__ == "RemoteCache"
    loader = kdlib.make_loader(remote, 5, seed=3, num_workers=num_workers, drop_last=False)
    seen = []
    for batch in loader:
        idx = batch["sample_indices"].numpy()
        np.testing.assert_array_equal(batch["topk_ids"].numpy(), arrays["topk_ids"][idx])
        np.testing.assert_array_equal(batch["topk_logprobs"].numpy(), arrays["topk_logprobs"][idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(24))
    assert loader.epoch == 1 and loader.cursor == 0


def test_example_cache_keeps_urls_as_strings(tmp_path):
    example_cache = _example("_example_utils").example_cache
    url = "http://127.0.0.1:8000/v1/caches/my_cache"
    assert example_cache(url, tmp_path) == url
    assert example_cache("https://host/v1/caches/c", tmp_path) == "https://host/v1/caches/c"
    assert example_cache(str(tmp_path / "dir"), tmp_path) == tmp_path / "dir"


def test_plain_example_trains_from_a_server_url(served_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_DECODE_DIR", str(tmp_path / "decoded"))  # the example opens with defaults
    result = _example("train_plain").main(["--cache", served_cache, "--steps", "4", "--batch-size", "8",
                                           "--workdir", str(tmp_path)])
    assert result["steps"] == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["loader_state"]["epoch"] == 1 and result["loader_state"]["cursor"] == 8  # 24 = 3 steps/epoch
    # shards came over HTTP and were decoded locally (copies are written behind the reads)
    assert eventually(lambda: any((tmp_path / "decoded").rglob("*.npy")))


def test_hf_trainer_example_runs_two_steps(small_cache, tmp_path):
    cache, _ = small_cache
    result = _example("train_hf_trainer").main(["--cache", str(cache.path), "--steps", "2", "--batch-size", "4",
                                                "--workdir", str(tmp_path)])
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["train_loss"]))
