"""Format v2 (issue 10): id-sorted slot groups, their canonical decode, the q8 log-prob codec, v1 still read.

Real Zarr directories throughout; the v1 cache in tests/fixtures/v1_cache was written by the v1 writer
(tests/fixtures/make_v1_cache.py says how) and its expected arrays are stored beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_server import format as fmt
from cache_server.format import slots
from kdlib.data.open import open_cache
from tests.cachefactory import make_synthetic_cache, synthetic_arrays

FIXTURES = Path(__file__).parent / "fixtures"


def _raws(cache_dir: Path, layout: fmt.CacheLayout, names, shard_index: int) -> dict[str, bytes]:
    ndims = {spec.name: 1 + len(spec.trailing_shape) for spec in layout.arrays()}
    return {name: (cache_dir / fmt.shard_relpath(name, shard_index, ndims[name])).read_bytes() for name in names}


def _decode_all(cache_dir: Path, layout: fmt.CacheLayout) -> dict[str, np.ndarray]:
    out = {}
    for spec in layout.arrays():
        parts = []
        for i in range(layout.num_shards):
            raws = _raws(cache_dir, layout, fmt.decode_inputs(layout, spec.name), i)
            parts.append(fmt.decode_shard(raws[spec.name], spec, layout, i, companions=raws))
        out[spec.name] = np.concatenate(parts)
    return out


def _write(cache_dir: Path, layout: fmt.CacheLayout, arrays: dict[str, np.ndarray]) -> None:
    fmt.create_arrays(cache_dir, layout, attributes=fmt.group_attributes(layout))
    for i in range(layout.num_shards):
        a, b = layout.shard_range(i)
        fmt.write_shard(cache_dir, layout, i, {k: v[a:b] for k, v in arrays.items()})


def _shuffled_slots(arrays: dict[str, np.ndarray], names, seed: int = 0) -> dict[str, np.ndarray]:
    """The same slots in a random order per position (what a writer may be handed)."""
    shape = arrays[names[0]].shape
    perm = np.argsort(np.random.default_rng(seed).random(shape), axis=-1)
    return {**arrays, **{name: np.take_along_axis(arrays[name], perm, -1) for name in names}}


# ------------------------------------------------------------------------------------------------ v1 fixture
def test_v1_fixture_still_reads_with_its_values(tmp_path):
    cache = FIXTURES / "v1_cache"
    expected = np.load(FIXTURES / "v1_cache_expected.npz")
    manifest = fmt.load_manifest(cache)
    layout = fmt.layout_from_manifest(manifest)
    assert manifest["format_version"] == 1 and layout.format_version == 1
    assert fmt.decode_inputs(layout, "topk_ids") == ("topk_ids",)  # v1: every array decodes alone
    decoded = _decode_all(cache, layout)
    assert sorted(decoded) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(decoded[name], expected[name], err_msg=name)
    assert fmt.damaged_metadata(cache, layout) == {}  # v1 metadata (no delta filter) is what a v1 layout implies
    reader = open_cache(cache, decode_dir=tmp_path / "decoded")
    batch = reader.read(0, 12)
    for name in ("topk_ids", "topk_logprobs", "lse_t2"):
        np.testing.assert_array_equal(batch[name].numpy().astype(np.float64), expected[name].astype(np.float64))


# ------------------------------------------------------------------------------------------------ top-k group
@pytest.mark.parametrize("vocab_size,logprob_dtype", [(300, "float16"), (70_000, "float32"), (70_000, "float16")])
def test_v2_topk_round_trip_in_canonical_order_from_any_slot_order(tmp_path, vocab_size, logprob_dtype):
    layout = fmt.CacheLayout(num_sequences=11, seq_len=9, topk=7, vocab_size=vocab_size, temperatures=(2.0,),
                             logprob_dtype=logprob_dtype, shard_seqs=4, chunk_seqs=2)
    arrays = synthetic_arrays(11, 9, 7, vocab_size, (2.0,), seed=3, logprob_dtype=logprob_dtype)
    # fp16 ties: the build's fp32 order is not the canonical one everywhere; make a few ties on purpose too.
    arrays["topk_logprobs"][:, :, 3] = arrays["topk_logprobs"][:, :, 2]
    _write(tmp_path / "c", layout, _shuffled_slots(arrays, ("topk_ids", "topk_logprobs")))
    decoded = _decode_all(tmp_path / "c", layout)
    ids, lp = arrays["topk_ids"], arrays["topk_logprobs"]
    # The canonical order, computed directly: descending log-prob, ties ascending id.
    order = np.array([np.lexsort((i, -v.astype(np.float64))) for i, v in zip(ids.reshape(-1, 7), lp.reshape(-1, 7))])
    np.testing.assert_array_equal(decoded["topk_ids"].reshape(-1, 7), np.take_along_axis(ids.reshape(-1, 7), order, -1))
    np.testing.assert_array_equal(decoded["topk_logprobs"].reshape(-1, 7),
                                  np.take_along_axis(lp.reshape(-1, 7), order, -1))
    for name in ("input_ids", "lse", "lse_t2", "seq_nll", "seq_entropy"):
        np.testing.assert_array_equal(decoded[name], arrays[name])
    canonical = slots.canonicalize(layout, arrays)
    for name in decoded:
        np.testing.assert_array_equal(decoded[name], canonical[name])
    # Plain zarr reads the stored form: ids ascending per position, each value still beside its id.
    group = zarr.open_group(str(tmp_path / "c"), mode="r")
    z_ids, z_lp = group["topk_ids"][:], group["topk_logprobs"][:]
    assert (np.diff(z_ids.astype(np.int64), axis=-1) > 0).all()
    by_id = np.argsort(ids, axis=-1)
    np.testing.assert_array_equal(z_ids, np.take_along_axis(ids, by_id, -1))
    np.testing.assert_array_equal(z_lp, np.take_along_axis(lp, by_id, -1))
    meta = json.loads((tmp_path / "c" / "topk_ids" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert inner[0] == {"name": "numcodecs.delta", "configuration": {"dtype": layout.ids_dtype.str}}
    assert fmt.damaged_metadata(tmp_path / "c", layout) == {}


def test_v2_stored_bytes_do_not_depend_on_the_slot_order_given(tmp_path):
    layout = fmt.CacheLayout(num_sequences=6, seq_len=5, topk=4, vocab_size=50, shard_seqs=3, chunk_seqs=3)
    arrays = synthetic_arrays(6, 5, 4, 50, seed=5)
    _write(tmp_path / "a", layout, arrays)
    _write(tmp_path / "b", layout, _shuffled_slots(arrays, ("topk_ids", "topk_logprobs"), seed=9))
    for name in ("topk_ids", "topk_logprobs"):
        for i in range(layout.num_shards):
            assert _raws(tmp_path / "a", layout, [name], i) == _raws(tmp_path / "b", layout, [name], i)


def test_v2_stored_bytes_are_pinned(tmp_path):
    """The stored form is the spec (docs/FORMAT.md): exact bytes of a tiny uncompressed shard."""
    layout = fmt.CacheLayout(num_sequences=1, seq_len=2, topk=3, vocab_size=40, shard_seqs=1, chunk_seqs=1,
                             codec="none")
    arrays = {
        "input_ids": np.array([[1, 2]], np.uint16),
        "topk_ids": np.array([[[30, 4, 17], [9, 8, 7]]], np.uint16),
        "topk_logprobs": np.array([[[-0.5, -1.0, -2.0], [-1.0, -1.0, -3.0]]], np.float16),
        "lse": np.ones((1, 2), np.float32), "seq_nll": np.ones(1, np.float32),
        "seq_entropy": np.ones(1, np.float32),
    }
    _write(tmp_path / "c", layout, arrays)
    raw = _raws(tmp_path / "c", layout, ["topk_ids", "topk_logprobs"], 0)
    chunk_ids = np.frombuffer(raw["topk_ids"][:12], "<u2")
    chunk_lp = np.frombuffer(raw["topk_logprobs"][:12], "<f2")
    # ids by ascending id [4, 17, 30 | 7, 8, 9], delta-coded over the flattened chunk (mod 2^16).
    np.testing.assert_array_equal(chunk_ids, np.array([4, 13, 13, 7 - 30 + 65536, 1, 1], np.uint16))
    np.testing.assert_array_equal(chunk_lp, np.array([-1.0, -2.0, -0.5, -3.0, -1.0, -1.0], np.float16))
    decoded = _decode_all(tmp_path / "c", layout)
    np.testing.assert_array_equal(decoded["topk_ids"], [[[30, 4, 17], [8, 9, 7]]])  # tie -1.0: ascending id
    np.testing.assert_array_equal(decoded["topk_logprobs"], [[[-0.5, -1.0, -2.0], [-1.0, -1.0, -3.0]]])


def test_decoding_a_group_array_without_its_companion_says_what_to_pass(tmp_path):
    out, _ = make_synthetic_cache(tmp_path / "c")
    layout = fmt.layout_from_manifest(fmt.load_manifest(out))
    spec = next(s for s in layout.arrays() if s.name == "topk_ids")
    raw = _raws(out, layout, ["topk_ids"], 0)["topk_ids"]
    with pytest.raises(ValueError, match=r"needs the stored shard of \['topk_logprobs'\].*companions"):
        fmt.decode_shard(raw, spec, layout, 0)


def test_reader_decodes_a_v2_cache_to_canonical_batches(tmp_path):
    out, arrays = make_synthetic_cache(tmp_path / "c", num_sequences=20, seq_len=16, topk=4, vocab_size=100)
    layout = fmt.layout_from_manifest(fmt.load_manifest(out))
    canonical = slots.canonicalize(layout, arrays)
    reader = open_cache(out, decode_dir=tmp_path / "decoded")
    rows = np.array([19, 0, 7, 8])
    batch = reader.read(0, 20)
    reader.store.wait_writes()  # the copy of the shard this read waited for is written behind it
    for name in ("topk_ids", "topk_logprobs"):
        np.testing.assert_array_equal(batch[name].numpy()[rows].astype(np.float64),
                                      canonical[name][rows].astype(np.float64))
    # Decoding topk_ids published the group's other copy too (one sort per position for both).
    store_dir = next((tmp_path / "decoded").iterdir())
    assert sorted(p.name for p in (store_dir / "topk_logprobs").glob("*.npy")) == ["0.npy", "1.npy", "2.npy"]


# ------------------------------------------------------------------------------------------------ sample group
def _sample_arrays(n: int, T: int, W: int, V: int, draws: int, seed: int) -> dict[str, np.ndarray]:
    """Sample-group arrays as a sampler writes them: unique ids by descending count, padding (0, 0) last."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, T, W), np.uint16)
    counts = np.zeros((n, T, W), np.uint8)
    logprobs = np.zeros((n, T, W), np.float16)
    for r in range(n * T):
        p = rng.dirichlet(np.full(V, 0.3))
        uniq, cnt = np.unique(rng.choice(V, size=draws, p=p), return_counts=True)
        order = np.lexsort((uniq, -cnt))[:W]
        k = len(order)
        ids.reshape(-1, W)[r, :k] = uniq[order]
        counts.reshape(-1, W)[r, :k] = cnt[order]
        logprobs.reshape(-1, W)[r, :k] = np.log(p[uniq[order]])
    return {"sample_ids": ids, "sample_counts": counts, "sample_logprobs": logprobs}


