"""One build per cache directory: the build lock, and how readers tell that a build is running.

A build process (each rank of a multi-process build on its own file) holds an exclusive ``flock`` on
``DIR/.kdcache-build/lock.rank{R}`` for as long as it runs. The kernel drops the lock when the process dies,
SIGKILL included, so a lock can never go stale: the file left behind by a killed build is just a file, and
the next build takes it over. The file's content (JSON: pid, host, rank, world size, start time) names the
holder in messages, and tells a starting rank whether the other held locks belong to its own build.

One build per directory, not per rank: a starting process takes its rank's lock, then refuses if any other
rank's lock is held by a build with another world size (or, for a single-process build, by anything at
all). Starters take these steps one at a time, under the short-lived ``lock.start`` guard (held for
milliseconds, removed by whoever holds it last), so each sees the others' locks with their content written:
two starters can never both go ahead unless they are ranks of one build.

Readers (``kdcache info``/``verify``, ``open_cache``) call :func:`build_lock_holder`: it probes each rank's
file with a non-blocking shared lock and releases it at once. A probe can overlap a build's start by
microseconds, so :func:`acquire_build_lock` retries briefly before it decides another build holds the lock.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from cache_server.format import storage

__all__ = [
    "BUILD_STATE_DIR",
    "BuildLock",
    "BuildLockedError",
    "ObjectBuildLock",
    "acquire_build_lock",
    "build_lock_holder",
    "is_lock_file",
]

BUILD_STATE_DIR = ".kdcache-build"
_LOCK_PREFIX = "lock.rank"
_GUARD_NAME = "lock.start"  # serializes starting builds (see the module docstring)
# How long a starting build keeps retrying a lock that a reader's probe may hold for an instant.
_ACQUIRE_RETRY_S = 1.0


class BuildLockedError(Exception):
    """Another ``kdcache build`` process holds a lock of this directory (its rank's, or another build's)."""

    def __init__(self, cache_dir: Path, holder: str, why: str = "") -> None:
        self.cache_dir = cache_dir
        self.holder = holder
        super().__init__(
            f"another `kdcache build` is already writing {str(cache_dir)!r} ({holder}){why}; wait for it to "
            "finish or stop it, then rerun this command (a killed build's lock is released by the OS, so a "
            "rerun resumes it)"
        )


class BuildLock:
    """A held build lock; release it with :meth:`release` or by leaving the ``with`` block."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "BuildLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_lock_file(name: str) -> bool:
    """Whether a file name in the build-state directory is one of this module's lock files (never delete one:
    a running build may hold it)."""
    return name.startswith(_LOCK_PREFIX) or name == _GUARD_NAME


def _lock_path(cache_dir: Path, rank: int) -> Path:
    return cache_dir / BUILD_STATE_DIR / f"{_LOCK_PREFIX}{rank}"


def _holder_info(raw: bytes) -> dict | None:
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _describe(raw: bytes) -> str:
    info = _holder_info(raw)
    try:
        return (f"pid {info['pid']} on host {info['host']}, rank {info['rank']} of {info['world_size']}, "
                f"started {info['started_at']}")
    except (KeyError, TypeError):
        return "holder unknown"


def _still_at(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one unlinked while we waited for its lock)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _open_lock_file(path: Path) -> int:
    """Open (creating) a lock file, and its directory, which a finishing build may remove meanwhile."""
    for _ in range(100):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(errno.ENOENT, "the build-state directory keeps disappearing", str(path.parent))


def _busy(exc: OSError) -> bool:
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)


def _lock_exclusive(path: Path, wait: bool) -> int:
    """An fd of the file at ``path`` with an exclusive lock on it; with ``wait=False`` retry for up to
    ``_ACQUIRE_RETRY_S`` (a reader's probe), then raise the ``BlockingIOError`` of a lock held elsewhere."""
    fd = _open_lock_file(path)
    deadline = time.monotonic() + _ACQUIRE_RETRY_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                os.close(fd)
                raise
            time.sleep(0.05)
            continue
        if _still_at(fd, path):
            return fd
        # The holder removed the file we waited on (builds clean up after themselves): lock the current one.
        os.close(fd)
        fd = _open_lock_file(path)


def _unlink_held(fd: int, path: Path) -> None:
    """Remove the lock file we hold (whoever waits on it then finds it gone and locks a new one)."""
    if _still_at(fd, path):
        os.unlink(path)


def _conflict(cache_dir: Path, rank: int, world_size: int) -> BuildLockedError | None:
    """The error for another build's lock held in ``cache_dir`` (None if every other held lock is a rank
    of this build, i.e. has this world size, and this build has several ranks)."""
    state_dir = cache_dir / BUILD_STATE_DIR
    for name in sorted(os.listdir(state_dir)):
        if not name.startswith(_LOCK_PREFIX) or name == f"{_LOCK_PREFIX}{rank}":
            continue
        raw = _held_content(state_dir / name)
        if raw is None:
            continue
        info = _holder_info(raw) or {}
        if world_size == 1 or info.get("world_size") != world_size:
            mine = "as a single process" if world_size == 1 else f"with --world-size {world_size}"
            return BuildLockedError(cache_dir, _describe(raw),
                                    f"; a build {mine} cannot share the directory with it")
    return None


