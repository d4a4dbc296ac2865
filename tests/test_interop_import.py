"""kdcache import / export: each peer's layout written here as that tool writes it, imported into a real cache,
read back with open_cache and the loss; the round trip kdcache -> axolotl -> kdcache; off-by-one detection.

Layouts (cited where each writer is):
* axolotl: axolotl-ai-cloud/axolotl src/axolotl/integrations/kd/chat_template.py (columns, -inf padding rows
  with ids 0..K-1 and mask 0, "current" alignment) and kernels/liger.py + collator_online_teacher.py ("next").
* DistillKit: arcee-ai/DistillKit distillkit/sample_common.py ``compressed_logit_schema`` (input_ids,
  compressed_logprobs, bytepacked_indices; L-1 positions), sample_logits_vllm.py (compression_config.yaml
  beside data_0.parquet), compression/*.py (the codec; ``distillkit_codec.py`` is checked against it).
* vLLM: ``RequestOutput.prompt_logprobs: list[dict[int, Logprob] | None]``, first entry None, each dict
  holding the top-k plus the prompt token; JSON object keys are strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cache_server import format as fmt
from cache_server.cli import main
from cache_server.interop import ExportOptions, ImportOptions, InteropError, export_cache, run_import
from cache_server.interop import distillkit_codec as codec

V, K, L, N = 300, 4, 17, 10


def _teacher(seed: int = 0, n: int = N, length: int = L, k: int = K):
    """Tokens [n, L], top-k ids [n, L, k] holding the next token first (a teacher that predicts well) and
    full-vocabulary log-probs [n, L, k] (descending, tail > 0)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (n, length))
    ids = np.stack([np.stack([rng.choice(V, k, replace=False) for _ in range(length)]) for _ in range(n)])
    for r in range(n):
        for t in range(length - 1):
            row = [x[r, t + 1]] + [i for i in ids[r, t] if i != x[r, t + 1]][: k - 1]
            ids[r, t] = row
    probs = np.sort(rng.dirichlet(np.ones(k + 2), size=(n, length))[..., :k], axis=-1)[..., ::-1]
    return x, ids, np.log(probs).astype(np.float32)


def _import(tmp_path, src, kind, name="cache", **kw):
    opts = ImportOptions(src=str(src), kind=kind, out=str(tmp_path / name), vocab_size=kw.pop("vocab_size", V),
                         shard_seqs=4, chunk_seqs=2, progress=False, **kw)
    return run_import(opts, log=lambda _: None)


def _axolotl_file(path, x, ids, lp, *, current=False):
    """axolotl's dataset columns; ``current``: its dataset strategy's convention (row t = token t, row 0 padding)."""
    n, length, k = ids.shape
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))  # axolotl renormalizes over the k ids
    if current:
        ids = np.concatenate([np.broadcast_to(np.arange(k), (n, 1, k)), ids[:, :-1]], axis=1)
        lp = np.concatenate([np.full((n, 1, k), -np.inf, np.float32), lp[:, :-1]], axis=1)
    mask = np.ones((n, length, k), np.int64)
    mask[:, 0 if current else -1] = 0
    pq.write_table(pa.table({"input_ids": x.tolist(), "labels": x.tolist(), "attention_mask": np.ones_like(x).tolist(),
                             "target_token_ids": ids.tolist(), "target_logprobs": lp.astype(np.float64).tolist(),
                             "target_mask": mask.tolist()}), path)


def test_round_trip_kdcache_axolotl_kdcache_is_fp16_exact(tmp_path):
    x, ids, lp = _teacher()
    pq.write_table(pa.table({"input_ids": x.tolist(), "topk_ids": ids.tolist(), "topk_logprobs": lp.tolist()}),
                   tmp_path / "src.parquet")
    first = _import(tmp_path, tmp_path / "src.parquet", "parquet", "c1")
    assert first.manifest["provenance"]["tail"] == "implied"
    assert main(["export", str(tmp_path / "c1"), "--to", "axolotl", "--out", str(tmp_path / "ax.parquet"),
                 "--no-progress"]) == 0
    table = pq.read_table(tmp_path / "ax.parquet")
    assert {"input_ids", "labels", "attention_mask", "target_token_ids", "target_logprobs", "target_mask"} <= set(
        table.column_names)
    second = _import(tmp_path, tmp_path / "ax.parquet", "axolotl", "c2")
    import kdlib

    a, b = kdlib.open_cache(str(tmp_path / "c1")), kdlib.open_cache(str(tmp_path / "c2"))
    ra, rb = a.read(0, N), b.read(0, N)
    for key in ("input_ids", "topk_ids", "topk_logprobs"):
        assert torch.equal(ra[key], rb[key]), key
    assert second.manifest["provenance"]["filled_positions"] == 0
    assert main(["verify", str(tmp_path / "c2")]) == 0
    batch = next(iter(kdlib.make_loader(str(tmp_path / "c2"), batch_size=4, seed=0)))
    loss = kdlib.kd_loss_from_batch(torch.randn(4, L, V, requires_grad=True), batch)  # tail "implied": bucket is fine
    assert torch.isfinite(loss)