def test_v2_sample_group_round_trip_with_padding(tmp_path):
    n, T, W = 5, 6, 8
    layout = fmt.CacheLayout(num_sequences=n, seq_len=T, topk=0, vocab_size=40, targets="sample", samples=12,
                             sample_slots=W, shard_seqs=2, chunk_seqs=1)
    arrays = synthetic_arrays(n, T, 1, 40, seed=1)
    arrays = {k: v for k, v in arrays.items() if not k.startswith("topk")}
    arrays.update(_sample_arrays(n, T, W, 40, draws=12, seed=2))
    assert (arrays["sample_counts"] == 0).any() and (arrays["sample_counts"] > 0).any()
    names = ("sample_ids", "sample_counts", "sample_logprobs")
    _write(tmp_path / "c", layout, _shuffled_slots(arrays, names))
    decoded = _decode_all(tmp_path / "c", layout)
    for name in arrays:
        np.testing.assert_array_equal(decoded[name], arrays[name], err_msg=name)
    group = zarr.open_group(str(tmp_path / "c"), mode="r")
    z_ids, z_counts = group["sample_ids"][:].astype(np.int64), group["sample_counts"][:]
    real = z_counts > 0
    assert (np.diff(z_ids, axis=-1) >= 0).all()  # ascending; padding repeats the last real id (delta 0)
    assert (np.where(real[..., 1:], np.diff(z_ids, axis=-1), 1) > 0).all()  # real ids strictly ascending
    assert not (real[..., 1:] & ~real[..., :-1]).any()  # padding last
    raws = _raws(tmp_path / "c", layout, names, 0)
    whole = fmt.decode_shard_group(raws, layout, 0)
    for name in names:
        np.testing.assert_array_equal(whole[name], arrays[name][:2])


