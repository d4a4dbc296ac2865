"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Run a module's small-shape tests on one torch thread: with several OpenMP threads each op ends in a
    barrier that costs more than the op itself when the machine is busy (the loss tests ran ~9x slower at
    load 3 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
