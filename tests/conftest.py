"""Shared pytest fixtures."""

from __future__ import annotations

import subprocess
import time
from typing import Callable

import pytest
import torch

SMALL_FS_BYTES = 256 << 10  # the small_fs tmpfs: a few small shards fit, not a whole test cache


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Run a module's small-shape tests on one torch thread: with several OpenMP threads each op ends in a
    barrier that costs more than the op itself when the machine is busy (the loss tests ran ~9x slower at
    load 3 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def small_fs(tmp_path):
    """A tmpfs of SMALL_FS_BYTES mounted at tmp_path/small; yields (mount point, remount(size_bytes))."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")

    def remount(size_bytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount_point)], check=True)

    try:
        yield mount_point, remount
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def eventually(predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    """Whether ``predicate()`` becomes true within ``timeout_s`` (polled): for effects a reader finishes in the
    background, such as the decoded copies it writes behind its reads, checked from outside the reader."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