# ------------------------------------------------------------------------------------------------ q8 codec
def _q8_reference(lp: np.ndarray) -> np.ndarray:
    """q8 as docs/FORMAT.md states it, per position, in float64: h − Q (c / L)², c = rint(L sqrt((h − lp) / Q))."""
    Q, L = slots.Q8_RANGE_NATS, slots.Q8_LEVELS
    h = lp.astype(np.float64).max(-1, keepdims=True)
    c = np.clip(np.rint(L * np.sqrt(np.clip(h - lp, 0, Q) / Q)), 0, L)
    return (h.astype(np.float32) - np.float32(Q) * np.square(c.astype(np.float32) / np.float32(L))).astype(lp.dtype)


def test_q8_stores_the_head_exactly_and_the_rest_on_its_grid(tmp_path):
    layout = fmt.CacheLayout(num_sequences=8, seq_len=10, topk=6, vocab_size=500, shard_seqs=4, chunk_seqs=2,
                             logprob_codec="q8")
    arrays = synthetic_arrays(8, 10, 6, 500, seed=4)
    arrays["topk_logprobs"][0, 0, 5] = -60.0  # beyond the range: clamped to head − Q8_RANGE_NATS
    _write(tmp_path / "c", layout, _shuffled_slots(arrays, ("topk_ids", "topk_logprobs")))
    meta = json.loads((tmp_path / "c" / "topk_logprobs" / "zarr.json").read_text())
    assert meta["data_type"] == "uint8" and meta["shape"] == [8, 10, 2 + 6]
    decoded = _decode_all(tmp_path / "c", layout)
    got = decoded["topk_logprobs"]
    assert got.dtype == np.float16 and got.shape == arrays["topk_logprobs"].shape
    np.testing.assert_array_equal(got[..., 0], arrays["topk_logprobs"][..., 0])  # the head is exact
    assert got[0, 0, -1] == np.float16(arrays["topk_logprobs"][0, 0, 0] - slots.Q8_RANGE_NATS)
    # Each stored id keeps its quantized value: compare per id with the reference quantizer.
    want_lp = _q8_reference(arrays["topk_logprobs"]).reshape(-1, 6)
    for r in range(8 * 10):
        want = dict(zip(arrays["topk_ids"].reshape(-1, 6)[r].tolist(), want_lp[r].tolist()))
        have = dict(zip(decoded["topk_ids"].reshape(-1, 6)[r].tolist(), got.reshape(-1, 6)[r].tolist()))
        assert want == have
    assert np.all(np.diff(got.astype(np.float32), axis=-1) <= 0)  # canonical: descending
    np.testing.assert_array_equal(got, slots.canonicalize(layout, arrays)["topk_logprobs"])


