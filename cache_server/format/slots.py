"""Format v2's per-position slot transform: canonical order, id-sorted storage and the q8 log-prob codec.

Shape notation::

    R  rows: positions of one shard, flattened (sequences × T)
    W  slots per position (K for the top-k group, the sample slot width for the sample group)

A *slot group* is an ids array and its companion value arrays, which share the slot axis (docs/FORMAT.md,
"Format v2: id-sorted slots")::

    topk     topk_ids [R, W]    with topk_logprobs                   canonical order: descending log-prob
    sample   sample_ids [R, W]  with sample_counts, sample_logprobs  canonical order: descending count

Ties go to the ascending id; sample padding slots (count 0, id 0) come last. Format v2 stores each position's
slots by ascending id instead (sample padding last, its ids repeating the last real id so that their deltas
are 0), every companion permuted the same way, the ids array delta-coded along the flattened chunk by Zarr's
``numcodecs.delta`` filter. The stored form is the same whatever order the writer was given the slots in, and
decoding restores the canonical order with one stable sort per position on the stored order key: ascending id
within equal keys is then exactly the tie rule.

Order keys are unsigned integers that sort like the values: IEEE floats mapped to their total order (so -0
sorts below +0; NaN above +inf, below -inf for negative NaNs), counts and q8 codes as they are. A per-row sort
of ``(key << 16) | slot`` (uint32, or uint64 for float32 keys) gives the permutation in one ``numpy.sort``.

q8 (opt-in, lossy) stores ``topk_logprobs`` as uint8 [R, B + W]: the position's largest log-prob h in the
logprob dtype's little-endian bytes (B = 2 or 4), then per slot (id order) the code
``c = clip(rint(L · sqrt((h − lp) / Q)), 0, L)`` with Q = Q8_RANGE_NATS, L = Q8_LEVELS; decoded log-prob =
``h − Q · (c / L)²`` (float32, rounded to the logprob dtype). The square-root grid is fine near the head, where
the probability mass is, and coarse in the tail (the KL cost of an error grows with the entry's probability).
Its canonical order is ascending code, ties ascending id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from cache_server.format.layout import ArraySpec, CacheLayout

__all__ = [
    "Q8_RANGE_NATS",
    "Q8_LEVELS",
    "SlotGroup",
    "SLOT_GROUPS",
    "slot_group",
    "group_arrays",
    "delta_coded",
    "stored_spec",
    "to_storage",
    "from_storage",
    "canonical_order",
    "stored_form",
    "canonicalize",
]

# q8: log-probs more than Q8_RANGE_NATS below the position's head are stored as exactly that far; the codes
# 0..Q8_LEVELS lie on a square-root grid (docs/FORMAT.md, Appendix A: on the trained stdlib teacher these keep
# KL(q‖q̂) ≈ 4e-4 nats mean at under 40 B/token; 255 levels cost ~3 B/token more for KL ≈ 5e-5).
Q8_RANGE_NATS = 24.0
Q8_LEVELS = 95
_SLOT_BITS = 16  # slot indices in the low bits of the sort key: W ≤ 65,536
_FLOAT_BITS = {2: np.uint16, 4: np.uint32}


@dataclass(frozen=True)
class SlotGroup:
    """An ids array, its companion value arrays (same slot axis), and the array whose values order the slots."""

    name: str
    ids: str
    values: tuple[str, ...]
    order_by: str  # descending values of this array order the slots canonically
    padded: bool  # slots whose order_by value is 0 are padding (sample group): last, id 0

    def members(self) -> tuple[str, ...]:
        """The ids array first, then the value arrays."""
        return (self.ids, *self.values)


SLOT_GROUPS = (
    SlotGroup("topk", "topk_ids", ("topk_logprobs",), order_by="topk_logprobs", padded=False),
    SlotGroup("sample", "sample_ids", ("sample_counts", "sample_logprobs"), order_by="sample_counts", padded=True),
)


def slot_group(layout: CacheLayout, array: str) -> SlotGroup | None:
    """The slot group an array belongs to in this layout's stored form, or None (v1 caches: always None)."""
    if layout.format_version < 2:
        return None
    for group in SLOT_GROUPS:
        if array in group.members():
            return group
    return None


