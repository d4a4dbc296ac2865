"""The manifest: canonical bytes, parsing, and the one validation every reader, the server and verify rely on.

A cache is finished exactly when ``DIR/manifest.json`` exists (the build writes it last, atomically). Its
bytes are canonical JSON (:func:`manifest_bytes`), so the same cache always has the same manifest hash, which
names its decoded copies. :func:`validate_manifest` checks everything code downstream indexes into (the
fields, their types, the array table, the shard table and how they agree with each other), so that a damaged
or hand-edited manifest is one clear :class:`CacheError` instead of a KeyError deep inside a reader.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from cache_server.format import storage
from cache_server.format.build_lock import BUILD_STATE_DIR, build_lock_holder
from cache_server.format.errors import CacheError
from cache_server.format.layout import (
    CODEC_PRESETS,
    DEFAULT_CODEC,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    CacheLayout,
)

__all__ = [
    "FORMAT_NAME",
    "MANIFEST_NAME",
    "manifest_bytes",
    "parse_manifest",
    "validate_manifest",
    "read_manifest_bytes",
    "read_object_manifest",
    "load_manifest",
    "layout_from_manifest",
    "format_fields",
    "TEACHER_TAILS",
    "teacher_tail",
]

FORMAT_NAME = "kdcache"
MANIFEST_NAME = "manifest.json"

# Array names become path components (and URL parts on the server): no separators, no dot-files.
_ARRAY_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_XXH3_128_RE = re.compile(r"^[0-9a-f]{32}$")
_POSITIVE_INT_FIELDS = ("num_sequences", "seq_len", "vocab_size", "shard_seqs", "chunk_seqs", "num_shards")
_OPTIONAL_STR_FIELDS = ("codec", "logprob_codec", "tool_version", "created_at", "alignment", "dataset_fingerprint")
_OPTIONAL_DICT_FIELDS = ("layout", "build_args", "stats", "teacher", "dataset", "tokenizer", "provenance")
# What a cache knows about the teacher mass outside its stored ids (docs/FORMAT.md, "provenance"): "exact"
# (a full-vocabulary lse was stored: every kdcache build), "implied" (1 - sum of the stored probabilities,
# as exact as the source's full-vocabulary normalization), "none" (the source renormalized over its k ids).
TEACHER_TAILS = ("exact", "implied", "none")


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """Canonical manifest bytes: UTF-8 JSON, sorted keys, 2-space indent, trailing newline."""
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def parse_manifest(raw: bytes, source: str = "manifest") -> dict[str, Any]:
    """Parse manifest bytes and validate them with :func:`validate_manifest`.

    Args:
        raw: the manifest file's bytes.
        source: where the bytes came from (a path or URL), named in errors.

    Returns:
        The manifest as a dict.

    Raises:
        CacheError: the bytes are not JSON, not a kdcache manifest, of another format version, or malformed.
    """
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(
            f"{source} is not valid JSON ({exc}); the cache is damaged: copy it again from an intact source "
            "or rebuild it"
        ) from exc
    validate_manifest(manifest, source)
    return manifest


def validate_manifest(manifest: Any, source: str = "manifest") -> CacheLayout:
    """Check everything a reader, the server and ``kdcache verify`` rely on; return the layout it describes.

    Checked: ``format`` and ``format_version``; the required integer fields (positive integers, not floats or
    booleans); the types of the optional fields; that the layout they describe is valid (top-k within the
    vocabulary, shards a multiple of chunks, temperatures positive and not 1); ``num_shards`` equal to
    ceil(num_sequences / shard_seqs); the ``arrays`` table naming exactly the layout's arrays, with safe names,
    their shapes and dtypes; the ``layout`` block (when present) agreeing with the top-level fields; and the
    ``shards`` table holding, for every array, ``num_shards`` entries of ``{"sha256": 64 hex digits,
    "nbytes": positive int}``. Unknown extra fields are allowed (readers ignore them).

    Args:
        manifest: a parsed manifest (normally from :func:`parse_manifest`).
        source: where it came from (a path or URL), named in errors.

    Returns:
        The :class:`CacheLayout` the manifest describes.

    Raises:
        CacheError: naming the first problem found.
    """
    _check_format(manifest, source)
    _check_field_types(manifest, source)
    try:
        layout = _layout_from_manifest(manifest)
    except ValueError as exc:
        raise _malformed(source, f"its layout is invalid ({exc})") from exc
    _check_arrays(manifest, layout, source)
    _check_shards(manifest, layout, source)
    return layout


def read_manifest_bytes(cache_dir: str | os.PathLike, *, during_build: bool = False) -> bytes:
    """The exact bytes of ``DIR/manifest.json`` of a finished cache that no build is writing.

    Every local reader goes through here (``load_manifest``, ``open_cache``, ``kdcache serve``): a directory
    a ``kdcache build`` is running on is refused, naming the build, even when it has a manifest, because the
    build may be rewriting its shards (a repair) or about to replace the cache. A directory without a
    manifest is an unfinished build or not a cache at all; the error says which, and what to do.

    Args:
        cache_dir: the cache directory.
        during_build: skip the running-build check; only for the build itself, which holds the lock.

    Raises:
        CacheError: the directory is missing, a file, being built, or without a manifest.
    """
    if storage.is_url(cache_dir):
        return read_object_manifest(storage.open_store(cache_dir))
    cache_dir = Path(cache_dir)
    if not cache_dir.exists():
        raise CacheError(f"cache directory {str(cache_dir)!r} does not exist")
    if not cache_dir.is_dir():
        raise CacheError(f"{str(cache_dir)!r} is a file, not a cache directory")
    path = cache_dir / MANIFEST_NAME
    holder = None if during_build else build_lock_holder(cache_dir)
    if holder is not None:
        state = f"has no {MANIFEST_NAME} yet" if not path.exists() else "is not opened"
        raise CacheError(
            f"{str(cache_dir)!r} {state}: a `kdcache build` is running on it ({holder}) and may be writing "
            "its shards; wait for that build to finish (it writes the manifest last), then try again"
        )
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _no_manifest_error(cache_dir) from None
    except OSError as exc:
        raise CacheError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from exc


def load_manifest(cache_dir: str | os.PathLike, *, during_build: bool = False) -> dict[str, Any]:
    """Read and validate ``DIR/manifest.json`` (see :func:`read_manifest_bytes` for what is refused).

    Raises:
        CacheError: the directory is missing, a file, being built, without a manifest, or its manifest is
            unusable.
    """
    raw = read_manifest_bytes(cache_dir, during_build=during_build)
    if storage.is_url(cache_dir):
        return parse_manifest(raw, source=storage.open_store(cache_dir).child_url(MANIFEST_NAME))
    return parse_manifest(raw, source=str(Path(cache_dir) / MANIFEST_NAME))


def read_object_manifest(store: storage.ObjectStore) -> bytes:
    """The manifest object's bytes; without it, say whether the prefix holds an unfinished build or nothing.

    An object store has no flock, so a build that runs (or was killed) is known only by its objects: the
    manifest is written last, so a prefix without one is never read as a cache, whatever else it holds.
    """
    try:
        return store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        pass
    state = store.list(BUILD_STATE_DIR)
    if state or store.list("zarr.json"):
        journaled = sum(1 for name in state if name.startswith(f"{BUILD_STATE_DIR}/shards/"))
        locks = [name for name in state if name.rsplit("/", 1)[-1].startswith("lock.rank")]
        running = (f"; a build lock object is present ({locks[0].rsplit('/', 1)[-1]}): a build may be running "
                   "now, or was killed") if locks else ""
        raise CacheError(
            f"{store.description} has no {MANIFEST_NAME}: unfinished build ({journaled} shards journaled{running}); "
            "rerun the same kdcache build command to resume it (it writes only the missing shards, then the "
            "manifest last)"
        )
    raise CacheError(f"{store.description} has no {MANIFEST_NAME}: it is not a kdcache cache (make one with "
                     f"`kdcache build ... --out {store.description}`)")


def layout_from_manifest(manifest: Mapping[str, Any]) -> CacheLayout:
    """The layout a manifest describes; a malformed manifest is a CacheError, not a KeyError/ValueError."""
    try:
        return _layout_from_manifest(manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"the manifest's layout fields are malformed ({type(exc).__name__}: {exc}); "
                         "the cache is damaged: copy it again from an intact source or rebuild it") from exc


def _target_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The layout's target-kind fields from the manifest's ``targets`` object (absent: a top-k cache)."""
    targets = manifest.get("targets")
    if targets is None or targets.get("kind") == "topk":
        return {}
    return {
        "targets": str(targets["kind"]),
        "samples": int(targets["samples"]),
        "sample_slots": int(targets["slots"]),
        "sample_temperature": float(targets["sample_temperature"]),
        "sample_logprobs": "sample_logprobs" in manifest["arrays"],
    }