def test_q8_needs_format_v2_and_a_known_name():
    with pytest.raises(ValueError, match="needs format_version 2"):
        fmt.CacheLayout(num_sequences=1, seq_len=2, topk=1, vocab_size=4, format_version=1, logprob_codec="q8")
    with pytest.raises(ValueError, match="unknown logprob codec 'q4'"):
        fmt.CacheLayout(num_sequences=1, seq_len=2, topk=1, vocab_size=4, logprob_codec="q4")


def test_manifest_records_the_lossy_codec_and_reads_it_back():
    layout = fmt.CacheLayout(num_sequences=1, seq_len=2, topk=1, vocab_size=4, logprob_codec="q8")
    assert fmt.format_fields(layout) == {"format_version": 2, "logprob_codec": "q8"}
    exact = fmt.CacheLayout(num_sequences=1, seq_len=2, topk=1, vocab_size=4)
    assert fmt.format_fields(exact) == {"format_version": 2}  # an exact manifest keeps its fields


def test_v2_order_keys_follow_the_ieee_total_order_with_positive_values_and_zeros(tmp_path):
    """Log-probs ≥ 0 (rounding of a probability near 1) and ±0 take the general key path; float32 too."""
    for logprob_dtype in ("float16", "float32"):
        layout = fmt.CacheLayout(num_sequences=1, seq_len=2, topk=4, vocab_size=40, shard_seqs=1, chunk_seqs=1,
                                 logprob_dtype=logprob_dtype)
        lp = np.array([[[-1.0, 0.0, 0.25, -0.0], [-2.0, -1.0, -1.0, -3.0]]], logprob_dtype)
        arrays = {
            "input_ids": np.array([[1, 2]], np.uint16),
            "topk_ids": np.array([[[5, 6, 7, 8], [9, 3, 1, 2]]], np.uint16),
            "topk_logprobs": lp,
            "lse": np.ones((1, 2), np.float32), "seq_nll": np.ones(1, np.float32),
            "seq_entropy": np.ones(1, np.float32),
        }
        _write(tmp_path / logprob_dtype, layout, arrays)
        decoded = _decode_all(tmp_path / logprob_dtype, layout)
        np.testing.assert_array_equal(decoded["topk_ids"], [[[7, 6, 8, 5], [1, 3, 9, 2]]])
        got = decoded["topk_logprobs"]
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"),
                                      np.array([[[0.25, 0.0, -0.0, -1.0], [-1.0, -1.0, -2.0, -3.0]]],
                                               logprob_dtype).view(f"u{got.itemsize}"))