def test_parquet_export_reimports_exactly_with_the_lse(tmp_path):
    x, ids, lp = _teacher(1)
    lse = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    pq.write_table(pa.table({"input_ids": x.tolist(), "topk_ids": ids.tolist(), "topk_logprobs": lp.tolist(),
                             "teacher_lse": lse.tolist()}), tmp_path / "src.parquet")
    first = _import(tmp_path, tmp_path / "src.parquet", "parquet", "c1", logprob_dtype="float32")
    assert first.manifest["provenance"]["tail"] == "exact"
    export_cache(ExportOptions(cache=str(tmp_path / "c1"), to="parquet", out=str(tmp_path / "out.parquet"),
                               progress=False), log=lambda _: None)
    second = _import(tmp_path, tmp_path / "out.parquet", "parquet", "c2", vocab_size=None, logprob_dtype="float32")
    assert second.manifest["vocab_size"] == V  # from the export's schema metadata
    for name in ("input_ids", "topk_ids", "topk_logprobs", "lse"):
        assert first.manifest["shards"][name] == second.manifest["shards"][name], name


def test_axolotl_current_alignment_is_detected_and_imported(tmp_path):
    x, ids, lp = _teacher(2)
    _axolotl_file(tmp_path / "legacy.parquet", x, ids, lp, current=True)
    with pytest.raises(InteropError, match=r"off by -1.*--alignment current"):
        _import(tmp_path, tmp_path / "legacy.parquet", "axolotl")
    result = _import(tmp_path, tmp_path / "legacy.parquet", "axolotl", alignment="current")
    prov = result.manifest["provenance"]
    assert prov["tail"] == "none" and prov["alignment"] == "current"
    assert prov["filled_positions"] == N  # the last position of each row has no data in this convention
    import kdlib
    from kdlib.batch import read_batch

    batch = read_batch(kdlib.open_cache(str(tmp_path / "cache")), np.arange(N))
    assert torch.equal(batch["topk_ids"][:, :-1].long(), torch.as_tensor(ids[:, :-1]).long())
    logits = torch.randn(N, L, V)
    with pytest.raises(ValueError, match="tail='bucket'.*renormalize"):
        kdlib.kd_loss_from_batch(logits, batch)
    assert torch.isfinite(kdlib.kd_loss_from_batch(logits, batch, tail="renormalize"))


def _distillkit_dir(path, x, ids, lp, config: codec.CodecConfig):
    """DistillKit's output directory: data_0.parquet (L-1 positions per row) + compression_config.yaml."""
    import yaml

    path.mkdir()
    n, length, k = ids.shape
    bits = codec.index_bits(config.d)
    values = codec.encode_logprobs(lp[:, :-1].reshape(-1, k), config).reshape(n, length - 1, -1)
    packed = codec.pack_bits(ids[:, :-1].reshape(-1, k), bits).reshape(n, length - 1, -1)
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.uint64())),
                        pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    pq.write_table(pa.table({"input_ids": x.tolist(), "compressed_logprobs": values.tolist(),
                             "bytepacked_indices": packed.tolist()}, schema=schema), path / "data_0.parquet")
    raw = {"d": config.d, "k": config.k, "exact_k": config.exact_k, "exact_dtype": config.exact_dtype,
           "polynomial_terms": list(config.polynomial_terms), "term_dtype": config.term_dtype,
           "residual_bins": [{"scale_dtype": s, "element_bits": b, "num_elements": c}
                             for s, b, c in config.residual_bins],
           "delta_encoding": config.delta_encoding, "error_diffusion": False, "normalize_t": False}
    (path / "compression_config.yaml").write_text(yaml.safe_dump(raw))


