"""The RMSNorm C kernel against a float64 reference and torch's op, and where the layer uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.kernels import rms_norm_cpu
from pdserve.engine.layers.norm import RMSNorm

needs_kernel = pytest.mark.skipif(not rms_norm_cpu.available(), reason="RMSNorm CPU kernel not built")


def reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.double()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()).float()


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 256), (5, 256), (33, 256), (3, 7), (2, 3, 1000)])
def test_matches_a_float64_reference_as_closely_as_torch(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * 3
    w = torch.randn(shape[-1], generator=gen)
    got = rms_norm_cpu.rms_norm(x, w, 1e-5)
    want = reference(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch_error = (F.rms_norm(x, (shape[-1],), w, 1e-5) - want).abs().max().item()
    # Rounding only: within a few ulps of the exact result, as torch's own op is.
    assert (got - want).abs().max().item() <= max(4 * torch_error, 1e-6 * want.abs().max().item())


@needs_kernel
def test_eps_counts_and_zero_rows_stay_finite():
    assert rms_norm_cpu.rms_norm(torch.ones(0, 16), torch.ones(16), 1e-5).shape == (0, 16)
    x = torch.zeros(2, 16)
    w = torch.ones(16)
    assert torch.equal(rms_norm_cpu.rms_norm(x, w, 1e-5), torch.zeros(2, 16))
    x[1] = 1e-3
    got = rms_norm_cpu.rms_norm(x, w, 1.0)  # eps dominates: y = x / sqrt(1e-6 + 1)
    torch.testing.assert_close(got[1], torch.full((16,), 1e-3 / (1 + 1e-6) ** 0.5))


def test_supports_only_contiguous_fp32_cpu_rows_of_the_weights_length():
    w = torch.ones(8)
    assert rms_norm_cpu.supports(torch.ones(3, 8), w) == rms_norm_cpu.available()
    assert not rms_norm_cpu.supports(torch.ones(3, 8, dtype=torch.bfloat16), w)
    assert not rms_norm_cpu.supports(torch.ones(8, 3).t(), w)  # not contiguous
    assert not rms_norm_cpu.supports(torch.ones(3, 7), w)  # another length
    assert not rms_norm_cpu.supports(torch.ones(3, 8), w.double())
    with pytest.raises(ValueError, match="contiguous fp32 CPU"):
        rms_norm_cpu.rms_norm(torch.ones(3, 7), w, 1e-5)


@needs_kernel
def test_the_layer_runs_the_kernel_on_fp32_and_torch_on_the_rest(monkeypatch):
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64, generator=torch.Generator().manual_seed(1))
    calls = []
    kernel = rms_norm_cpu.try_rms_norm

    def counted(*args):  # counts the calls the kernel ran (None: it declined them)
        out = kernel(*args)
        if out is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(rms_norm_cpu, "try_rms_norm", counted)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-6))
    assert calls == [1]
    norm.to(torch.bfloat16)
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16 and calls == [1]  # bf16: the torch path
    torch.testing.assert_close(out.float(), reference(x, norm.weight.float(), 1e-6), atol=0.05, rtol=0.02)