def _logprob_dtype(manifest: Mapping[str, Any]) -> str:
    """The stored log-prob dtype (a sample cache without sample_logprobs records it only in ``layout``)."""
    arrays = manifest["arrays"]
    for name in ("topk_logprobs", "sample_logprobs"):
        if name in arrays:
            return str(arrays[name]["dtype"])
    return str((manifest.get("layout") or {}).get("logprob_dtype", "float16"))


def _layout_from_manifest(manifest: Mapping[str, Any]) -> CacheLayout:
    return CacheLayout(
        num_sequences=int(manifest["num_sequences"]),
        seq_len=int(manifest["seq_len"]),
        topk=int(manifest["topk"]),
        vocab_size=int(manifest["vocab_size"]),
        temperatures=tuple(float(t) for t in manifest.get("temperatures", [])),
        logprob_dtype=_logprob_dtype(manifest),
        **_target_fields(manifest),
        shard_seqs=int(manifest["shard_seqs"]),
        chunk_seqs=int(manifest["chunk_seqs"]),
        codec=str(manifest.get("codec", DEFAULT_CODEC)),
        format_version=int(manifest["format_version"]),
        logprob_codec=str(manifest.get("logprob_codec", "exact")),
        offsets="token_doc" in manifest["arrays"],
    )


