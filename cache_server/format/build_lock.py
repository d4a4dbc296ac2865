"""One build per cache directory: the build lock, and how readers tell that a build is running.

A build process (each rank of a multi-process build on its own file) holds an exclusive ``flock`` on
``DIR/.kdcache-build/lock.rank{R}`` for as long as it runs. The kernel drops the lock when the process dies,
SIGKILL included, so a lock can never go stale: the file left behind by a killed build is just a file, and
the next build takes it over. The file's content (JSON: pid, host, rank, world size, start time) is only
there to name the holder in messages; whether a build runs is decided by the lock alone.

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

__all__ = [
    "BUILD_STATE_DIR",
    "BuildLock",
    "BuildLockedError",
    "acquire_build_lock",
    "build_lock_holder",
]

BUILD_STATE_DIR = ".kdcache-build"
_LOCK_PREFIX = "lock.rank"
# How long a starting build keeps retrying a lock that a reader's probe may hold for an instant.
_ACQUIRE_RETRY_S = 1.0


class BuildLockedError(Exception):
    """Another ``kdcache build`` process holds the lock on this directory (and rank)."""

    def __init__(self, cache_dir: Path, holder: str) -> None:
        self.cache_dir = cache_dir
        self.holder = holder
        super().__init__(
            f"another `kdcache build` is already writing {str(cache_dir)!r} ({holder}); wait for it to finish "
            "or stop it, then rerun this command (a killed build's lock is released by the OS, so a rerun "
            "resumes it)"
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


def _lock_path(cache_dir: Path, rank: int) -> Path:
    return cache_dir / BUILD_STATE_DIR / f"{_LOCK_PREFIX}{rank}"


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        return (f"pid {info['pid']} on host {info['host']}, rank {info['rank']} of {info['world_size']}, "
                f"started {info['started_at']}")
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _still_at(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one unlinked while we waited for its lock)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def acquire_build_lock(cache_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> BuildLock:
    """Take the build lock of ``cache_dir`` for ``rank``; raise :class:`BuildLockedError` if another holds it.

    Creates ``cache_dir/.kdcache-build/`` if needed. Ranks of one multi-process build lock different files,
    so they never refuse each other; two builds of the same rank do.
    """
    cache_dir = Path(cache_dir)
    path = _lock_path(cache_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + _ACQUIRE_RETRY_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _still_at(fd, path):
                break
            # A finishing build removed the file we waited on (it cleans up after itself): lock the current one.
            os.close(fd)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                holder = _describe(os.pread(fd, 4096, 0))
                os.close(fd)
                raise BuildLockedError(cache_dir, holder) from None
            time.sleep(0.05)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "rank": rank,
        "world_size": world_size,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info, sort_keys=True).encode(), 0)
    return BuildLock(path, fd)


def build_lock_holder(cache_dir: str | os.PathLike) -> str | None:
    """A description of a running build of ``cache_dir`` (pid, host, rank, start), or None if none runs."""
    state_dir = Path(cache_dir) / BUILD_STATE_DIR
    try:
        names = sorted(p for p in os.listdir(state_dir) if p.startswith(_LOCK_PREFIX))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    for name in names:
        try:
            fd = os.open(state_dir / name, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    return _describe(os.pread(fd, 4096, 0))
                raise
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return None