def test_decode_stored_shard_is_what_plain_zarr_reads(tmp_path):
    layout = fmt.CacheLayout(num_sequences=6, seq_len=5, topk=4, vocab_size=50, shard_seqs=3, chunk_seqs=3,
                             logprob_codec="q8")
    arrays = synthetic_arrays(6, 5, 4, 50, seed=2)
    _write(tmp_path / "c", layout, arrays)
    group = zarr.open_group(str(tmp_path / "c"), mode="r")
    for spec in layout.arrays():
        raws = [_raws(tmp_path / "c", layout, [spec.name], i)[spec.name] for i in range(layout.num_shards)]
        stored = np.concatenate([fmt.decode_stored_shard(raw, spec, layout, i) for i, raw in enumerate(raws)])
        np.testing.assert_array_equal(stored, group[spec.name][:])


def test_a_q8_cache_opens_and_reads_dequantized_canonical_batches(tmp_path):
    from cache_server.build.writer import CacheWriter

    layout = fmt.CacheLayout(num_sequences=10, seq_len=8, topk=5, vocab_size=200, shard_seqs=4, chunk_seqs=2,
                             logprob_codec="q8")
    arrays = synthetic_arrays(10, 8, 5, 200, seed=8)
    writer = CacheWriter(tmp_path / "c", layout, settings={}, manifest_fields=fmt.format_fields(layout))
    for i in writer.pending_shards():
        a, b = layout.shard_range(i)
        writer.write_shard(i, {k: v[a:b] for k, v in arrays.items()})
    writer.finalize()
    manifest = fmt.load_manifest(tmp_path / "c")
    assert manifest["logprob_codec"] == "q8" and fmt.layout_from_manifest(manifest) == layout
    assert manifest["arrays"]["topk_logprobs"] == {"dtype": "float16", "shape": [10, 8, 5]}  # the decoded form
    expected = slots.canonicalize(layout, arrays)
    batch = open_cache(tmp_path / "c", decode_dir=tmp_path / "decoded").read(0, 10)
    for name in ("topk_ids", "topk_logprobs"):
        np.testing.assert_array_equal(batch[name].numpy().astype(np.float64), expected[name].astype(np.float64))
    assert fmt.damaged_metadata(tmp_path / "c", layout) == {}


# --- the delta filter's inverse (format.shards.prefix_sum_wrapping): bit-identical to numpy's cumsum ----------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 63, 64, 65, 1000, 1024, 16 * 4097])
def test_prefix_sum_wrapping_equals_cumsum(dtype, n):
    from cache_server.format.shards import prefix_sum_wrapping

    rng = np.random.default_rng(n)
    items = rng.integers(0, np.iinfo(dtype).max, size=n, dtype=dtype, endpoint=True)  # wraps many times
    out = np.empty_like(items)
    got = prefix_sum_wrapping(items, out)
    np.testing.assert_array_equal(got, np.cumsum(items, dtype=dtype))
    assert got is out or n % 16 or n < 64