def format_fields(layout: CacheLayout) -> dict[str, Any]:
    """The manifest fields that say how shards are stored: ``format_version`` and, only for a lossy log-prob
    codec, ``logprob_codec`` (an exact cache's manifest keeps the fields it always had)."""
    fields: dict[str, Any] = {"format_version": layout.format_version}
    if layout.logprob_codec != "exact":
        fields["logprob_codec"] = layout.logprob_codec
    return fields


def teacher_tail(manifest: Mapping[str, Any]) -> str:
    """What the cache knows of the teacher mass outside its stored ids: one of :data:`TEACHER_TAILS`.

    A cache without ``provenance`` (every ``kdcache build``) stores the full-vocabulary lse: ``"exact"``.
    An imported cache records in ``provenance.tail`` what its source allowed (``kdcache import``).
    """
    return str((manifest.get("provenance") or {}).get("tail", "exact"))


def _no_manifest_error(cache_dir: Path) -> CacheError:
    where = f"{str(cache_dir)!r} has no {MANIFEST_NAME}"
    if (cache_dir / "zarr.json").exists() or (cache_dir / BUILD_STATE_DIR).exists():
        return CacheError(
            f"{where}: unfinished build: rerun the same kdcache build command to resume it (no build is "
            "running on it now; a rerun with the same arguments writes only the missing shards)"
        )
    return CacheError(f"{where}: it is not a kdcache cache (make one with `kdcache build ... --out DIR`)")


