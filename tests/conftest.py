"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread during each test: the suite runs on shared CPUs, and some expected
    values were measured single-threaded. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    with _single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One intra-op thread for a whole test module, its module-scoped fixtures included."""
    with _single_thread():
        yield
