"""`kdcache build` round trips against a direct torch computation, for every data format and teacher kind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache_server import format as fmt
from cache_server.format import slots
from cache_server.build.job import run_build
from cache_server.build.options import BuildOptions
from cache_server.cli import main
from tests.teachers import (
    TinyLM,
    load_llama_teacher,
    make_llama_teacher,
    reference_targets,
    save_factory_teacher,
    stdlib_documents,
    train_tokenizer,
    write_token_file,
)

T = 13  # not a multiple of anything
K = 5
TEMPS = (0.5, 2.0)


@pytest.fixture(scope="module")
def teacher300(tmp_path_factory):
    """V=300 Llama with its own trained tokenizer (so text data works without --tokenizer)."""
    root = tmp_path_factory.mktemp("t300")
    tok = train_tokenizer(root / "tok", vocab_size=300)
    path = make_llama_teacher(root / "teacher", 300, seed=1, logit_scale=20.0, tokenizer_dir=tok)
    return path, load_llama_teacher(path)


@pytest.fixture(scope="module")
def teacher50(tmp_path_factory):
    path = make_llama_teacher(tmp_path_factory.mktemp("t50") / "teacher", 50, seed=2, logit_scale=20.0)
    return path, load_llama_teacher(path)


def build(*args) -> int:
    return main(["build", "--no-progress", *map(str, args)])


def read_cache(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read every array with zarr AND with format.decode_shard; they must agree exactly (zarr reads the stored
    form: format v2 slots by ascending id, which slots.canonicalize puts in the decoded order)."""
    manifest = fmt.load_manifest(out)
    layout = fmt.layout_from_manifest(manifest)
    group = zarr.open_group(str(out), mode="r")
    via_zarr = slots.canonicalize(layout, {spec.name: group[spec.name][:] for spec in layout.arrays()})
    arrays = {}
    for spec in layout.arrays():
        parts = []
        for i in range(layout.num_shards):
            raws = {name: (out / fmt.shard_relpath(name, i, 1 + len(spec.trailing_shape))).read_bytes()
                    for name in fmt.decode_inputs(layout, spec.name)}
            parts.append(fmt.decode_shard(raws[spec.name], spec, layout, i, companions=raws))
        via_decode = np.concatenate(parts)
        assert via_decode.dtype == spec.dtype
        np.testing.assert_array_equal(via_decode, via_zarr[spec.name])
        arrays[spec.name] = via_decode
    return manifest, arrays