def _malformed(source: str, problem: str) -> CacheError:
    return CacheError(
        f"{source} is malformed: {problem}; the cache is damaged: copy it again from an intact source or "
        "rebuild it"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_format(manifest: Any, source: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{source} is not a kdcache manifest (missing \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if not _is_int(version) or version not in FORMAT_VERSIONS:
        readable = " and ".join(str(v) for v in FORMAT_VERSIONS)
        raise CacheError(
            f"{source} has format_version {version!r}, but this kdcache reads only versions {readable}; "
            "upgrade kdcache (pip install -U kdcache) or rebuild the cache with this version"
        )


def _check_field_types(manifest: Mapping[str, Any], source: str) -> None:
    for key in (*_POSITIVE_INT_FIELDS, "arrays", "shards"):
        if key not in manifest:
            raise _malformed(source, f"it lacks the required field {key!r}")
    for key in _POSITIVE_INT_FIELDS:
        value = manifest[key]
        if not _is_int(value) or value <= 0:
            raise _malformed(source, f"field {key!r} must be a positive integer, got {value!r}")
    if "topk" not in manifest or not _is_int(manifest["topk"]) or manifest["topk"] < 0:
        raise _malformed(source, f"field 'topk' must be a non-negative integer, got {manifest.get('topk')!r}")
    _check_targets_object(manifest.get("targets", {"kind": "topk"}), source)
    for key in _OPTIONAL_STR_FIELDS:
        if key in manifest and not isinstance(manifest[key], str):
            raise _malformed(source, f"field {key!r} must be a string, got {manifest[key]!r}")
    for key in _OPTIONAL_DICT_FIELDS:
        if key in manifest and not isinstance(manifest[key], dict):
            raise _malformed(source, f"field {key!r} must be an object, got {type(manifest[key]).__name__}")
    if manifest.get("codec", DEFAULT_CODEC) not in CODEC_PRESETS:
        raise _malformed(source, f"codec {manifest['codec']!r} is not one of {sorted(CODEC_PRESETS)}")
    temperatures = manifest.get("temperatures", [])
    if not isinstance(temperatures, list) or not all(_is_number(t) and math.isfinite(t) for t in temperatures):
        raise _malformed(source, f"field 'temperatures' must be a list of numbers, got {temperatures!r}")
    for key, value in manifest.get("stats", {}).items():
        if value is not None and not _is_number(value):
            raise _malformed(source, f"stats field {key!r} must be a number, got {value!r}")
    _check_teachers(manifest.get("teachers", []), source)
    if "provenance" in manifest and manifest["provenance"].get("tail", "exact") not in TEACHER_TAILS:
        tail = manifest["provenance"]["tail"]
        raise _malformed(source, f"provenance.tail must be one of {TEACHER_TAILS}, got {tail!r}")
    _check_array_table_types(manifest["arrays"], source)


def _check_teachers(teachers: Any, source: str) -> None:
    """``teachers`` (multi-teacher and merged caches only): one object per teacher with its positive weight."""
    if not isinstance(teachers, list) or not all(
            isinstance(t, dict) and _is_number(t.get("weight")) and t["weight"] > 0 for t in teachers):
        raise _malformed(source, "field 'teachers' must be a list of objects, each with a positive 'weight'")


def _check_array_table_types(arrays: Any, source: str) -> None:
    if not isinstance(arrays, dict):
        raise _malformed(source, f"field 'arrays' must be an object, got {type(arrays).__name__}")
    for name, entry in arrays.items():
        if not _ARRAY_NAME_RE.match(name):
            raise _malformed(source, f"it lists an array named {name!r}, which is not a safe file name")
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
                and all(_is_int(n) and n >= 0 for n in entry["shape"])):
            raise _malformed(source, f"array {name!r} must be {{\"shape\": [ints], \"dtype\": str}}, got {entry!r}")
    if "topk_logprobs" not in arrays and "sample_ids" not in arrays:
        raise _malformed(source, "its 'arrays' table has neither 'topk_logprobs' nor 'sample_ids'")


_TARGETS_FIELDS = {"kind": str, "samples": int, "slots": int, "sample_temperature": (int, float)}


def _check_targets_object(targets: Any, source: str) -> None:
    """The ``targets`` object: present only for kinds other than topk, with typed fields (the layout checks
    their values)."""
    if not isinstance(targets, dict):
        raise _malformed(source, f"field 'targets' must be an object, got {type(targets).__name__}")
    if targets.get("kind") == "topk":
        return
    for key, kind in _TARGETS_FIELDS.items():
        value = targets.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _malformed(source, f"targets.{key} must be a {getattr(kind, '__name__', 'number')}, got {value!r}")


def _check_arrays(manifest: Mapping[str, Any], layout: CacheLayout, source: str) -> None:
    if manifest["num_shards"] != layout.num_shards:
        raise _malformed(
            source,
            f"num_shards is {manifest['num_shards']}, but {layout.num_sequences} sequences in shards of "
            f"{layout.shard_seqs} make {layout.num_shards}",
        )
    expected = {
        spec.name: {"shape": list(spec.shape(layout.num_sequences)), "dtype": spec.dtype.name}
        for spec in layout.arrays()
    }
    arrays = manifest["arrays"]
    if set(arrays) != set(expected):
        raise _malformed(
            source,
            f"its arrays {sorted(arrays)} are not the ones its layout implies {sorted(expected)}",
        )
    for name, want in expected.items():
        have = {"shape": arrays[name]["shape"], "dtype": arrays[name]["dtype"]}
        if have != want:
            raise _malformed(source, f"array {name!r} is recorded as {have}, but the layout implies {want}")
    recorded_layout = manifest.get("layout")
    if recorded_layout is not None:
        derived = dataclasses.asdict(layout)
        derived["temperatures"] = list(layout.temperatures)
        for key, value in recorded_layout.items():
            if key in derived and value != derived[key]:
                raise _malformed(source, f"layout.{key} is {value!r}, but the top-level fields say {derived[key]!r}")


def _check_shards(manifest: Mapping[str, Any], layout: CacheLayout, source: str) -> None:
    shards = manifest["shards"]
    if not isinstance(shards, dict):
        raise _malformed(source, f"field 'shards' must be an object, got {type(shards).__name__}")
    if set(shards) != set(manifest["arrays"]):
        raise _malformed(
            source, f"its shard table covers arrays {sorted(shards)}, but its arrays are {sorted(manifest['arrays'])}"
        )
    for name, entries in shards.items():
        if not isinstance(entries, list) or len(entries) != layout.num_shards:
            count = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise _malformed(source, f"array {name!r} lists {count} shards, expected {layout.num_shards}")
        for index, entry in enumerate(entries):
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("sha256"), str)
                and _SHA256_RE.match(entry["sha256"])
                and _is_int(entry.get("nbytes"))
                and entry["nbytes"] > 0
                and (entry.get("xxh3_128") is None
                     or (isinstance(entry["xxh3_128"], str) and _XXH3_128_RE.match(entry["xxh3_128"])))
            ):
                raise _malformed(
                    source,
                    f"array {name!r} shard {index} must be {{\"sha256\": 64 lowercase hex digits, \"nbytes\": "
                    f"positive int[, \"xxh3_128\": 32 lowercase hex digits]}}, got {entry!r}",
                )
