"""Native CPU kernels (C extensions built at install) for the decode hot path, with Python wrappers."""

from collections.abc import Callable

import torch

# How a kernel wrapper gets threads: `parallel(fn, max_parts)` runs fn(part, parts) for every
# part at once, at most `max_parts` (None: as many as there are threads). `CpuGemm.parallel` is one.
CpuParallel = Callable[[Callable[[int, int], None], int | None], None]


def fp32_on_cpu(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is fp32 in CPU memory: what the C kernels read by address."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