def check_against_reference(out: Path, model, topk: int, temps=(), expected_ids=None) -> dict:
    manifest, arrays = read_cache(out)
    ids = torch.from_numpy(arrays["input_ids"].astype(np.int64))  # [N, T]
    if expected_ids is not None:
        np.testing.assert_array_equal(arrays["input_ids"], expected_ids)
    with torch.inference_mode():
        logits = model(ids) if isinstance(model, TinyLM) else model(input_ids=ids).logits
    ref = reference_targets(logits, ids, topk, temps)
    stored_lp = arrays["topk_logprobs"].astype(np.float32)  # [N, T, K]
    tol = 2e-3 if arrays["topk_logprobs"].dtype == np.float16 else 2e-5
    # 1) the stored values are the true top-k values, sorted descending
    np.testing.assert_allclose(stored_lp, ref["topk_logprobs"], rtol=tol, atol=tol)
    assert (np.diff(stored_lp, axis=-1) <= 0).all()
    # 2) stored ids are distinct and carry exactly those logprobs (so ties may come in any order)
    stored_ids = arrays["topk_ids"].astype(np.int64)
    assert (np.diff(np.sort(stored_ids, axis=-1), axis=-1) != 0).all()
    np.testing.assert_allclose(stored_lp, np.take_along_axis(ref["logprobs"], stored_ids, -1), rtol=tol, atol=tol)
    # 3) where the reference has no near-tie, the ids match exactly
    clear = np.ones(stored_ids.shape[:2], bool)
    if topk < ref["logprobs"].shape[-1]:
        srt = -np.sort(-ref["logprobs"], axis=-1)[..., : topk + 1]
        clear = -np.diff(srt[..., topk - 1 :], axis=-1)[..., 0] > 1e-3  # the top-k set itself is clear
    # Format v2 decodes in canonical order: descending stored value, values the stored dtype rounds to equal by
    # ascending id. So a pair is decided either by a clear fp32 gap or by being equal once rounded.
    ref_rounded = ref["topk_logprobs"].astype(arrays["topk_logprobs"].dtype)
    ref_ids = np.take_along_axis(ref["topk_ids"], slots.canonical_order(
        ref["topk_ids"].reshape(-1, topk), ref_rounded.reshape(-1, topk)).reshape(ref_rounded.shape), -1)
    rounded_equal = np.diff(ref_rounded.astype(np.float32), axis=-1) == 0
    clear &= ((-np.diff(ref["topk_logprobs"], axis=-1) > 1e-3) | rounded_equal).all(-1)
    assert clear.mean() > 0.5, "teacher too flat: the exact-id check would test little"
    np.testing.assert_array_equal(stored_ids[clear], ref_ids[clear])
    for name in ["lse", "seq_nll", "seq_entropy", *(fmt.temperature_key(t) for t in temps)]:
        np.testing.assert_allclose(arrays[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    return manifest


@pytest.mark.parametrize("kind", ["npy-1d", "npy-2d", "bin-uint16", "parquet", "arrow", "hf-dataset", "parquet-2d"])
def test_round_trip_data_formats(tmp_path, teacher300, kind):
    path, model = teacher300
    stream = np.random.default_rng(3).integers(0, 300, size=9 * T + 4)
    two_d = kind.endswith("-2d")
    ids = stream[: 9 * T].reshape(9, T) if two_d else stream
    base = kind.replace("-1d", "").replace("-2d", "")
    suffix = {"npy": ".npy", "parquet": ".parquet", "arrow": ".arrow", "hf-dataset": "", "bin-uint16": ".bin"}[base]
    data = write_token_file(tmp_path / f"data{suffix}", ids, base)
    extra = ["--data-dtype", "uint16"] if base == "bin-uint16" else []
    rc = build("--teacher", path, "--data", data, "--topk", K, "--seq-len", T, "--out", tmp_path / "c",
               "--temperatures", "1,2,0.5", "--batch-size", 2, "--shard-seqs", 4, "--chunk-seqs", 2, *extra)
    assert rc == 0
    manifest = check_against_reference(tmp_path / "c", model, K, TEMPS, expected_ids=stream[: 9 * T].reshape(9, T))
    ds = manifest["dataset"]
    assert ds["tokens_used"] == 9 * T and ds["remainder_tokens_dropped"] == (0 if two_d else 4)
    assert ds["tokens_total"] == ids.size and ds["fingerprint"].startswith("sha256:")
    assert manifest["num_shards"] == 3 and manifest["temperatures"] == [0.5, 2.0]
    assert manifest["teacher"]["architecture"] == "LlamaForCausalLM"
    weights = (Path(path) / "model.safetensors").read_bytes()
    assert manifest["teacher"]["weights_sha256"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    tok_sha = hashlib.sha256((Path(path) / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["fingerprint"] == "sha256:" + tok_sha


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_round_trip_text_with_trained_tokenizer(tmp_path, teacher300, kind):
    path, model = teacher300
    docs = stdlib_documents(max_files=4, max_chars=6_000)
    data = tmp_path / f"docs.{kind}"
    if kind == "txt":
        data.write_text(docs[0])
    else:
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rc = build("--teacher", path, "--data", data, "--tokenizer", path, "--topk", K, "--seq-len", T,
               "--out", tmp_path / "c", "--max-sequences", 20, "--batch-size", 3)
    assert rc == 0
    manifest = check_against_reference(tmp_path / "c", model, K)
    assert manifest["dataset"]["format"] == kind and manifest["num_sequences"] == 20
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    first = tok.encode(docs[0], add_special_tokens=False).ids[: 20 * T]
    _, arrays = read_cache(tmp_path / "c")
    np.testing.assert_array_equal(arrays["input_ids"].ravel()[: len(first)], first)


@pytest.mark.parametrize("mode", ["file", "blank-line", "line"])
def test_cached_text_ids_are_documents_joined_by_eos(tmp_path, teacher300, mode):
    """The cache's input_ids are exactly encode(doc_1) + [EOS] + encode(doc_2) + ..., cut into sequences."""
    path, _ = teacher300
    text = stdlib_documents(max_files=1, max_chars=2_500)[0][:2_500]
    (tmp_path / "docs.txt").write_text(text)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    if mode == "file":
        docs = [text]
    elif mode == "line":
        docs = [line for line in text.split("\n") if line.strip()]
    else:
        docs = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
        assert all(line.strip() or not line for line in text.split("\n"))  # blank lines are empty here
    expected = []
    for i, doc in enumerate(docs):
        expected += ([eos] if i else []) + tok.encode(doc, add_special_tokens=False).ids
    rc = build("--teacher", path, "--data", tmp_path / "docs.txt", "--topk", K, "--seq-len", T,
               "--text-documents", mode, "--out", tmp_path / "c", "--batch-size", 16)
    assert rc == 0
    manifest, arrays = read_cache(tmp_path / "c")
    n = len(expected) // T
    np.testing.assert_array_equal(arrays["input_ids"].ravel(), np.asarray(expected[: n * T]))
    assert manifest["dataset"]["documents"] == len(docs) and manifest["dataset"]["text_documents"] == mode
    assert manifest["dataset"]["remainder_tokens_dropped"] == len(expected) - n * T


@pytest.mark.parametrize("topk,logprob_dtype", [(1, "float16"), (50, "float32"), (50, "float16")])
def test_k1_and_k_equals_vocab(tmp_path, teacher50, topk, logprob_dtype):
    path, model = teacher50
    ids = np.random.default_rng(4).integers(0, 50, size=(6, T))
    np.save(tmp_path / "rows.npy", ids)
    rc = build("--teacher", path, "--data", tmp_path / "rows.npy", "--topk", topk, "--seq-len", T,
               "--out", tmp_path / "c", "--logprob-dtype", logprob_dtype, "--temperatures", "4")
    assert rc == 0
    check_against_reference(tmp_path / "c", model, topk, (4.0,), expected_ids=ids)
    if topk == 50 and logprob_dtype == "float32":
        _, arrays = read_cache(tmp_path / "c")
        # k = V: the whole distribution is stored, tail mass ~ 0
        np.testing.assert_allclose(np.exp(arrays["topk_logprobs"].astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_uint32_ids_for_vocab_above_65536(tmp_path):
    path = make_llama_teacher(tmp_path / "teacher", 70_000, hidden_size=16, num_layers=1, seed=5, logit_scale=50.0)
    model = load_llama_teacher(path)
    rng = np.random.default_rng(5)
    stream = rng.integers(60_000, 70_000, size=5 * T + 3).astype(np.uint32)  # ids above uint16
    write_token_file(tmp_path / "d.bin", stream, "bin-uint32")
    rc = build("--teacher", path, "--data", tmp_path / "d.bin", "--data-dtype", "uint32", "--topk", 8,
               "--seq-len", T, "--out", tmp_path / "c", "--batch-size", 2)
    assert rc == 0
    manifest = check_against_reference(tmp_path / "c", model, 8, expected_ids=stream[: 5 * T].reshape(5, T))
    assert manifest["arrays"]["topk_ids"]["dtype"] == "uint32" and manifest["arrays"]["input_ids"]["dtype"] == "uint32"
    assert manifest["dataset"]["remainder_tokens_dropped"] == 3


def test_bfloat16_teacher_matches_bf16_reference(tmp_path, teacher50):
    path, _ = teacher50
    ids = np.random.default_rng(6).integers(0, 50, size=4 * T)
    np.save(tmp_path / "s.npy", ids)
    assert build("--teacher", path, "--data", tmp_path / "s.npy", "--topk", 4, "--seq-len", T,
                 "--out", tmp_path / "c", "--dtype", "bfloat16", "--batch-size", 4) == 0
    manifest = check_against_reference(tmp_path / "c", load_llama_teacher(path, torch.bfloat16), 4)
    assert manifest["build_args"]["compute_dtype"] == "bfloat16" and manifest["teacher"]["dtype"] == "bfloat16"


def test_safetensors_state_dict_with_model_factory(tmp_path):
    weights = save_factory_teacher(tmp_path / "tiny.safetensors", seed=7)
    ids = np.random.default_rng(7).integers(0, 50, size=7 * T)
    np.save(tmp_path / "s.npy", ids)
    assert build("--teacher", weights, "--model-factory", "tests.teachers:tiny_lm_factory", "--data",
                 tmp_path / "s.npy", "--topk", 3, "--seq-len", T, "--out", tmp_path / "c",
                 "--temperatures", "2") == 0
    from safetensors.torch import load_file

    model = TinyLM()
    model.load_state_dict(load_file(str(weights)))
    manifest = check_against_reference(tmp_path / "c", model.eval(), 3, (2.0,))
    assert manifest["teacher"]["factory"] == "tests.teachers:tiny_lm_factory"
    assert manifest["teacher"]["architecture"].endswith("TinyLM")


def test_multi_rank_build_equals_single_process(tmp_path, teacher50):
    path, _ = teacher50
    np.save(tmp_path / "s.npy", np.random.default_rng(8).integers(0, 50, size=10 * T))
    common = dict(teacher=str(path), data=str(tmp_path / "s.npy"), topk=4, seq_len=T, shard_seqs=2,
                  chunk_seqs=1, progress=False)
    single = run_build(BuildOptions(out=str(tmp_path / "single"), **common), log=lambda s: None)
    logs: list[str] = []
    r0 = run_build(BuildOptions(out=str(tmp_path / "multi"), rank=0, world_size=2, **common), log=logs.append)
    assert r0.status == "waiting_for_ranks" and r0.missing_shards == [1, 3]
    assert not (tmp_path / "multi" / fmt.MANIFEST_NAME).exists() and "still missing" in logs[-1]
    r1 = run_build(BuildOptions(out=str(tmp_path / "multi"), rank=1, world_size=2, **common), log=logs.append)
    assert r1.status == "complete" and r1.shards_written == 2
    m_single, m_multi = fmt.load_manifest(tmp_path / "single"), fmt.load_manifest(tmp_path / "multi")
    assert m_single["shards"] == m_multi["shards"]  # every shard file's sha256 and size
    assert single.status == "complete"
