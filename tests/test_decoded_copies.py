"""Decoded copies (cache_server.format.decoded): crc32c recorded on write, checked on first map, re-decoded."""

from __future__ import annotations

import os

import numpy as np
import pytest

import kdlib
from cache_server import format as fmt
from cache_server.format import decoded as decoded_fmt
from tests.cachefactory import make_synthetic_cache


@pytest.fixture()
def cache_and_arrays(tmp_path):
    out, arrays = make_synthetic_cache(tmp_path / "c", num_sequences=21, seq_len=13, topk=5, vocab_size=300,
                                       temperatures=(2.0,), shard_seqs=8, chunk_seqs=4)
    return out, arrays, tmp_path / "decoded"


def _flip_byte(path, offset: int) -> None:
    """Damage a copy in place, as a new version of the file: a process checks a copy once per file version
    (device, inode, mtime), and an in-place write within one mtime tick would not be a new version."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    _new_version(path, before)


def _new_version(path, before: os.stat_result) -> None:
    """Give a file changed in place an mtime distinct from its old one (``before``), explicitly."""
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def _data_offset(path) -> int:
    with open(path, "rb") as file:
        np.lib.format.read_magic(file)
        np.lib.format.read_array_header_1_0(file)
        return file.tell()


def test_path_scheme_and_default_root(tmp_path, monkeypatch, cache_and_arrays):
    out, _, _ = cache_and_arrays
    raw = (out / fmt.MANIFEST_NAME).read_bytes()
    copies = decoded_fmt.decoded_cache_dir(tmp_path / "root", raw)
    assert copies.parent == tmp_path / "root" and len(copies.name) == 24
    assert decoded_fmt.decoded_shard_path(copies, "lse_t2", 3) == copies / "lse_t2" / "3.npy"
    monkeypatch.setenv("KDCACHE_DECODE_DIR", str(tmp_path / "env"))
    assert decoded_fmt.default_decode_root() == tmp_path / "env"
    assert kdlib.open_cache(out).decode_dir == decoded_fmt.decoded_cache_dir(tmp_path / "env", raw)
    monkeypatch.delenv("KDCACHE_DECODE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert decoded_fmt.default_decode_root() == tmp_path / "xdg" / "kdcache" / "decoded"


def test_copies_carry_a_crc32c_and_stay_plain_npy_files(cache_and_arrays):
    out, arrays, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir)
    cache.prepare()
    assert decoded_fmt.verify_decoded_copies(out, decode_dir) == []
    path = cache.store.path("topk_ids", 1)
    assert decoded_fmt.decoded_copy_problem(path) is None
    np.testing.assert_array_equal(np.load(path), arrays["topk_ids"][8:16])  # the trailer is invisible to numpy
    assert decoded_fmt.verify_decoded_copies(out, decode_dir / "nothing-decoded-here") == []


@pytest.mark.parametrize("where", ["data", "header", "trailer"])
def test_a_damaged_copy_is_named_by_verify_and_decoded_again_by_a_fresh_reader(cache_and_arrays, where):
    out, arrays, decode_dir = cache_and_arrays
    with kdlib.open_cache(out, decode_dir=decode_dir, readahead=0) as cache:
        cache.read(8, 16)  # its copies are written behind the read, and on disk once the cache is closed
    path = kdlib.open_cache(out, decode_dir=decode_dir).store.path("topk_logprobs", 1)
    offset = {"data": _data_offset(path) + 7, "header": 20, "trailer": os.path.getsize(path) - 2}[where]
    _flip_byte(path, offset)

    problems = decoded_fmt.verify_decoded_copies(out, decode_dir)
    assert len(problems) == 1 and "'topk_logprobs' shard 1" in problems[0] and str(path) in problems[0]
    assert "crc32c" in problems[0]

    fresh = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0)
    batch = fresh.read(8, 16, arrays=["topk_logprobs", "lse"])
    np.testing.assert_array_equal(batch["topk_logprobs"].numpy(), arrays["topk_logprobs"][8:16])
    np.testing.assert_array_equal(batch["lse"].numpy(), arrays["lse"][8:16])
    assert fresh.store.redecoded == 1  # only the damaged copy; the intact lse copy was mapped as it was
    assert decoded_fmt.verify_decoded_copies(out, decode_dir) == []


def test_a_copy_without_a_record_is_decoded_again(cache_and_arrays):
    out, arrays, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0)
    cache.read(0, 3, arrays=["lse"])
    cache.store.wait_writes()  # the copy is written behind the read
    path = cache.store.path("lse", 0)
    before = path.stat()
    with open(path, "r+b") as file:  # as an older kdlib (or a write cut short) left it: no trailer
        file.truncate(os.path.getsize(path) - 12)
    _new_version(path, before)
    problems = decoded_fmt.verify_decoded_copies(out, decode_dir)
    assert len(problems) == 1 and "no crc32c record" in problems[0]
    fresh = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0)
    np.testing.assert_array_equal(fresh.read(0, 8, arrays=["lse"])["lse"].numpy(), arrays["lse"][0:8])
    fresh.store.wait_writes()
    assert fresh.store.redecoded == 1 and decoded_fmt.decoded_copy_problem(path) is None


def test_a_process_checks_a_copy_once_then_serves_from_its_map(cache_and_arrays):
    out, arrays, decode_dir = cache_and_arrays
    cache = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0)
    cache.read(0, 8, arrays=["lse"])
    cache.store.wait_writes()  # the copy is written behind the read
    path = cache.store.path("lse", 0)
    mtime_ns = path.stat().st_mtime_ns
    for _ in range(3):  # no re-check, no re-decode on the hot path
        np.testing.assert_array_equal(cache.read(0, 8, arrays=["lse"])["lse"].numpy(), arrays["lse"][0:8])
    assert path.stat().st_mtime_ns == mtime_ns and cache.store.redecoded == 0


def test_damaged_copy_and_damaged_stored_shard_is_a_corrupt_shard_error(cache_and_arrays):
    out, _, decode_dir = cache_and_arrays
    with kdlib.open_cache(out, decode_dir=decode_dir, readahead=0) as cache:
        cache.read(16, 21, arrays=["topk_ids"])
    copy = kdlib.open_cache(out, decode_dir=decode_dir).store.path("topk_ids", 2)
    _flip_byte(copy, _data_offset(copy) + 3)
    _flip_byte(out / fmt.shard_relpath("topk_ids", 2, 3), 10)
    fresh = kdlib.open_cache(out, decode_dir=decode_dir, readahead=0)
    with pytest.raises(fmt.CorruptShardError, match="'topk_ids' shard 2"):
        fresh.read(16, 21, arrays=["topk_ids"])
    assert not copy.exists()  # the damaged copy is gone; nothing decoded from the damaged stored shard


def test_verify_decoded_copies_needs_a_cache(tmp_path):
    with pytest.raises(fmt.CacheError, match="does not exist"):
        decoded_fmt.verify_decoded_copies(tmp_path / "missing", tmp_path)
