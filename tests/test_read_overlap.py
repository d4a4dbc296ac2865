"""The cold read path (issue 16): chunk-at-a-time decode on threads, sha256 beside the decode, copies written
from memory. Ordering and overlap must never change a value, and a damaged shard is still refused by its sha256.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kdlib
from cache_server import format as fmt
from cache_server.format import CorruptShardError
from cache_server.format import decoded as decoded_fmt
from tests.cachefactory import make_synthetic_cache


@pytest.fixture()
def cache_and_arrays(tmp_path):
    # 21 sequences in shards of 8 and chunks of 4: the last shard (5 rows) ends in a partial chunk.
    out, arrays = make_synthetic_cache(tmp_path / "c", num_sequences=21, seq_len=13, topk=5, vocab_size=300,
                                       temperatures=(2.0,), shard_seqs=8, chunk_seqs=4)
    return out, arrays, tmp_path / "decoded"


def _raws(cache_dir, layout, shard_index):
    return {spec.name: (cache_dir / fmt.shard_relpath(spec.name, shard_index, 1 + len(spec.trailing_shape)))
            .read_bytes() for spec in layout.arrays()}


def test_threaded_chunk_decode_equals_sequential_decode_bit_for_bit(cache_and_arrays):
    cache_dir, arrays, _ = cache_and_arrays
    layout = fmt.layout_from_manifest(fmt.load_manifest(cache_dir))
    with ThreadPoolExecutor(3) as pool:
        for shard_index in range(layout.num_shards):
            start, stop = layout.shard_range(shard_index)
            raws = _raws(cache_dir, layout, shard_index)
            group = {name: raws[name] for name in ("topk_ids", "topk_logprobs")}
            sequential = fmt.decode_shard_group(group, layout, shard_index)
            threaded = fmt.decode_shard_group(group, layout, shard_index, executor=pool)
            for name in group:
                assert threaded[name].tobytes() == sequential[name].tobytes()
                assert np.array_equal(threaded[name], arrays[name][start:stop])
            for spec in layout.arrays():
                one = fmt.decode_shard(raws[spec.name], spec, layout, shard_index, companions=raws, executor=pool)
                assert one.tobytes() == np.ascontiguousarray(arrays[spec.name][start:stop]).tobytes()


@pytest.mark.parametrize("decode_threads", [1, 3])
def test_reader_values_do_not_depend_on_decode_threads(cache_and_arrays, decode_threads):
    cache_dir, arrays, decode_dir = cache_and_arrays
    with kdlib.open_cache(cache_dir, decode_dir=decode_dir / str(decode_threads), decode_threads=decode_threads,
                          prefetch_workers=2) as cache:
        assert cache.store.decode_threads == decode_threads
        order = np.random.default_rng(0).permutation(cache.num_sequences)
        got = cache.lookup(order, arrays=["topk_ids", "topk_logprobs", "lse", "input_ids"])
        for name, tensor in got.items():
            want = arrays[name][order]
            assert np.array_equal(tensor.numpy().astype(want.dtype), want), name
        # Every copy that was written passes its own crc32c check.
        assert decoded_fmt.verify_decoded_copies(cache_dir, decode_dir / str(decode_threads)) == []


def test_loader_pass_is_the_same_with_and_without_threads(cache_and_arrays):
    cache_dir, _, decode_dir = cache_and_arrays
    passes = []
    for threads in (1, 4):
        with kdlib.open_cache(cache_dir, decode_dir=decode_dir / f"t{threads}", decode_threads=threads) as cache:
            loader = kdlib.make_loader(cache, 4, shuffle=True, seed=3, num_workers=0, drop_last=False)
            passes.append([{k: v.clone() for k, v in batch.items()} for batch in loader])
    assert len(passes[0]) == len(passes[1])
    for a, b in zip(*passes):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and bool((a[key] == b[key]).all()), key


def test_write_decoded_copy_is_the_same_file_as_a_filled_map(tmp_path):
    array = np.random.default_rng(0).integers(0, 60000, size=(7, 13, 5)).astype(np.uint16)
    decoded_fmt.write_decoded_copy(tmp_path / ".a.tmp", tmp_path / "a.npy", array)
    mm = decoded_fmt.create_decoded_copy(tmp_path / ".b.tmp", array.dtype, array.shape)
    mm[...] = array
    mm.flush()
    del mm
    decoded_fmt.publish_decoded_copy(tmp_path / ".b.tmp", tmp_path / "b.npy")
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert decoded_fmt.decoded_copy_problem(tmp_path / "a.npy") is None
    assert np.array_equal(np.load(tmp_path / "a.npy"), array)
    assert not (tmp_path / ".a.tmp").exists()
    with pytest.raises(ValueError, match="C-contiguous"):
        decoded_fmt.write_decoded_copy(tmp_path / ".c.tmp", tmp_path / "c.npy", array[:, ::2])


def test_a_damaged_stored_shard_is_refused_by_its_digest_and_nothing_is_published(cache_and_arrays):
    cache_dir, _, decode_dir = cache_and_arrays
    path = cache_dir / fmt.shard_relpath("topk_logprobs", 1, 3)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside an inner chunk: the decode may fail or not, the digest check does
    path.write_bytes(bytes(data))
    with kdlib.open_cache(cache_dir, decode_dir=decode_dir, decode_threads=3) as cache:
        with pytest.raises(CorruptShardError, match="xxh3_128"):  # the manifest's fast digest
            cache.read(8, 10)
        assert not cache.store.is_decoded("topk_logprobs", 1) and not cache.store.is_decoded("topk_ids", 1)
        assert cache.read(0, 2)["topk_ids"].shape == (2, 13, 5)  # other shards still read


def test_a_chunk_that_fails_on_a_thread_is_a_corrupt_shard_error(cache_and_arrays):
    cache_dir, _, _ = cache_and_arrays
    layout = fmt.layout_from_manifest(fmt.load_manifest(cache_dir))
    raws = _raws(cache_dir, layout, 0)
    raw = bytearray(raws["lse"])
    raw[:16] = b"\x00" * 16  # the first chunk's frame header
    spec = {s.name: s for s in layout.arrays()}["lse"]
    with ThreadPoolExecutor(2) as pool, pytest.raises(CorruptShardError, match="inner chunk 0"):
        fmt.decode_shard(bytes(raw), spec, layout, 0, executor=pool)


def test_decode_threads_must_be_positive(cache_and_arrays):
    cache_dir, _, decode_dir = cache_and_arrays
    with pytest.raises(ValueError, match="decode_threads"):
        kdlib.open_cache(cache_dir, decode_dir=decode_dir, decode_threads=0)


# --- copies written behind the reads ---------------------------------------------------------------------------
def test_a_read_is_served_while_its_copy_is_written_behind_and_the_copy_is_complete(cache_and_arrays):
    cache_dir, arrays, decode_dir = cache_and_arrays
    with kdlib.open_cache(cache_dir, decode_dir=decode_dir, readahead=0) as cache:
        batch = cache.read(8, 16)  # shard 1, from memory at once
        for name in ("topk_ids", "topk_logprobs", "lse"):
            np.testing.assert_array_equal(batch[name].numpy(), arrays[name][8:16])
            assert cache.store.is_decoded(name, 1)  # decoded, whether or not its copy is on disk yet
        cache.store.wait_writes()
        for name in cache.position_arrays():
            path = cache.store.path(name, 1)
            assert decoded_fmt.decoded_copy_problem(path) is None  # sealed: data, crc32c trailer
        mtimes = {name: cache.store.path(name, 1).stat().st_mtime_ns for name in cache.position_arrays()}
        again = cache.read(8, 16)  # now from the map that replaced the memory
        for name in batch:
            np.testing.assert_array_equal(again[name].numpy(), batch[name].numpy(), err_msg=name)
    with kdlib.open_cache(cache_dir, decode_dir=decode_dir, readahead=0) as fresh:  # another reader maps them
        fresh_batch = fresh.read(8, 16)
        assert fresh.store.redecoded == 0
        assert {name: fresh.store.path(name, 1).stat().st_mtime_ns for name in fresh.position_arrays()} == mtimes
        np.testing.assert_array_equal(fresh_batch["topk_ids"].numpy(), arrays["topk_ids"][8:16])


def test_a_copy_that_cannot_be_written_is_reported_by_the_next_decode(tmp_path, small_fs):
    """A full disk under the decode directory: the read that decoded the shard still gets its values (from
    memory); the copy's write fails behind it, and the next decode of another shard raises that error with what
    to do (once: the read after it decodes that shard again, and its own failed writes wait for the next shard)."""
    mount_point, _ = small_fs
    # Decoded shards of ~300 KB (topk ids + log-probs of 8 x 512 x 16): none fits the 256 KB tmpfs whole.
    cache_dir, arrays = make_synthetic_cache(tmp_path / "c", num_sequences=16, seq_len=512, topk=16,
                                             vocab_size=300, shard_seqs=8, chunk_seqs=4)
    with kdlib.open_cache(cache_dir, decode_dir=mount_point, readahead=0) as cache:
        batch = cache.read(0, 8)
        np.testing.assert_array_equal(batch["topk_logprobs"].numpy(), arrays["topk_logprobs"][0:8])
        cache.store.wait_writes()
        with pytest.raises(OSError, match="free space or set"):
            cache.read(8, 16)
        np.testing.assert_array_equal(cache.read(8, 16)["lse"].numpy(), arrays["lse"][8:16])  # raised once
