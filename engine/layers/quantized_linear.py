"""`x @ W.T` for a weight-only quantized W: which path runs for which batch and device.

- CPU, decode-sized (at most `KERNEL_MAX_ROWS` rows): the C kernel reads the packed bytes and
  multiplies in registers; no fp32 copy of W exists at any time.
- CPU, more rows: the C kernel decodes a block of weight rows at a time into a small fp32
  block that stays in cache while every token row multiplies it (a GEMM microkernel; on
  AVX-512 q4/q8 with the token rows in the vector lanes), the rows split over the engine's
  threads. Each weight is decoded once per call, not once per 4 rows.
- Elsewhere (a GPU, or a CPU without the C kernels): dequantized in torch, then `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.kernels import CpuParallel, quant_cpu
from pdserve.engine.quantization.formats import QuantizedWeight

# Up to this many rows the packed kernel wins over decode-once blocks (measured in DECISIONS.md,
# 2026-12-06: [M, 2560] x [2560, 8192] wint4, equal at M = 8, blocks 1.3-2x faster from M = 12).
KERNEL_MAX_ROWS = 8


def quantized_matmul(
    w: QuantizedWeight, x: torch.Tensor, parallel: CpuParallel | None = None
) -> torch.Tensor:
    """x [..., K] @ w.T → [..., N] in x's dtype (fp32 accumulation on the CPU paths)."""
    rows = x.reshape(-1, w.in_features)
    if x.device.type == "cpu" and x.dtype == torch.float32 and quant_cpu.available():
        if rows.shape[0] <= KERNEL_MAX_ROWS:
            out = quant_cpu.matmul(w, rows, parallel)
        else:
            out = quant_cpu.matmul_dequantized(w, rows, parallel)
    else:
        out = F.linear(rows, w.dequantize().to(device=x.device, dtype=x.dtype))
    return out.view(*x.shape[:-1], w.out_features)
