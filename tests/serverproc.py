"""A real ``python -m cache_server serve`` uvicorn subprocess on a free 127.0.0.1 port, for tests/benchmarks.

The server is started with ``--port 0`` and the port is read from its ``listening on`` line, so no other
process can take the port between choosing and binding it; a restart reuses that port.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import httpx

__all__ = ["ServerProcess", "free_port", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
LISTENING_RE = re.compile(r"kdcache serve: listening on http://127\.0\.0\.1:(\d+)/v1 ")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """Start ``kdcache serve CACHES --port 0 [--token-file F] [extra]`` and wait until /healthz answers.

    Use as a context manager. ``kill()`` sends SIGKILL; ``start()`` again restarts on the same port (or on
    ``port`` when given).
    """

    def __init__(self, caches: Sequence[str], *, token: str | None = None, token_dir: Path | None = None,
                 extra_args: Sequence[str] = (), port: int | None = None, startup_timeout_s: float = 30.0) -> None:
        self.caches = [str(c) for c in caches]
        self.token = token
        self.extra_args = list(extra_args)
        self.port: int | None = port  # known once the server printed it
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.token_file: Path | None = None
        if token is not None:
            if token_dir is None:
                raise ValueError("token_dir is required with a token")
            self.token_file = Path(token_dir) / "token.txt"
            self.token_file.write_text(token + "\n")
            os.chmod(self.token_file, 0o600)
        fd, log_path = tempfile.mkstemp(prefix="kdcache-serve-", suffix=".log", dir=token_dir)
        os.close(fd)
        self.log_path = Path(log_path)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cache_url(self, name: str) -> str:
        return f"{self.base_url}/v1/caches/{name}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "cache_server", "serve", *self.caches, "--host", "127.0.0.1",
               "--port", str(self.port or 0)]
        if self.token_file is not None:
            cmd += ["--token-file", str(self.token_file)]
        return cmd + self.extra_args

    def start(self) -> "ServerProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if getattr(self, "_log", None) is not None:
            self._log.close()  # a restart after kill()
        self._log = open(self.log_path, "ab")
        log_start = self._log.tell()
        self.proc = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.port is None:
                with open(self.log_path, "rb") as log:
                    log.seek(log_start)
                    match = LISTENING_RE.search(log.read().decode(errors="replace"))
                if match is None:
                    time.sleep(0.05)
                    continue
                self.port = int(match[1])
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not answer /healthz within {self.startup_timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, connections drop mid-stream."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
