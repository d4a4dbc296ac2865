"""``kdcache serve`` as a context manager: a token, loopback, a free port, and a stop that always happens.

The server runs as a real subprocess (``python -m cache_server serve DIR --port 0 --token-file F``); its
port is read from the ``listening on`` line it prints. Leaving the ``with`` block by any route (normal end,
exception, Ctrl-C, SIGTERM through :func:`sigterm_raises`) stops it: SIGTERM, then SIGKILL after a grace
period, so no server process outlives the demo.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

__all__ = ["ServedCache", "serve_cache", "sigterm_raises", "write_token_file"]

REPO = Path(__file__).resolve().parents[1]
_LISTENING_RE = re.compile(r"kdcache serve: listening on (http://\S+)/v1 ")


class ServedCache:
    """A running server: ``url`` of the cache, its ``token``, the subprocess ``proc`` and its ``log_path``."""

    def __init__(self, url: str, token: str, proc: subprocess.Popen, log_path: Path) -> None:
        self.url, self.token, self.proc, self.log_path = url, token, proc, log_path


def write_token_file(path: Path) -> str:
    """A fresh random token written to ``path`` (mode 0600); returns the token."""
    token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def _wait_listening(proc: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    """The base URL from the server's ``listening on`` line, once /healthz answers."""
    deadline = time.monotonic() + timeout_s
    base = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kdcache serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if base is None:
            match = _LISTENING_RE.search(log_path.read_text(errors="replace"))
            base = match[1] if match else None
        if base is not None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                    return base
        time.sleep(0.05)
    raise RuntimeError(f"kdcache serve did not answer within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM (uvicorn shuts down cleanly), SIGKILL if it is still there after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


@contextlib.contextmanager
def serve_cache(cache_dir: Path, work_dir: Path, timeout_s: float = 60.0) -> Iterator[ServedCache]:
    """Serve ``cache_dir`` on 127.0.0.1 (free port) with a new token in ``work_dir/token.txt``.

    Yields:
        A :class:`ServedCache`; the server is stopped when the block is left, whatever the reason.
    """
    token = write_token_file(work_dir / "token.txt")
    log_path = work_dir / "serve.log"
    cmd = [sys.executable, "-m", "cache_server", "serve", str(cache_dir), "--host", "127.0.0.1", "--port", "0",
           "--token-file", str(work_dir / "token.txt")]
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        base = _wait_listening(proc, log_path, timeout_s)
        yield ServedCache(f"{base}/v1/caches/{cache_dir.name}", token, proc, log_path)
    finally:
        stop_server(proc)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C, so ``finally`` clauses run."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