def group_arrays(layout: CacheLayout, array: str) -> tuple[str, ...]:
    """Every array whose stored shard decoding ``array`` reads, ``array`` first: its whole slot group (those
    members the layout holds), or just ``array`` when it is in none."""
    group = slot_group(layout, array)
    if group is None:
        return (array,)
    present = {spec.name for spec in layout.arrays()}
    return (array, *(name for name in group.members() if name != array and name in present))


def delta_coded(layout: CacheLayout, array: str) -> bool:
    """Whether the stored array carries the ``numcodecs.delta`` filter (the ids array of a v2 slot group)."""
    group = slot_group(layout, array)
    return group is not None and group.ids == array


def _q8(layout: CacheLayout, array: str) -> bool:
    return layout.format_version >= 2 and layout.logprob_codec == "q8" and array == "topk_logprobs"


def stored_spec(layout: CacheLayout, spec: ArraySpec) -> ArraySpec:
    """The array as its Zarr metadata declares it: the decoded spec, except q8 ``topk_logprobs`` (uint8 [T, B + K])."""
    if not _q8(layout, spec.name):
        return spec
    T, K = spec.trailing_shape
    return ArraySpec(spec.name, np.dtype("uint8"), (T, spec.dtype.itemsize + K))


# ------------------------------------------------------------------------------------------------- order keys
def _flip_positive(bits: np.ndarray, float_bits: int | None = None) -> np.ndarray:
    """IEEE bits <-> a key that sorts ascending where the floats sort descending (an involution).

    Negative floats keep their bits (a larger magnitude sorts later); positive ones flip every bit but the
    sign (so they come before every negative, the largest first): ``bits ^ ((sign − 1) & 0x7F..F)``.
    ``float_bits`` (default: the dtype's width) is the float's width when it sits in the low bits of a wider
    unsigned array.
    """
    utype = bits.dtype.type
    shift = (float_bits or 8 * bits.dtype.itemsize) - 1
    return bits ^ (((bits >> utype(shift)) - utype(1)) & utype((1 << shift) - 1))


def _descending_key(values: np.ndarray) -> np.ndarray:
    """An unsigned key that sorts ascending where ``values`` sorts descending (floats: IEEE total order)."""
    if values.dtype.kind == "f":
        return _flip_positive(np.ascontiguousarray(values).view(_FLOAT_BITS[values.dtype.itemsize]))
    return ~values  # unsigned counts: the largest count gets the smallest key


def _sort_pairs(key: np.ndarray, ids: np.ndarray, ids_out: np.ndarray | None = None) -> np.ndarray:
    """Per row, sort (key, id) pairs by key then id with ONE sort of packed integers.

    Used for the top-k group, whose ids are unique per position: no slot permutation and no gather needed.

    Returns:
        The sorted packed keys (key in the high bits); the sorted ids are written to ``ids_out`` when given.
    """
    key_bits, id_bits = 8 * key.dtype.itemsize, 8 * ids.dtype.itemsize
    wide = np.uint32 if key_bits + id_bits <= 32 else np.uint64
    packed = np.left_shift(key, wide(id_bits), dtype=wide)
    np.bitwise_or(packed, ids, out=packed)
    packed.sort(axis=-1)
    if ids_out is not None:
        np.copyto(ids_out, packed, casting="unsafe")  # the low id_bits (the cast truncates)
    return np.right_shift(packed, wide(id_bits), out=packed)


def _sort_by_key(key: np.ndarray) -> np.ndarray:
    """Per row, the slot permutation [R, W] (int64) that sorts ``key`` ascending, ties by ascending slot."""
    width = key.shape[-1]
    if width > 1 << _SLOT_BITS:
        raise ValueError(f"{width} slots per position is more than format v2 orders ({1 << _SLOT_BITS})")
    wide = np.uint32 if key.dtype.itemsize <= 2 else np.uint64
    packed = (key.astype(wide) << wide(_SLOT_BITS)) | np.arange(width, dtype=wide)
    packed.sort(axis=-1)
    return (packed & wide((1 << _SLOT_BITS) - 1)).astype(np.int64)


