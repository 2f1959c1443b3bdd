"""RMSNorm of fp32 CPU rows through `rms_norm_cpu.c` (torch's own op costs ~20x the arithmetic).

The C kernel is optional at install; `supports()` says whether it was built and takes these
tensors. `layers/norm.py` keeps `F.rms_norm` for everything else (GPUs, bf16, no kernel).
"""

from __future__ import annotations

import torch

from pdserve.engine.kernels import fp32_on_cpu

try:
    from pdserve.engine.kernels import _rms_norm_cpu
except ImportError:  # built as an optional extension: no compiler at install time
    _rms_norm_cpu = None


def available() -> bool:
    """True when the C kernel was built and imports."""
    return _rms_norm_cpu is not None


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the kernel is built and takes these: contiguous fp32 CPU `x` and `weight` whose
    last dimension is `weight`'s length."""
    return (
        _rms_norm_cpu is not None
        and fp32_on_cpu(x, weight)
        and x.dim() >= 1
        and weight.dim() == 1
        and x.shape[-1] == weight.shape[0]
        and x.is_contiguous()
        and weight.is_contiguous()
    )


def try_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`x / sqrt(mean(x^2, -1) + eps) * weight`, a new tensor of x's shape; None when the kernel
    does not take these (see `supports`), checked once: the layer's path, two calls per layer."""
    if not supports(x, weight):
        return None
    out = torch.empty_like(x)
    n = weight.shape[0]
    _rms_norm_cpu.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same as `try_rms_norm`, raising ValueError where the kernel does not take these."""
    out = try_rms_norm(x, weight, eps)
    if out is None:
        raise ValueError(
            "rms_norm kernel: needs the built kernel, contiguous fp32 CPU x [..., N] and weight [N]"
        )
    return out
