"""Local reader: values, dtypes, batches that are copies (never views of the decoded maps), decode-once,
corruption detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdlib
from cache_server import format as fmt
from cache_server.cli.verify import verify_cache
from tests.cachefactory import make_synthetic_cache


@pytest.fixture()
def cache_and_arrays(tmp_path):
    out, arrays = make_synthetic_cache(
        tmp_path / "c", num_sequences=21, seq_len=13, topk=5, vocab_size=300, temperatures=(2.0,),
        shard_seqs=8, chunk_seqs=4,
    )
    return out, arrays, tmp_path / "decoded"


def _as_np(tensor: torch.Tensor, like: np.ndarray) -> np.ndarray:
    array = tensor.numpy()
    return array.view(like.dtype) if array.dtype.itemsize == like.dtype.itemsize and array.dtype.kind in "iu" \
        else array.astype(like.dtype)


@pytest.mark.parametrize("start,stop", [(0, 21), (3, 5), (7, 9), (0, 8), (5, 21), (20, 21), (4, 4), (8, 8), (21, 21)])
def test_read_matches_written_arrays(cache_and_arrays, start, stop):
    out, arrays, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir)
    assert (cache.num_sequences, cache.seq_len, cache.topk, cache.vocab_size) == (21, 13, 5, 300)
    assert cache.temperatures == (2.0,)
    batch = cache.read(start, stop)
    assert sorted(batch) == ["input_ids", "lse", "lse_t2", "topk_ids", "topk_logprobs"]
    for name, tensor in batch.items():
        np.testing.assert_array_equal(_as_np(tensor, arrays[name]), arrays[name][start:stop])
    assert batch["input_ids"].dtype == torch.int32
    assert batch["topk_ids"].dtype == torch.int32
    assert batch["topk_logprobs"].dtype == torch.float16
    assert batch["lse"].dtype == torch.float32
    assert batch["topk_ids"].shape == (stop - start, 13, 5)


def test_widen_and_lookup(cache_and_arrays):
    out, arrays, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir, widen=True)
    batch = cache.read(2, 11)
    assert batch["topk_ids"].dtype == torch.int64 and batch["topk_logprobs"].dtype == torch.float32
    idx = [20, 0, 9, 9, 15]
    looked = cache.lookup(torch.tensor(idx))
    np.testing.assert_array_equal(looked["topk_ids"].numpy(), arrays["topk_ids"][idx].astype(np.int64))
    np.testing.assert_array_equal(looked["topk_logprobs"].numpy(), arrays["topk_logprobs"][idx].astype(np.float32))
    stats = cache.sequence_stats()
    np.testing.assert_array_equal(stats["seq_nll"].numpy(), arrays["seq_nll"])
    with pytest.raises(IndexError):
        cache.lookup([21])
    with pytest.raises(IndexError):
        cache.read(5, 30)


def test_uint32_ids_read_as_int32(tmp_path):
    out, arrays = make_synthetic_cache(tmp_path / "c", num_sequences=6, seq_len=5, topk=3, vocab_size=70000,
                                       shard_seqs=8, chunk_seqs=2)
    cache = kdlib.open_cache(out, decode_dir=tmp_path / "d")
    batch = cache.read(1, 4)
    assert batch["topk_ids"].dtype == torch.int32
    np.testing.assert_array_equal(batch["topk_ids"].numpy().astype(np.int64), arrays["topk_ids"][1:4])


def test_each_shard_is_decoded_once_and_batches_own_their_memory(cache_and_arrays):
    out, _, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0)
    cache.read(0, 4)
    cache.store.wait_writes()  # the copies are written behind the read
    decoded = sorted(p.relative_to(cache.decode_dir) for p in cache.decode_dir.rglob("*.npy"))
    assert [str(p) for p in decoded] == [f"{a}/0.npy" for a in sorted(cache.position_arrays())]
    mtimes = {p: p.stat().st_mtime_ns for p in cache.decode_dir.rglob("*.npy")}
    first = cache.read(1, 3)["topk_logprobs"]
    again = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0).read(1, 3)["topk_logprobs"]
    assert {p: p.stat().st_mtime_ns for p in cache.decode_dir.rglob("*.npy")} == mtimes
    torch.testing.assert_close(first, again)
    # Even within one shard a batch is a copy, not a view of the decoded map: two reads never share storage...
    a = cache.read(0, 8)["topk_logprobs"]
    b = cache.read(0, 8)["topk_logprobs"]
    assert a.data_ptr() != b.data_ptr()
    # ...so writing into a batch reaches neither later reads nor the decoded file.
    a.fill_(0.0)
    assert bool((cache.read(0, 8)["topk_logprobs"] != 0).any())
    fresh = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0).read(0, 8)["topk_logprobs"]
    assert bool((fresh != 0).any())


def test_prepare_decodes_everything(cache_and_arrays):
    out, _, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir)
    cache.prepare()
    assert len(list(cache.decode_dir.rglob("*.npy"))) == cache.num_shards * (len(cache.position_arrays()) + 2)


def _flip_byte(path, offset=10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_named_by_verify_and_refused_by_reader(cache_and_arrays):
    out, _, decode_dir = cache_and_arrays
    assert verify_cache(out) == []
    _flip_byte(out / fmt.shard_relpath("topk_logprobs", 1, 3))
    problems = verify_cache(out)
    assert len(problems) == 1 and "'topk_logprobs' shard 1" in problems[0] and "sha256" in problems[0]
    cache = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0)
    cache.read(0, 8)  # shard 0 is intact
    with pytest.raises(fmt.CorruptShardError, match="'topk_logprobs' shard 1"):
        cache.read(8, 10)
    assert not (cache.decode_dir / "topk_logprobs" / "1.npy").exists()


def test_missing_shard_file(cache_and_arrays):
    out, _, decode_dir = cache_and_arrays
    (out / fmt.shard_relpath("lse", 2, 2)).unlink()
    assert any("'lse' shard 2" in p and "missing" in p for p in verify_cache(out))
    with pytest.raises(fmt.CorruptShardError, match="missing"):
        kdlib.open_cache(out, decode_dir=decode_dir, readahead=0).read(16, 21)


def test_open_cache_errors(tmp_path):
    with pytest.raises(fmt.CacheError, match="does not exist"):
        kdlib.open_cache(tmp_path / "missing")


def test_decoded_size_limit_evicts_least_recently_used(cache_and_arrays):
    out, arrays, decode_dir = cache_and_arrays
    one_shard_bytes = None
    with kdlib.open_cache(out, decode_dir=decode_dir / "probe", readahead=0) as probe:
        probe.read(0, 8, arrays=["topk_logprobs"])
        one_shard_bytes = probe.store.decoded_bytes()
    limit = int(one_shard_bytes * 1.5)
    with kdlib.open_cache(out, decode_dir=decode_dir, readahead=0, max_decoded_bytes=limit) as cache:
        for start in range(0, 21, 8):
            batch = cache.read(start, min(start + 8, 21), arrays=["topk_logprobs"])
            np.testing.assert_array_equal(batch["topk_logprobs"].numpy(), arrays["topk_logprobs"][start:start + 8])
            assert cache.store.decoded_bytes() <= limit + one_shard_bytes
        assert cache.store.evicted >= 1
        # An evicted shard is decoded again on demand, with the same values.
        again = cache.read(0, 8, arrays=["topk_logprobs"])["topk_logprobs"]
        np.testing.assert_array_equal(again.numpy(), arrays["topk_logprobs"][0:8])


def test_batch_spanning_shards_decodes_them_in_parallel(cache_and_arrays):
    out, arrays, decode_dir = cache_and_arrays
    with kdlib.open_cache(out, decode_dir=decode_dir, readahead=0, prefetch_workers=2) as cache:
        batch = cache.read(0, 21)
        np.testing.assert_array_equal(batch["lse"].numpy(), arrays["lse"])
        cache.store.wait_prefetch()
        assert all(cache.store.is_decoded("lse", s) for s in range(cache.num_shards))


def test_malformed_manifest_is_a_cache_error(cache_and_arrays):
    import json

    out, _, decode_dir = cache_and_arrays
    manifest = json.loads((out / fmt.MANIFEST_NAME).read_text())
    manifest["shard_seqs"] = "eight"
    (out / fmt.MANIFEST_NAME).write_bytes(fmt.manifest_bytes(manifest))
    with pytest.raises(fmt.CacheError, match="malformed"):
        kdlib.open_cache(out, decode_dir=decode_dir)


def test_stale_tmp_files_are_removed_fresh_ones_kept(cache_and_arrays):
    import os
    import time

    out, _, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0)
    (cache.decode_dir / "lse").mkdir(parents=True)
    stale = cache.decode_dir / "lse" / ".3.npy.999.1.tmp"
    fresh = cache.decode_dir / "lse" / ".2.npy.998.1.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    cache.read(0, 2)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("widen", [False, True])
def test_in_place_edits_of_a_batch_never_reach_later_reads(cache_and_arrays, widen):
    out, arrays, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0, widen=widen)
    everything = list(cache.store.specs)
    reads = {"one shard": lambda: cache.read(0, 8, arrays=everything),
             "two shards": lambda: cache.read(5, 21, arrays=everything),
             "lookup, one shard": lambda: cache.lookup([3, 1, 2], arrays=everything),
             "lookup, three shards": lambda: cache.lookup([20, 0, 9, 9], arrays=everything)}
    rows = {"one shard": np.arange(0, 8), "two shards": np.arange(5, 21), "lookup, one shard": [3, 1, 2],
            "lookup, three shards": [20, 0, 9, 9]}
    for read in reads.values():  # edit every array of every kind of batch in place
        for tensor in read().values():
            tensor.mul_(3).add_(1)
    for what, read in reads.items():
        for name, tensor in read().items():
            np.testing.assert_array_equal(_as_np(tensor, arrays[name]), arrays[name][rows[what]],
                                          err_msg=f"{name}, {what}")


def test_prefetch_shards_decodes_in_background_and_defers_errors(cache_and_arrays):
    out, arrays, decode_dir = cache_and_arrays
    _flip_byte(out / fmt.shard_relpath("lse", 2, 2))
    with kdlib.open_cache(out, decode_dir=decode_dir, readahead=0) as cache:
        cache.prefetch_shards([0, 1, 2], arrays=["lse", "topk_ids"])  # shard 2 of lse is corrupt: no raise here
        cache.prefetch_shards(np.array([1]))  # numpy ints, default arrays, already under way
        cache.store.wait_prefetch()
        assert cache.store.is_decoded("lse", 1) and cache.store.is_decoded("topk_ids", 2)
        assert cache.store.is_decoded("input_ids", 1) and not cache.store.is_decoded("input_ids", 0)
        assert not cache.store.is_decoded("lse", 2)
        with pytest.raises(fmt.CorruptShardError, match="'lse' shard 2"):
            cache.read(16, 18, arrays=["lse"])
        with pytest.raises(IndexError, match="shard 3"):
            cache.prefetch_shards([3])
        with pytest.raises(KeyError, match="unknown arrays"):
            cache.prefetch_shards([0], arrays=["logits"])
        with pytest.raises(TypeError, match="list of array names"):
            cache.prefetch_shards([0], arrays="lse")


def _report_reopened_cache(cache, queue):
    try:
        queue.put({"decode_dir": str(cache.decode_dir), "max_decoded_bytes": cache.max_decoded_bytes,
                   "prefetch_workers": cache.prefetch_workers, "widen": cache.widen, "readahead": cache.readahead,
                   "batch": {k: v.numpy() for k, v in cache.read(3, 12).items()}})
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put(repr(exc))


def run_in_spawned_process(cache, report=_report_reopened_cache) -> dict:
    """What ``report(cache, queue)`` put in the queue, run in a spawned process (the cache travels pickled)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=report, args=(cache, queue))
    process.start()
    result = queue.get(timeout=120)
    process.join(30)
    assert isinstance(result, dict), result
    return result


