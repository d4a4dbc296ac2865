"""Format v1: exact manifest bytes, zarr interoperability, our decoder vs zarr, refusal of bad manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_server import format as fmt
from cache_server.build.writer import BuildStateError, CacheWriter
from tests.cachefactory import make_synthetic_cache, synthetic_arrays

GOLDEN = Path(__file__).parent / "golden" / "tiny_manifest.json"


def _tiny_cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")  # 2026-01-01T00:00:00Z
    # codec "none": the pinned shard checksums then depend on our layout only, not on a compressor's version.
    out, _ = make_synthetic_cache(
        tmp_path / "tiny", num_sequences=5, seq_len=3, topk=2, vocab_size=11, temperatures=(2.0,),
        shard_seqs=4, chunk_seqs=2, seed=7, codec="none",
    )
    return out


def test_manifest_exact_bytes(tmp_path, monkeypatch):
    out = _tiny_cache(tmp_path, monkeypatch)
    got = (out / fmt.MANIFEST_NAME).read_bytes()
    if os.environ.get("KDCACHE_REGEN_GOLDEN") == "1":  # after a reviewed format change (bump the version!)
        GOLDEN.write_bytes(got)
    assert got == GOLDEN.read_bytes(), "manifest bytes changed: a format change needs a version bump + FORMAT.md"


def test_manifest_is_canonical_json(tmp_path, monkeypatch):
    out = _tiny_cache(tmp_path, monkeypatch)
    raw = (out / fmt.MANIFEST_NAME).read_bytes()
    assert raw == fmt.manifest_bytes(json.loads(raw))
    manifest = fmt.load_manifest(out)
    assert manifest["format_version"] == fmt.FORMAT_VERSION
    assert manifest["arrays"]["topk_ids"] == {"shape": [5, 3, 2], "dtype": "uint16"}
    assert manifest["arrays"]["lse_t2"] == {"shape": [5, 3], "dtype": "float32"}
    assert manifest["created_at"] == "2026-01-01T00:00:00+00:00"
    assert len(manifest["shards"]["topk_ids"]) == 2


@pytest.mark.parametrize("vocab_size,dtype", [(11, "uint16"), (65536, "uint16"), (65537, "uint32"), (151936, "uint32")])
def test_ids_dtype(vocab_size, dtype):
    assert fmt.ids_dtype_for_vocab(vocab_size) == np.dtype(dtype)


def test_zarr_reads_what_we_write_and_our_decoder_agrees(tmp_path):
    out, arrays = make_synthetic_cache(
        tmp_path / "c", num_sequences=23, seq_len=13, topk=5, vocab_size=70000, temperatures=(0.5, 4.0),
        shard_seqs=8, chunk_seqs=4,
    )
    manifest = fmt.load_manifest(out)
    layout = fmt.layout_from_manifest(manifest)
    group = zarr.open_group(str(out), mode="r")
    for spec in layout.arrays():
        np.testing.assert_array_equal(group[spec.name][:], arrays[spec.name])
        for i in range(layout.num_shards):
            a, b = layout.shard_range(i)
            path = out / fmt.shard_relpath(spec.name, i, 1 + len(spec.trailing_shape))
            decoded = fmt.decode_shard(path.read_bytes(), spec, layout, i)
            np.testing.assert_array_equal(decoded, arrays[spec.name][a:b])


@pytest.mark.parametrize("codec", sorted(fmt.CODEC_PRESETS))
def test_every_codec_round_trips(tmp_path, codec):
    out, arrays = make_synthetic_cache(tmp_path / codec, num_sequences=9, seq_len=7, topk=3, codec=codec)
    layout = fmt.layout_from_manifest(fmt.load_manifest(out))
    spec = next(s for s in layout.arrays() if s.name == "topk_logprobs")
    for i in range(layout.num_shards):
        a, b = layout.shard_range(i)
        raw = (out / fmt.shard_relpath(spec.name, i, 3)).read_bytes()
        np.testing.assert_array_equal(fmt.decode_shard(raw, spec, layout, i), arrays["topk_logprobs"][a:b])


def test_unknown_version_is_refused(tmp_path):
    out, _ = make_synthetic_cache(tmp_path / "c")
    manifest = json.loads((out / fmt.MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (out / fmt.MANIFEST_NAME).write_bytes(fmt.manifest_bytes(manifest))
    with pytest.raises(fmt.CacheError, match="format_version 99.*reads only version 1"):
        fmt.load_manifest(out)


def test_missing_manifest_explains_unfinished_build(tmp_path):
    out, _ = make_synthetic_cache(tmp_path / "c")
    (out / fmt.MANIFEST_NAME).unlink()
    with pytest.raises(fmt.CacheError, match="has not finished"):
        fmt.load_manifest(out)
    with pytest.raises(fmt.CacheError, match="does not exist"):
        fmt.load_manifest(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(fmt.CacheError, match="is a file"):
        fmt.load_manifest(tmp_path / "file")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(topk=200, vocab_size=100), "larger than the teacher vocabulary"),
        (dict(shard_seqs=6, chunk_seqs=4), "multiple of chunk_seqs"),
        (dict(seq_len=0), "seq_len must be a positive integer"),
        (dict(temperatures=(1.0,)), "temperature 1 is always stored"),
        (dict(temperatures=(-2.0,)), "positive finite"),
        (dict(codec="lzma"), "unknown codec"),
    ],
)
def test_layout_rejects_bad_values(kwargs, match):
    base = dict(num_sequences=10, seq_len=4, topk=2, vocab_size=100, shard_seqs=8, chunk_seqs=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fmt.CacheLayout(**base)


def test_writer_refuses_foreign_directory_and_changed_settings(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    layout = fmt.CacheLayout(num_sequences=4, seq_len=3, topk=2, vocab_size=10, shard_seqs=2, chunk_seqs=2)
    with pytest.raises(BuildStateError, match="not a kdcache cache"):
        CacheWriter(foreign, layout, settings={})
    assert (foreign / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out, _ = make_synthetic_cache(tmp_path / "c", num_sequences=4, seq_len=3, topk=2, vocab_size=10,
                                  shard_seqs=2, chunk_seqs=2)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(BuildStateError, match="different settings"):
        CacheWriter(out, layout, settings={"synthetic_seed": 1})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    again = CacheWriter(out, layout, settings={"synthetic_seed": 0})
    assert again.already_complete and again.pending_shards() == []


def test_partial_build_resumes_only_missing_shards(tmp_path):
    layout = fmt.CacheLayout(num_sequences=10, seq_len=3, topk=2, vocab_size=10, shard_seqs=2, chunk_seqs=2)
    arrays = synthetic_arrays(10, 3, 2, 10)
    writer = CacheWriter(tmp_path / "c", layout, settings={"s": 1})
    for i in writer.pending_shards()[:3]:
        a, b = layout.shard_range(i)
        writer.write_shard(i, {k: v[a:b] for k, v in arrays.items()})
    assert writer.finalize() is None
    resumed = CacheWriter(tmp_path / "c", layout, settings={"s": 1})
    assert resumed.pending_shards() == [3, 4]
    for i in resumed.pending_shards():
        a, b = layout.shard_range(i)
        resumed.write_shard(i, {k: v[a:b] for k, v in arrays.items()})
    manifest = resumed.finalize()
    assert manifest is not None and manifest["num_shards"] == 5
    assert not (tmp_path / "c" / ".kdcache-build").exists()


def test_multi_rank_writers_split_shards(tmp_path):
    layout = fmt.CacheLayout(num_sequences=10, seq_len=3, topk=2, vocab_size=10, shard_seqs=2, chunk_seqs=2)
    arrays = synthetic_arrays(10, 3, 2, 10)
    w0 = CacheWriter(tmp_path / "c", layout, settings={}, rank=0, world_size=2)
    w1 = CacheWriter(tmp_path / "c", layout, settings={}, rank=1, world_size=2)
    assert w0.pending_shards() == [0, 2, 4] and w1.pending_shards() == [1, 3]
    for w in (w0, w1):
        for i in w.pending_shards():
            a, b = layout.shard_range(i)
            w.write_shard(i, {k: v[a:b] for k, v in arrays.items()})
    assert w1.finalize() is not None
    with pytest.raises(ValueError, match="must not write shard"):
        w0.write_shard(1, {})


def test_concurrent_finalize_writes_one_manifest(tmp_path):
    """Two ranks that both see every shard journaled: one writes the manifest, the other waits for it."""
    import threading

    layout = fmt.CacheLayout(num_sequences=4, seq_len=3, topk=2, vocab_size=10, shard_seqs=2, chunk_seqs=2)
    arrays = synthetic_arrays(4, 3, 2, 10)
    writers = [CacheWriter(tmp_path / "c", layout, settings={}, rank=r, world_size=2) for r in range(2)]
    for w in writers:
        for i in w.pending_shards():
            a, b = layout.shard_range(i)
            w.write_shard(i, {k: v[a:b] for k, v in arrays.items()})
    results = [None, None]
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, writers[r].finalize())) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] is not None and results[1] is not None
    assert results[0]["shards"] == results[1]["shards"]
    assert fmt.load_manifest(tmp_path / "c")["num_shards"] == 2


def test_resume_rewrites_a_damaged_unjournaled_short_last_shard(tmp_path):
    """A crash can leave garbage (or zarr's .partial temporaries) where the short last shard goes."""
    layout = fmt.CacheLayout(num_sequences=5, seq_len=3, topk=2, vocab_size=10, shard_seqs=2, chunk_seqs=2)
    arrays = synthetic_arrays(5, 3, 2, 10)
    writer = CacheWriter(tmp_path / "c", layout, settings={})
    for i in (0, 1):
        a, b = layout.shard_range(i)
        writer.write_shard(i, {k: v[a:b] for k, v in arrays.items()})
    for spec in layout.arrays():
        path = tmp_path / "c" / fmt.shard_relpath(spec.name, 2, 1 + len(spec.trailing_shape))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"garbage from a killed writer")
        path.with_name(path.name + ".0123abcd.partial").write_bytes(b"half")
    resumed = CacheWriter(tmp_path / "c", layout, settings={})
    assert resumed.pending_shards() == [2]
    a, b = layout.shard_range(2)
    resumed.write_shard(2, {k: v[a:b] for k, v in arrays.items()})
    resumed.finalize()
    group = zarr.open_group(str(tmp_path / "c"), mode="r")
    for spec in layout.arrays():
        np.testing.assert_array_equal(group[spec.name][:], arrays[spec.name])
    assert not list((tmp_path / "c").rglob("*.partial"))
