"""What a build's output location holds (a directory or an object-store prefix), and what a build may do there.

The persistent state of a build (see ``writer.py`` for who writes it):

* ``OUT/.kdcache-build/settings.json``: the settings of an unfinished build (its resume key);
* ``OUT/.kdcache-build/shards/{i}.json``: one journal entry per finished shard;
* ``OUT/manifest.json``: a finished cache (written last);
* ``OUT/.kdcache-build/lock.rank{R}``: build locks (``cache_server.format.build_lock``), never deleted here.

``OUT`` may be an object-store URL (``s3://bucket/prefix``): the same names are objects there, and the
classification is made from the object listing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cache_server import format as fmt
from cache_server.build.assemble import layout_dict
from cache_server.format import storage
from cache_server.format.build_lock import BUILD_STATE_DIR, is_lock_file

__all__ = [
    "BuildStateError",
    "DirState",
    "JOURNAL_DIR",
    "SETTINGS_NAME",
    "STATE_DIR",
    "check_existing",
    "journal_entries",
    "read_dir_state",
]

STATE_DIR = BUILD_STATE_DIR
SETTINGS_NAME = "settings.json"
JOURNAL_DIR = "shards"


class BuildStateError(fmt.CacheError):
    """The output directory holds something a build must not touch (or a build with other settings)."""


@dataclass(frozen=True)
class DirState:
    """What an output directory holds, as far as a build is concerned.

    ``kind`` is one of: ``new`` (missing, empty, or holding only build locks), ``complete`` (a manifest),
    ``unfinished`` (settings.json of a build that has not finished), ``setup`` (a build killed while it
    created the metadata, before settings.json: safe to start over), ``foreign`` (anything else), ``file``.
    """

    path: Path | str  # a directory, or an object-store URL
    kind: str
    manifest: dict[str, Any] | None = None
    settings_blob: dict[str, Any] | None = None  # {"layout": ..., "settings": ...} of an unfinished build
    problem: str | None = None  # a "complete" cache whose manifest cannot be read: why


def _is_lock_file(path: Path) -> bool:
    return is_lock_file(path.name)  # build_lock's lock files: kept whenever the state is cleared


def _zarr_group_is_ours(out: Path) -> bool:
    try:
        attributes = json.loads((out / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attributes, dict) and "kdcache" in attributes


def read_dir_state(out_dir: str | os.PathLike) -> DirState:
    """Classify ``out_dir`` (a directory or an object-store URL) without changing anything (see :class:`DirState`)."""
    if storage.is_url(out_dir):
        return _object_dir_state(str(out_dir))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        return DirState(out, "file")
    if not out.exists():
        return DirState(out, "new")
    state_dir = out / STATE_DIR
    if (out / fmt.MANIFEST_NAME).exists():
        try:
            return DirState(out, "complete", manifest=fmt.load_manifest(out, during_build=True))
        except fmt.CacheError as exc:
            return DirState(out, "complete", problem=str(exc))
    if (state_dir / SETTINGS_NAME).exists():
        return DirState(out, "unfinished", settings_blob=json.loads((state_dir / SETTINGS_NAME).read_text()))
    others = [p for p in out.iterdir() if p.name != STATE_DIR]
    only_locks = not state_dir.exists() or all(_is_lock_file(p) for p in state_dir.iterdir())
    if not others and only_locks:
        return DirState(out, "new")
    if state_dir.is_dir() and (not others or _zarr_group_is_ours(out)):
        return DirState(out, "setup")
    return DirState(out, "foreign")


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "layout differs"
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5])


def check_existing(
    state: DirState,
    layout: fmt.CacheLayout | None = None,
    settings: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """What a build with ``layout``/``settings`` may do with ``state``; raise BuildStateError if nothing.

    Returns:
        ``new`` (create), ``resume`` (same unfinished build), ``complete`` (same finished cache),
        ``restart`` (wipe our own files first: ``--overwrite``, or an interrupted setup); with
        ``layout=None`` (settings not known yet) only the checks that need no settings are made, and the
        state's kind is returned.
    """
    where = storage.redact_url(state.path) if isinstance(state.path, str) else str(state.path)
    if state.kind == "file":
        raise BuildStateError(f"output path {where!r} is a file; pass a directory path to --out")
    if state.kind == "foreign":
        raise BuildStateError(
            f"{where!r} exists, is not empty and is not a kdcache cache; refusing to write into it "
            "(nothing was changed). Choose an empty or new --out directory"
        )
    if state.kind in ("new", "setup") or layout is None:
        return {"new": "new", "setup": "restart"}.get(state.kind, state.kind)
    settings = json.loads(json.dumps(dict(settings or {}), sort_keys=True))
    if state.kind == "complete" and state.problem is not None:
        if overwrite:
            return "restart"
        raise BuildStateError(
            f"{where!r} holds a cache whose manifest cannot be used ({state.problem}); without it the shards "
            "cannot be checked, so pass --overwrite to build the cache again from scratch (or copy an intact "
            "manifest.json back first)"
        )
    if state.kind == "complete":
        previous = state.manifest.get("build_args") or {}
        if previous == settings and state.manifest.get("layout") == layout_dict(layout) and not overwrite:
            return "complete"
        if overwrite:
            return "restart"
        raise BuildStateError(
            f"{where!r} already holds a finished cache built with different settings "
            f"({_diff(previous, settings)}); pass --overwrite to replace it, or choose another --out"
        )
    previous_blob = state.settings_blob or {}
    if previous_blob == {"layout": layout_dict(layout), "settings": settings}:
        return "resume"
    if overwrite:
        return "restart"
    raise BuildStateError(
        f"{where!r} holds an unfinished build with different settings "
        f"({_diff(previous_blob.get('settings', {}), settings)}); rerun with the original arguments to resume "
        "it, or pass --overwrite to start over"
    )


def journal_entries(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The journal entries of the shards an unfinished build has written (empty for anything else)."""
    if storage.is_url(out_dir):
        store = storage.open_store(str(out_dir))
        raws = store.read_many(store.list(f"{STATE_DIR}/{JOURNAL_DIR}/"))
        return [json.loads(raw) for _, raw in sorted(raws.items())]
    entries = []
    for path in sorted((Path(out_dir) / STATE_DIR / JOURNAL_DIR).glob("*.json")):
        try:
            entries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # removed by a finishing rank meanwhile
    return entries


def _object_dir_state(url: str) -> DirState:
    """:class:`DirState` of an object-store prefix, from its listing (the same rules as for a directory)."""
    store = storage.open_store(url)
    names = store.list()
    state = [n for n in names if n.startswith(f"{STATE_DIR}/")]
    others = [n for n in names if not n.startswith(f"{STATE_DIR}/")]
    if fmt.MANIFEST_NAME in names:
        try:
            return DirState(url, "complete", manifest=fmt.load_manifest(url))
        except fmt.CacheError as exc:
            return DirState(url, "complete", problem=str(exc))
    if f"{STATE_DIR}/{SETTINGS_NAME}" in names:
        return DirState(url, "unfinished", settings_blob=json.loads(store.read_bytes(f"{STATE_DIR}/{SETTINGS_NAME}")))
    if not others and all(is_lock_file(n.rsplit("/", 1)[-1]) for n in state):
        return DirState(url, "new")
    if state and (not others or _object_group_is_ours(store)):
        return DirState(url, "setup")
    return DirState(url, "foreign")


def _object_group_is_ours(store: storage.ObjectStore) -> bool:
    try:
        attributes = json.loads(store.read_bytes("zarr.json")).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attributes, dict) and "kdcache" in attributes
