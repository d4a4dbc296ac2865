"""Format v1: exact manifest bytes, zarr interoperability, our decoder vs zarr, refusal of bad manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_server import format as fmt
from cache_server.format import slots
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
    if os.environ.get("KDCACHE_REGEN_GOLDEN") == "1":  # after a reviewed format change (docs/FORMAT.md §9)
        GOLDEN.write_bytes(got)
    assert got == GOLDEN.read_bytes(), ("manifest bytes changed: a format change needs a version bump (or, for an "
                                        "optional field old readers ignore, a FORMAT.md §9 entry) + FORMAT.md")


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
    # Zarr reads the stored form (format v2: slots by ascending id); our decoder restores the canonical order.
    stored, canonical = slots.stored_form(layout, arrays), slots.canonicalize(layout, arrays)
    for spec in layout.arrays():
        np.testing.assert_array_equal(group[spec.name][:], stored[spec.name])
        for i in range(layout.num_shards):
            a, b = layout.shard_range(i)
            raws = {name: (out / fmt.shard_relpath(name, i, 1 + len(spec.trailing_shape))).read_bytes()
                    for name in fmt.decode_inputs(layout, spec.name)}
            decoded = fmt.decode_shard(raws[spec.name], spec, layout, i, companions=raws)
            np.testing.assert_array_equal(decoded, canonical[spec.name][a:b])


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
    with pytest.raises(fmt.CacheError, match="format_version 99.*reads only versions 1 and 2"):
        fmt.load_manifest(out)


def test_missing_manifest_explains_unfinished_build(tmp_path):
    out, _ = make_synthetic_cache(tmp_path / "c")
    (out / fmt.MANIFEST_NAME).unlink()
    with pytest.raises(fmt.CacheError, match="unfinished build: rerun the same kdcache build command to resume"):
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
        (dict(temperatures=(2.0, 2.0000001)), "both store as array 'lse_t2'"),
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
    stored = slots.stored_form(layout, arrays)
    for spec in layout.arrays():
        np.testing.assert_array_equal(group[spec.name][:], stored[spec.name])
    assert not list((tmp_path / "c").rglob("*.partial"))


# ----------------------------------------------------------------------------------------------------------
# validate_manifest: every field a reader, the server and verify index into is checked, with a clear error
# ----------------------------------------------------------------------------------------------------------


def _set(path: str | tuple[str, ...], value):
    """A mutation setting manifest[path] (dotted, with list indices) to value; DELETE removes the key."""
    def mutate(manifest):
        *parents, last = path.split(".") if isinstance(path, str) else path
        node = manifest
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) else last
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value
    return mutate


_DELETE = object()


@pytest.fixture(scope="module")
def tiny_manifest_raw(tmp_path_factory) -> bytes:
    out, _ = make_synthetic_cache(
        tmp_path_factory.mktemp("tiny") / "c", num_sequences=5, seq_len=3, topk=2, vocab_size=11,
        temperatures=(2.0,), shard_seqs=4, chunk_seqs=2, seed=7, codec="none",
    )
    return (out / fmt.MANIFEST_NAME).read_bytes()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_set("format", "zarr"), "not a kdcache manifest"),
        (_set("format_version", True), "format_version True.*reads only versions 1 and 2"),
        (_set("format_version", "1"), "format_version '1'"),
        (_set("seq_len", _DELETE), "lacks the required field 'seq_len'"),
        (_set("num_shards", _DELETE), "lacks the required field 'num_shards'"),
        (_set("shards", _DELETE), "lacks the required field 'shards'"),
        (_set("topk", 2.0), "'topk' must be a non-negative integer, got 2.0"),
        (_set("num_sequences", 0), "'num_sequences' must be a positive integer"),
        (_set("chunk_seqs", False), "'chunk_seqs' must be a positive integer, got False"),
        (_set("codec", "lzma"), "codec 'lzma' is not one of"),
        (_set("codec", 5), "'codec' must be a string"),
        (_set("teacher", "llama"), "'teacher' must be an object"),
        (_set("stats.bytes_per_token", "many"), "stats field 'bytes_per_token' must be a number"),
        (_set("temperatures", "2"), "'temperatures' must be a list of numbers"),
        (_set("temperatures", [2.0, 2.0]), "both store as array 'lse_t2'"),
        (_set("temperatures", [1.0]), "temperature 1 is always stored"),
        (_set("topk", 12), "larger than the teacher vocabulary"),
        (_set("num_shards", 3), "num_shards is 3, but 5 sequences in shards of 4 make 2"),
        (_set("arrays", []), "'arrays' must be an object"),
        (_set(("arrays", "../../etc"), {"shape": [5], "dtype": "uint8"}), "array named '../../etc'"),
        (_set("arrays.lse_t2", _DELETE), "its arrays .* are not the ones its layout implies"),
        (_set("arrays.topk_logprobs", _DELETE), "has neither 'topk_logprobs' nor 'sample_ids'"),
        (_set("arrays.lse.shape", [5, 4]), "array 'lse' is recorded as .* but the layout implies"),
        (_set("arrays.topk_ids.dtype", "uint32"), "array 'topk_ids' is recorded as"),
        (_set("arrays.topk_ids.shape", "5,3,2"), "array 'topk_ids' must be"),
        (_set("layout.seq_len", 4), r"layout.seq_len is 4, but the top-level fields say 3"),
        (_set("shards", []), "'shards' must be an object"),
        (_set("shards.lse", _DELETE), "shard table covers arrays"),
        (_set("shards.lse", [{"sha256": "0" * 64, "nbytes": 1}]), "array 'lse' lists 1 shards, expected 2"),
        (_set("shards.lse", {"0": 1}), "array 'lse' lists dict shards"),
        (_set("shards.lse.1.sha256", "ABC"), "array 'lse' shard 1 must be .*sha256"),
        (_set("shards.lse.1.sha256", "F" * 64), "array 'lse' shard 1 must be"),
        (_set("shards.lse.0.nbytes", -1), "array 'lse' shard 0 must be"),
        (_set("shards.lse.0.nbytes", "84"), "array 'lse' shard 0 must be"),
        (_set("shards.lse.0", None), "array 'lse' shard 0 must be"),
    ],
)
def test_validate_manifest_refuses_malformed_manifests(tiny_manifest_raw, tmp_path, mutate, match):
    manifest = json.loads(tiny_manifest_raw)
    out = tmp_path / "c"  # the manifest alone: loading it reads no shard
    out.mkdir()
    assert fmt.validate_manifest(manifest, "tiny") == fmt.layout_from_manifest(manifest)
    mutate(manifest)
    raw = fmt.manifest_bytes(manifest)
    with pytest.raises(fmt.CacheError, match=match):
        fmt.validate_manifest(json.loads(raw), "tiny")
    (out / fmt.MANIFEST_NAME).write_bytes(raw)
    with pytest.raises(fmt.CacheError, match=match) as info:  # every reader goes through parse_manifest
        fmt.load_manifest(out)
    assert str(out / fmt.MANIFEST_NAME) in str(info.value)


def test_validate_manifest_allows_unknown_extra_fields(tiny_manifest_raw):
    manifest = json.loads(tiny_manifest_raw)
    manifest["made_by"] = {"tool": "a converter", "args": ["--topk", "2"]}
    manifest["notes"] = {"anything": [1, 2]}
    fmt.validate_manifest(manifest)


def test_damaged_manifest_json_is_a_cache_error(tmp_path, monkeypatch):
    out = _tiny_cache(tmp_path, monkeypatch)
    raw = (out / fmt.MANIFEST_NAME).read_bytes()
    (out / fmt.MANIFEST_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(fmt.CacheError, match="is not valid JSON"):
        fmt.load_manifest(out)
    (out / fmt.MANIFEST_NAME).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(fmt.CacheError, match="is not valid JSON"):
        fmt.load_manifest(out)


# ----------------------------------------------------------------------------------------------------------
# Errors carry structured fields and name the working repair path
# ----------------------------------------------------------------------------------------------------------


def test_corrupt_shard_error_fields_message_and_pickle():
    import pickle

    exc = fmt.CorruptShardError("topk_ids", 3, "shard index checksum mismatch", where="/data/c/topk_ids/c/3/0/0")
    assert (exc.array, exc.shard_index, exc.reason, exc.path) == (
        "topk_ids", 3, "shard index checksum mismatch", "/data/c/topk_ids/c/3/0/0")
    text = str(exc)
    assert "array 'topk_ids' shard 3 (/data/c/topk_ids/c/3/0/0): shard index checksum mismatch" in text
    assert "rerun the same `kdcache build` command you built the cache with (`kdcache info DIR` prints its " \
           "arguments): it re-verifies every shard against the manifest and rebuilds only the damaged or " \
           "missing ones" in text
    assert "delet" not in text
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is fmt.CorruptShardError and str(again) == text and again.reason == exc.reason


def test_decoder_and_checksum_errors_are_structured(tmp_path, monkeypatch):
    out = _tiny_cache(tmp_path, monkeypatch)
    manifest = fmt.load_manifest(out)
    layout = fmt.layout_from_manifest(manifest)
    spec = next(s for s in layout.arrays() if s.name == "lse")
    path = out / fmt.shard_relpath("lse", 1, 2)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    with pytest.raises(fmt.CorruptShardError) as info:
        fmt.verify_shard_bytes(bytes(raw), manifest["shards"]["lse"][1], "lse", 1, where=str(path))
    assert (info.value.array, info.value.shard_index, info.value.path) == ("lse", 1, str(path))
    assert info.value.reason.startswith("xxh3_128 ")  # the fast digest a read checks
    with pytest.raises(fmt.CorruptShardError, match="index checksum mismatch") as info:
        fmt.decode_shard(bytes(raw), spec, layout, 1)
    assert info.value.reason == "shard index checksum mismatch"


# ----------------------------------------------------------------------------------------------------------
# A directory without a manifest: a running build (its lock is held) vs an unfinished one (rerun to resume)
# ----------------------------------------------------------------------------------------------------------

_HOLD_LOCK = (
    "import sys, time\n"
    "from cache_server.format.build_lock import acquire_build_lock\n"
    "lock = acquire_build_lock(sys.argv[1], rank=0, world_size=1)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def test_missing_manifest_names_a_running_build_and_after_sigkill_says_resume(tmp_path):
    import signal
    import subprocess
    import sys

    out, _ = make_synthetic_cache(tmp_path / "c")
    (out / fmt.MANIFEST_NAME).unlink()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(fmt.CacheError, match="a `kdcache build` is running on it") as info:
            fmt.load_manifest(out)
        assert f"pid {holder.pid}" in str(info.value) and "wait for that build to finish" in str(info.value)
        assert "rerun" not in str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    # The kernel dropped the lock with the process: the same directory is now an unfinished build.
    with pytest.raises(fmt.CacheError, match="unfinished build: rerun the same kdcache build command to resume"):
        fmt.load_manifest(out)
    with pytest.raises(fmt.CacheError, match="not a kdcache cache"):
        fmt.load_manifest(tmp_path)


def test_format_package_imports_nothing_else_of_ours_and_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from cache_server import format as fmt\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'kdlib', 'triton_kernels')\n"
        "             or (m.startswith('cache_server.') and not m.startswith('cache_server.format')))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert sorted(fmt.__all__) == sorted(set(fmt.__all__)) and all(hasattr(fmt, name) for name in fmt.__all__)


# --- the stored-bytes digest rule (format.shard_bytes_problem): xxh3_128 when recorded, else sha256 ----------
def test_new_shard_entries_record_both_digests_and_reads_check_the_fast_one(tmp_path):
    out, _ = make_synthetic_cache(tmp_path / "c", num_sequences=6, seq_len=4, topk=3, vocab_size=50, shard_seqs=4)
    manifest = fmt.load_manifest(out)
    path = out / fmt.shard_relpath("topk_ids", 0, 3)
    raw = path.read_bytes()
    entry = manifest["shards"]["topk_ids"][0]
    assert entry == fmt.shard_checksums(raw)
    assert entry["xxh3_128"] == fmt.shard_xxh3_128(raw) and len(entry["xxh3_128"]) == 32
    assert fmt.shard_bytes_problem(raw, entry) is None
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    assert fmt.shard_bytes_problem(bytes(flipped), entry).startswith("xxh3_128 ")
    assert fmt.shard_bytes_problem(raw[:-1], entry).startswith("size ")
    # An entry whose sha256 disagrees with bytes whose xxh3_128 matches: a read trusts the fast digest, the
    # audit (kdcache verify, repairs) checks every digest the entry records.
    forged = {**entry, "sha256": "0" * 64}
    assert fmt.shard_bytes_problem(raw, forged) is None
    assert fmt.shard_bytes_problem(raw, forged, every_digest=True).startswith("sha256 ")
    with pytest.raises(fmt.CorruptShardError, match="sha256"):
        fmt.verify_shard_bytes(raw, forged, "topk_ids", 0, every_digest=True)


def test_entries_without_the_fast_digest_are_checked_by_sha256(tmp_path):
    """Caches written before xxh3_128 was recorded (and the v1 fixture) are still checked, by their sha256."""
    out, arrays = make_synthetic_cache(tmp_path / "c", num_sequences=6, seq_len=4, topk=3, vocab_size=50,
                                       shard_seqs=4)
    raw_manifest = json.loads((out / fmt.MANIFEST_NAME).read_bytes())
    for entries in raw_manifest["shards"].values():
        for entry in entries:
            del entry["xxh3_128"]
    (out / fmt.MANIFEST_NAME).write_bytes(fmt.manifest_bytes(raw_manifest))
    entry = raw_manifest["shards"]["lse"][1]
    raw = (out / fmt.shard_relpath("lse", 1, 2)).read_bytes()
    assert fmt.shard_bytes_problem(raw, entry) is None
    assert fmt.shard_bytes_problem(raw, {**entry, "sha256": "1" * 64}).startswith("sha256 ")
    import kdlib

    with kdlib.open_cache(out, decode_dir=tmp_path / "dec") as cache:
        np.testing.assert_array_equal(cache.read(0, 6, arrays=["lse"])["lse"].numpy(), arrays["lse"])


@pytest.mark.parametrize("bad", ["ABCDEF" + "0" * 26, "0" * 31, 12, ""])
def test_a_malformed_fast_digest_is_refused_when_the_manifest_is_read(tmp_path, bad):
    out, _ = make_synthetic_cache(tmp_path / "c", num_sequences=6, seq_len=4, topk=3, vocab_size=50, shard_seqs=4)
    raw_manifest = json.loads((out / fmt.MANIFEST_NAME).read_bytes())
    raw_manifest["shards"]["input_ids"][0]["xxh3_128"] = bad
    with pytest.raises(fmt.CacheError, match="xxh3_128"):
        fmt.parse_manifest(fmt.manifest_bytes(raw_manifest), source="test")