def test_distillkit_import_decodes_its_codec(tmp_path):
    k = 16
    x, ids, lp = _teacher(3, k=k)
    config = codec.CodecConfig(d=V, k=k, exact_k=4, exact_dtype="bfloat16", polynomial_terms=(0, 1, "sqrt"),
                               residual_bins=(("float16", 4, 12),), delta_encoding=False)
    _distillkit_dir(tmp_path / "dk", x, ids, lp, config)
    result = _import(tmp_path, tmp_path / "dk", "distillkit", vocab_size=None, logprob_dtype="float32")
    assert result.manifest["vocab_size"] == V and result.manifest["provenance"]["codec_error"].startswith("lossy")
    import kdlib

    got = kdlib.open_cache(str(tmp_path / "cache")).read(0, N)
    got_ids, got_lp = got["topk_ids"][:, :-1].numpy(), got["topk_logprobs"][:, :-1].numpy()
    mine, ref = np.argsort(got_ids, -1), np.argsort(ids[:, :-1], -1)  # lossy values may reorder near-ties
    assert np.array_equal(np.take_along_axis(got_ids, mine, -1), np.take_along_axis(ids[:, :-1], ref, -1))
    error = np.take_along_axis(got_lp, mine, -1) - np.take_along_axis(lp[:, :-1], ref, -1)
    assert np.abs(error).max() < 0.5  # bfloat16 exact part, polynomial + 4-bit residuals
    assert np.abs(got_lp[..., 0] - lp[:, :-1, 0]).max() < 0.02  # the head: bfloat16


def test_distillkit_codec_bit_packing_is_msb_first():
    packed = codec.pack_bits(np.array([[5, 1]]), 3)  # 101 001 -> 10100100
    assert packed.tolist() == [[0b10100100]]
    assert codec.unpack_bits(packed, 3, 2).tolist() == [[5, 1]]
    config = codec.CodecConfig(d=V, k=8, exact_k=2, polynomial_terms=(0, 1), residual_bins=(("float32", 8, 6),))
    with pytest.raises(ValueError, match="bytes per position"):
        codec.decode_logprobs(np.zeros((1, config.logprob_bytes() + 1), np.uint8), config)


def _vllm_lines(x, ids, lp, *, shift=0):
    """One RequestOutput per line: prompt_logprobs[i] = {id: Logprob} for token i (+ the prompt token itself)."""
    lines = []
    for r in range(x.shape[0]):
        entries = [None]
        for i in range(1, x.shape[1]):
            t = i - 1 + shift
            entry = {str(int(a)): {"logprob": float(b), "rank": j + 1, "decoded_token": f"t{a}"}
                     for j, (a, b) in enumerate(zip(ids[r, t], lp[r, t]))} if 0 <= t < x.shape[1] else {}
            if str(int(x[r, i])) not in entry and shift == 0:
                entry[str(int(x[r, i]))] = {"logprob": -20.0, "rank": 999, "decoded_token": "x"}
            entries.append(entry or None)
        lines.append(json.dumps({"prompt_token_ids": x[r].tolist(), "prompt_logprobs": entries}))
    return "\n".join(lines) + "\n"


def test_vllm_prompt_logprobs_import(tmp_path):
    x, ids, lp = _teacher(4)
    (tmp_path / "dump.jsonl").write_text(_vllm_lines(x, ids, lp))
    result = _import(tmp_path, tmp_path / "dump.jsonl", "vllm-prompt-logprobs", logprob_dtype="float32")
    prov = result.manifest["provenance"]
    assert result.manifest["topk"] == K and prov["tail"] == "implied" and prov["filled_positions"] == N
    import kdlib

    got = kdlib.open_cache(str(tmp_path / "cache")).read(0, N)
    assert torch.equal(got["topk_ids"][:, :-1].long(), torch.as_tensor(ids[:, :-1]).long())
    assert np.allclose(got["topk_logprobs"][:, :-1].numpy(), lp[:, :-1])
    assert (got["topk_ids"][:, -1, 0] == 0).all() and (got["topk_logprobs"][:, -1, 0] == 0).all()  # filled


