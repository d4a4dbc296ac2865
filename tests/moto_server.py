"""A real moto S3 server in a subprocess on 127.0.0.1, for tests: ``MotoServer``, and the script it runs.

The script (``python tests/moto_server.py --port P [--bucket B] [--seed-dir DIR --seed-prefix B/PREFIX]``)
creates the buckets and, with ``--seed-dir``, uploads every file under DIR into the moto backend BEFORE it
binds the port (moto keeps its state in memory: a restarted server starts empty, so a test that restarts the
endpoint mid-read seeds the new one with the objects the old one held, and no client ever sees it empty).
It prints ``ready`` once the port answers.

``MotoServer.env()`` is what a client needs: dummy credentials and ``AWS_ENDPOINT_URL`` (botocore, and so
s3fs, read it), so subprocesses (``kdcache build``, ``kdcache serve``) reach the same endpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["MotoServer", "free_port", "CREDENTIALS"]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """``moto`` S3 on 127.0.0.1:``port`` in a subprocess. Use as a context manager; ``stop()`` then ``start()``
    restarts it on the same port (``seed_dir``/``seed_prefix``: objects the new server starts with)."""

    def __init__(self, bucket: str = "kdcache-test", port: int | None = None) -> None:
        self.bucket = bucket
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, seed_dir: Path | None = None, seed_prefix: str = "", timeout_s: float = 60.0) -> "MotoServer":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--port", str(self.port), "--bucket", self.bucket]
        if seed_dir is not None:
            cmd += ["--seed-dir", str(seed_dir), "--seed-prefix", seed_prefix]
        env = {**os.environ, **CREDENTIALS}
        env.pop("AWS_ENDPOINT_URL", None)
        # A file, not a pipe: the server logs every request, and a pipe nobody reads would fill and block it.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            self._log.seek(0)
            if b"\nready\n" in b"\n" + self._log.read():
                return self
            time.sleep(0.05)
        self._log.seek(0)
        output = self._log.read().decode(errors="replace")[-4000:]
        self.stop()
        raise RuntimeError("moto server did not start:\n" + output)

    def stop(self) -> None:
        """SIGKILL the server (its in-memory state is lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        self.proc = None

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(port: int, bucket: str, seed_dir: str | None, seed_prefix: str) -> None:
    os.environ.update(CREDENTIALS)
    import boto3
    from moto import mock_aws
    from moto.server import ThreadedMotoServer

    mock = mock_aws()
    mock.start()
    client = boto3.client("s3", region_name="us-east-1")
    buckets = {bucket} | ({seed_prefix.split("/", 1)[0]} if seed_dir else set())
    for name in sorted(buckets):
        client.create_bucket(Bucket=name)
    if seed_dir:
        seed_bucket, _, prefix = seed_prefix.partition("/")
        for path in sorted(Path(seed_dir).rglob("*")):
            if path.is_file():
                key = "/".join(p for p in (prefix.strip("/"), path.relative_to(seed_dir).as_posix()) if p)
                client.put_object(Bucket=seed_bucket, Key=key, Body=path.read_bytes())
    mock.stop(remove_data=False)  # the backend keeps the objects; the server below serves them
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", default="kdcache-test")
    parser.add_argument("--seed-dir", default=None)
    parser.add_argument("--seed-prefix", default="")
    args = parser.parse_args()
    _serve(args.port, args.bucket, args.seed_dir, args.seed_prefix)