def test_pickled_cache_reopens_with_the_same_options_in_a_spawned_process(cache_and_arrays):
    out, arrays, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir, widen=True, readahead=3, max_decoded_bytes=1 << 20,
                             prefetch_workers=3)
    cache.read(0, 4)  # live maps and threads in this process: they must not travel
    # This process's read-ahead decodes and copy writes are over before the child reads the same directory
    # under the same 1 MB limit (a child racing this process's evictions is not what this test is about).
    cache.store.wait_prefetch()
    result = run_in_spawned_process(cache)
    assert result.pop("batch").keys() == cache.read(3, 12).keys()
    assert result == {"decode_dir": str(cache.decode_dir), "max_decoded_bytes": 1 << 20, "prefetch_workers": 3,
                      "widen": True, "readahead": 3}
    for name, value in run_in_spawned_process(cache)["batch"].items():
        np.testing.assert_array_equal(value, cache.read(3, 12)[name].numpy(), err_msg=name)


def test_old_option_names_warn_and_still_work(cache_and_arrays):
    out, _, decode_dir = cache_and_arrays
    with pytest.warns(DeprecationWarning, match="shard_cache_dir.*decode_dir"):
        old = kdlib.open_cache(out, shard_cache_dir=decode_dir)
    assert old.decode_root == decode_dir and old.decode_dir == kdlib.open_cache(out, decode_dir=decode_dir).decode_dir
    with pytest.warns(DeprecationWarning, match="shard_cache_bytes.*max_decoded_bytes"):
        assert kdlib.LocalCache(out, decode_dir=decode_dir, shard_cache_bytes=1 << 20).max_decoded_bytes == 1 << 20
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="pass only decode_dir"):
        kdlib.open_cache(out, decode_dir=decode_dir, shard_cache_dir=decode_dir / "elsewhere")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['decode_root'\\]"):
        kdlib.open_cache(out, decode_root=decode_dir)


def test_missing_manifest_error_comes_from_the_format_module(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(fmt.CacheError) as from_format:
        fmt.load_manifest(tmp_path / "half")
    with pytest.raises(fmt.CacheError) as from_reader:
        kdlib.open_cache(tmp_path / "half", decode_dir=tmp_path / "d")
    assert str(from_reader.value) == str(from_format.value)


def test_local_cache_modules_never_import_the_remote_ones():
    import subprocess
    import sys

    code = ("import sys, kdlib.data.cache, kdlib.data.store, kdlib.data.sources; "
            "print(sorted(m for m in sys.modules if m in ('kdlib.data.remote', 'httpx', 'kdlib.data.open')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