def test_vllm_dump_whose_tokens_are_shifted_is_refused(tmp_path):
    x, ids, lp = _teacher(5)
    (tmp_path / "dump.jsonl").write_text(_vllm_lines(x, ids, lp, shift=1))  # entry i holds token i+1's targets
    with pytest.raises(InteropError, match=r"off by \+1"):
        _import(tmp_path, tmp_path / "dump.jsonl", "vllm-prompt-logprobs")


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    x, ids, lp = _teacher(6)
    pq.write_table(pa.table({"input_ids": x.tolist(), "topk_ids": ids.tolist()}), tmp_path / "nolp.parquet")
    assert main(["import", str(tmp_path / "nolp.parquet"), "--from", "parquet", "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 2
    assert "no column 'topk_logprobs'" in capsys.readouterr().err
    pq.write_table(pa.table({"input_ids": x.tolist(), "topk_ids": ids.tolist(), "topk_logprobs": lp.tolist()}),
                   tmp_path / "ok.parquet")
    with pytest.raises(InteropError, match="outside --vocab-size 10"):
        _import(tmp_path, tmp_path / "ok.parquet", "parquet", vocab_size=10)
    with pytest.raises(InteropError, match="no row .* has 99 tokens"):
        _import(tmp_path, tmp_path / "ok.parquet", "parquet", seq_len=99)
    (tmp_path / "dump.jsonl").write_text('{"prompt_token_ids": [1, 2]}\n')
    with pytest.raises(InteropError, match="no 'prompt_logprobs'"):
        _import(tmp_path, tmp_path / "dump.jsonl", "vllm-prompt-logprobs")
    (tmp_path / "dk").mkdir()
    pq.write_table(pa.table({"input_ids": x.tolist(), "compressed_logprobs": [[[0]]] * N,
                             "bytepacked_indices": [[[0]]] * N}), tmp_path / "dk" / "data_0.parquet")
    with pytest.raises(InteropError, match="--compression-config"):
        _import(tmp_path, tmp_path / "dk", "distillkit")


def test_shorter_rows_are_dropped_and_counted_and_a_rerun_is_a_no_op(tmp_path):
    x, ids, lp = _teacher(7)
    rows = [(x[r, : L - (r % 3)], ids[r, : L - (r % 3)], lp[r, : L - (r % 3)]) for r in range(N)]
    pq.write_table(pa.table({"input_ids": [a.tolist() for a, _, _ in rows],
                             "topk_ids": [b.tolist() for _, b, _ in rows],
                             "topk_logprobs": [c.tolist() for _, _, c in rows]}), tmp_path / "var.parquet")
    result = _import(tmp_path, tmp_path / "var.parquet", "parquet", seq_len=L - 1)
    data = result.manifest["dataset"]
    assert (data["rows_used"], data["rows_too_short"]) == (sum(1 for r in range(N) if r % 3 < 2),
                                                           sum(1 for r in range(N) if r % 3 == 2))
    assert _import(tmp_path, tmp_path / "var.parquet", "parquet", seq_len=L - 1).status == "already_complete"
    assert fmt.teacher_tail(result.manifest) == "implied"


def test_distillkit_codec_decodes_bytes_written_by_distillkit_itself():
    """tests/fixtures/distillkit_codec.json: bytes from DistillKit's own LogprobCompressor (see its "source")."""
    cases = json.loads((Path(__file__).parent / "fixtures" / "distillkit_codec.json").read_text())["cases"]
    for case in cases:
        config = codec.CodecConfig.from_dict(case["config"])
        values = codec.decode_logprobs(np.array(case["compressed_logprobs"], np.uint8), config)
        ids = codec.unpack_bits(np.array(case["bytepacked_indices"], np.uint8), codec.index_bits(config.d), config.k)
        assert ids.tolist() == case["ids"]
        assert np.allclose(values, np.array(case["logprobs"], np.float32), rtol=0, atol=1e-5)
        assert np.array_equal(codec.pack_bits(np.array(case["ids"]), codec.index_bits(config.d)),
                              np.array(case["bytepacked_indices"], np.uint8))


def test_axolotl_datasets_save_to_disk_directory(tmp_path):
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow stream shards listed in state.json."""
    x, ids, lp = _teacher(8)
    _axolotl_file(tmp_path / "tmp.parquet", x, ids, lp)
    table = pq.read_table(tmp_path / "tmp.parquet")
    ds = tmp_path / "ds"
    ds.mkdir()
    with pa.ipc.new_stream(ds / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                               "_fingerprint": "0", "_format_type": None, "_split": None}))
    (ds / "dataset_info.json").write_text("{}")
    result = _import(tmp_path, ds, "axolotl")
    assert result.manifest["provenance"]["tail"] == "none" and result.manifest["num_sequences"] == N


def test_vllm_completions_response_lines(tmp_path):
    """``vllm serve`` /v1/completions with "prompt_logprobs": k and "return_token_ids": true, one per line."""
    x, ids, lp = _teacher(9)
    lines = [json.loads(line) for line in _vllm_lines(x, ids, lp).splitlines()]
    wrapped = [{"id": f"cmpl-{r}", "object": "text_completion", "choices": [
        {"index": 0, "text": "", "prompt_logprobs": line["prompt_logprobs"],
         "prompt_token_ids": line["prompt_token_ids"]}]} for r, line in enumerate(lines)]
    (tmp_path / "resp.jsonl").write_text("".join(json.dumps(w) + "\n" for w in wrapped))
    result = _import(tmp_path, tmp_path / "resp.jsonl", "vllm-prompt-logprobs")
    assert result.manifest["num_sequences"] == N and result.manifest["topk"] == K


@pytest.mark.parametrize("command", ["import", "export"])
def test_help_is_plain_text_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and text.startswith(f"usage: kdcache {command}")
    for markup in ("::", "``", "`", "cache_server.", ":func:", ":class:"):
        assert markup not in text, markup
    assert f"kdcache {command} " in text.split("examples:", 1)[1]