def acquire_build_lock(cache_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> BuildLock:
    """Take the build lock of ``cache_dir`` for ``rank``; raise :class:`BuildLockedError` if another build holds
    a lock of the directory.

    Creates ``cache_dir/.kdcache-build/`` if needed. Ranks of one multi-process build (the same world size)
    lock different files and never refuse each other; anything else that holds a lock of the directory,
    another build of this rank included, makes this one refuse.
    """
    if storage.is_url(cache_dir):
        return _acquire_object_lock(storage.open_store(cache_dir), rank, world_size)  # type: ignore[return-value]
    cache_dir = Path(cache_dir)
    path = _lock_path(cache_dir, rank)
    guard_path = cache_dir / BUILD_STATE_DIR / _GUARD_NAME
    guard = _lock_exclusive(guard_path, wait=True)
    try:
        try:
            fd = _lock_exclusive(path, wait=False)
        except OSError as exc:
            if not _busy(exc):
                raise
            raise BuildLockedError(cache_dir, _describe(_read_lock_file(path))) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "rank": rank,
            "world_size": world_size,
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info, sort_keys=True).encode(), 0)
        conflict = _conflict(cache_dir, rank, world_size)
        if conflict is not None:
            _unlink_held(fd, path)
            os.close(fd)
            raise conflict
        return BuildLock(path, fd)
    finally:
        _unlink_held(guard, guard_path)
        os.close(guard)


def _read_lock_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(4096)
    except OSError:
        return b""


def _held_content(path: Path) -> bytes | None:
    """The content of the lock file at ``path`` if a build holds its lock, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if _busy(exc):
                return os.pread(fd, 4096, 0)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def build_lock_holder(cache_dir: str | os.PathLike) -> str | None:
    """A description of a running build of ``cache_dir`` (pid, host, rank, start), or None if none runs."""
    state_dir = Path(cache_dir) / BUILD_STATE_DIR
    try:
        names = sorted(p for p in os.listdir(state_dir) if p.startswith(_LOCK_PREFIX))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    for name in names:
        raw = _held_content(state_dir / name)
        if raw is not None:
            return _describe(raw)
    return None


# ------------------------------------------------------------------ object stores: a lock object, no flock


class ObjectBuildLock:
    """A build lock on an object store: the object ``PREFIX/.kdcache-build/lock.rank{R}`` (pid, host, start).

    Object stores have no flock, so this lock is advisory and checked, not enforced: a starting build reads
    the lock objects, refuses if one belongs to another live build, then writes its own (a small race window
    remains between two builds that start within the same second). A build killed without releasing its lock
    leaves the object behind: a rerun on the same host takes it over when that pid is gone; from another host
    it is refused with the object's name (delete it once you know that build is dead).
    """

    def __init__(self, store: "storage.ObjectStore", relpath: str) -> None:
        self.store = store
        self.relpath = relpath
        self.path = store.child_url(relpath)
        self._held = True

    def release(self) -> None:
        if self._held:
            self.store.delete([self.relpath])
            self._held = False

    def __enter__(self) -> "ObjectBuildLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_alive(info: dict) -> bool | None:
    """True/False for a holder on this host (its pid runs or not); None for another host (unknown)."""
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def _acquire_object_lock(store: "storage.ObjectStore", rank: int, world_size: int) -> ObjectBuildLock:
    mine = f"{BUILD_STATE_DIR}/{_LOCK_PREFIX}{rank}"
    for relpath in store.list(BUILD_STATE_DIR):
        if not relpath.rsplit("/", 1)[-1].startswith(_LOCK_PREFIX):
            continue
        try:
            raw = store.read_bytes(relpath)
        except FileNotFoundError:
            continue
        info = _holder_info(raw) or {}
        alive = _holder_alive(info)
        if alive is False or (relpath != mine and world_size > 1 and info.get("world_size") == world_size):
            continue  # a dead holder on this host (taken over), or another rank of this build
        how = ("it may still be running on another host: object stores have no flock, so if that build is "
               f"dead, delete the lock object {store.child_url(relpath)} and rerun") if alive is None else "running"
        raise BuildLockedError(store.description, _describe(raw), f"; {how}")  # type: ignore[arg-type]
    info = {"pid": os.getpid(), "host": socket.gethostname(), "rank": rank, "world_size": world_size,
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    store.write_bytes(mine, json.dumps(info, sort_keys=True).encode())
    return ObjectBuildLock(store, mine)
