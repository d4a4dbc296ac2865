"""A real ``python -m cache_server serve`` uvicorn subprocess on a free 127.0.0.1 port, for tests/benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx

__all__ = ["ServerProcess", "free_port", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """Start ``kdcache serve CACHES --port P [--token-file F] [extra]`` and wait until /healthz answers.

    Use as a context manager. ``kill()`` sends SIGKILL; ``start()`` again restarts on the same port.
    """

    def __init__(self, caches: Sequence[str], *, token: str | None = None, token_dir: Path | None = None,
                 extra_args: Sequence[str] = (), port: int | None = None, startup_timeout_s: float = 30.0) -> None:
        self.caches = [str(c) for c in caches]
        self.token = token
        self.extra_args = list(extra_args)
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.token_file: Path | None = None
        if token is not None:
            if token_dir is None:
                raise ValueError("token_dir is required with a token")
            self.token_file = Path(token_dir) / "token.txt"
            self.token_file.write_text(token + "\n")
            os.chmod(self.token_file, 0o600)
        self.log_path = Path(token_dir or "/tmp") / f"kdcache-serve-{self.port}.log"

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
               "--port", str(self.port)]
        if self.token_file is not None:
            cmd += ["--token-file", str(self.token_file)]
        return cmd + self.extra_args

    def start(self) -> "ServerProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
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