def _gather(values: np.ndarray, order: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``take_along_axis(values, order, -1)`` for 2-D arrays, as one flat ``take`` (far cheaper)."""
    rows, width = values.shape
    flat = order + (np.arange(rows, dtype=np.int64) * width)[:, None]
    result = np.take(values.reshape(-1), flat.reshape(-1))
    if out is None:
        return result.reshape(rows, width)
    out.reshape(-1)[...] = result
    return out


def canonical_order(ids: np.ndarray, order_values: np.ndarray) -> np.ndarray:
    """The canonical slot permutation [R, W] of rows in ANY order: descending ``order_values``, ties ascending id.

    Args:
        ids: [R, W] unsigned ids.
        order_values: [R, W] the group's ``order_by`` values (log-probs or counts).

    Returns:
        int64 [R, W]: the slot indices of each row in canonical order.
    """
    by_id = _sort_by_key(ids)
    ranked = _sort_by_key(_descending_key(_gather(order_values, by_id)))
    return _gather(by_id, ranked)


# ------------------------------------------------------------------------------------------------- q8 codec
def _q8_encode(logprobs: np.ndarray) -> np.ndarray:
    """[R, W] log-probs -> uint8 [R, B + W]: the head's bytes, then each slot's code."""
    head = logprobs.max(axis=-1, keepdims=True)
    rel = np.nan_to_num(head.astype(np.float64) - logprobs.astype(np.float64), nan=np.inf)  # NaN: the floor
    codes = np.clip(np.rint(Q8_LEVELS * np.sqrt(np.clip(rel, 0.0, Q8_RANGE_NATS) / Q8_RANGE_NATS)), 0, Q8_LEVELS)
    codes = codes.astype(np.uint8)
    head_bytes = np.ascontiguousarray(head.astype(logprobs.dtype.newbyteorder("<"))).view(np.uint8)
    return np.concatenate([head_bytes, codes], axis=-1)


def _q8_split(stored: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [R, B + W] -> (head [R, 1] in ``dtype``, codes [R, W])."""
    nbytes = dtype.itemsize
    head = np.ascontiguousarray(stored[:, :nbytes]).view(dtype.newbyteorder("<")).astype(dtype)
    return head, stored[:, nbytes:]


def _q8_values(head: np.ndarray, codes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    grid = np.float32(Q8_RANGE_NATS) * np.square(np.arange(Q8_LEVELS + 1, dtype=np.float32) / np.float32(Q8_LEVELS))
    return (head.astype(np.float32) - grid[np.minimum(codes, Q8_LEVELS)]).astype(dtype)


# ------------------------------------------------------------------------------------------------- transform
def to_storage(layout: CacheLayout, group: SlotGroup, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stored form of one shard's group arrays ({name: [n, T, W]}, any slot order) -> {name: stored [n, ...]}.

    Slots by ascending id (padding last, its ids repeating the last real id), every companion permuted alike;
    q8 ``topk_logprobs`` become their uint8 form. Delta coding is left to the Zarr filter.
    """
    ids = arrays[group.ids]
    n, T, W = ids.shape
    flat = {name: np.ascontiguousarray(a).reshape(n * T, W) for name, a in arrays.items()}
    id_key = flat[group.ids].astype(np.uint64)
    if group.padded:
        pad = flat[group.order_by] == 0
        id_key = id_key | (pad.astype(np.uint64) << np.uint64(40))  # padding after every real id (< 2^32)
    order = _sort_by_key(id_key)
    out = {name: _gather(a, order) for name, a in flat.items()}
    if group.padded:
        real = np.where(_gather(pad, order), 0, out[group.ids])
        out[group.ids] = np.maximum.accumulate(real, axis=-1).astype(ids.dtype)  # padding: delta 0
    if _q8(layout, "topk_logprobs") and "topk_logprobs" in out:
        out["topk_logprobs"] = _q8_encode(out["topk_logprobs"])
    return {name: a.reshape(n, T, -1) for name, a in out.items()}


def from_storage(
    layout: CacheLayout,
    group: SlotGroup,
    stored: dict[str, np.ndarray],
    outs: dict[str, np.ndarray],
) -> None:
    """Decode one shard's stored group arrays ({name: [R, stored width]}, delta already undone) into ``outs``
    ({name: [R, W]} of the decoded dtypes, any subset of the stored names), in canonical order."""
    if not group.padded:
        _topk_from_storage(layout, group, stored, outs)
        return
    key_source = stored[group.order_by]
    if _q8(layout, group.order_by):
        dtype = np.dtype(layout.logprob_dtype)
        head, codes = _q8_split(key_source, dtype)
        order = _sort_by_key(codes)  # ascending code = descending log-prob
    else:
        order = _sort_by_key(_descending_key(key_source))
    for name, out in outs.items():
        if name == "topk_logprobs" and _q8(layout, name):
            _gather(_q8_values(head, codes, dtype), order, out)
        elif name == group.ids and group.padded:
            ids = _gather(stored[name], order)
            counts = _gather(stored[group.order_by], order)
            out[...] = np.where(counts == 0, 0, ids)
        else:
            _gather(stored[name], order, out)


def _topk_from_storage(layout: CacheLayout, group: SlotGroup, stored: dict[str, np.ndarray],
                       outs: dict[str, np.ndarray]) -> None:
    """The top-k group's decode: one sort of packed (order key, id) per position gives ids and values."""
    source = stored[group.order_by]
    dtype = np.dtype(layout.logprob_dtype)
    q8 = _q8(layout, group.order_by)
    flip = False
    if q8:
        head, key = _q8_split(source, dtype)
        key = np.ascontiguousarray(key)
    else:
        key = np.ascontiguousarray(source).view(_FLOAT_BITS[source.dtype.itemsize])
        sign = key.dtype.type(1 << (8 * key.dtype.itemsize - 1))
        # Log-probs are (nearly always) all negative, whose bits already sort descending: skip the key map then.
        flip = bool(np.bitwise_and.reduce(key, axis=None) & sign == 0)
        key = _flip_positive(key) if flip else key
    ids_out = outs.get(group.ids)
    if group.ids in stored:
        if ids_out is None:
            ids_out = np.empty_like(stored[group.ids])
        packed = _sort_pairs(key, stored[group.ids], ids_out)
    else:  # the values alone: equal keys are equal values, so no tie rule is needed
        packed = np.sort(key, axis=-1)
    values_out = outs.get(group.order_by)
    if values_out is None:
        return
    if q8:
        values_out[...] = _q8_values(head, packed, dtype)
        return
    if flip:
        packed = _flip_positive(packed, 8 * key.dtype.itemsize)  # the key sits in the low bits now
    np.copyto(values_out.view(key.dtype), packed, casting="unsafe")


# ------------------------------------------------------------------------------------------------- whole shards
def stored_form(layout: CacheLayout, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every array of a shard ({name: [n, ...]}) as it is stored: v2 slot groups by ascending id (q8 applied),
    everything else (and every array of a v1 layout) as given. This is also what plain Zarr reads back."""
    out = {spec.name: np.asarray(arrays[spec.name]) for spec in layout.arrays()}
    for group in SLOT_GROUPS:
        if group.ids not in out or slot_group(layout, group.ids) is None:
            continue
        names = group_arrays(layout, group.ids)
        out.update(to_storage(layout, group, {name: out[name] for name in names}))
    return out


def canonicalize(layout: CacheLayout, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a reader decodes from a shard written with ``arrays``: slot groups in canonical order (q8 log-probs
    dequantized). For comparing build output, which may order fp16 ties differently, with decoded arrays."""
    stored = stored_form(layout, arrays)
    out = dict(stored)
    for group in SLOT_GROUPS:
        if group.ids not in out or slot_group(layout, group.ids) is None:
            continue
        names = group_arrays(layout, group.ids)
        n, T = np.shape(arrays[group.ids])[:2]
        decoded = {name: np.empty(np.shape(arrays[name]), np.asarray(arrays[name]).dtype) for name in names}
        from_storage(layout, group, {name: stored[name].reshape(n * T, -1) for name in names},
                     {name: a.reshape(n * T, -1) for name, a in decoded.items()})
        out.update(decoded)
    return out
