"""Shared fixtures of the native-kernel tests."""

from __future__ import annotations

import pytest

from pdserve.engine.layers.linear import CpuGemm


@pytest.fixture(scope="module")
def gemm():
    """The engine's thread pool (two threads), whose `parallel` the kernels split their work over."""
    g = CpuGemm(2, "openblas")
    yield g
    g.close()
