"""The C kernels are built where a compiler exists."""

from __future__ import annotations

import sys

import pytest

from pdserve.engine.kernels import moe_cpu, paged_attention_cpu, quant_cpu, rms_norm_cpu


@pytest.mark.parametrize(
    "kernel",
    [moe_cpu, paged_attention_cpu, quant_cpu, rms_norm_cpu],
    ids=lambda m: m.__name__.rsplit(".", 1)[-1],
)
def test_kernel_is_built_on_linux(kernel):
    # The extensions are optional at install so that a machine without a compiler still
    # installs; here (and in CI) a compiler exists, so a missing kernel is a build failure.
    if sys.platform != "linux":
        pytest.skip("built and required on Linux only")
    assert kernel.available()
