"""`x @ W.T` for a weight-only quantized W: which path runs for which batch and device.

- CPU, decode-sized (at most `KERNEL_MAX_ROWS` rows): the C kernel reads the packed bytes and
  multiplies in registers; no fp32 copy of W exists at any time.
- CPU, prefill-sized: W is dequantized a block of rows at a time (in C) into a GEMM. Each block
  is small enough to stay in cache, and the GEMM's work grows with the rows while the decoding
  does not, so the decoding's share shrinks with the batch.
- Elsewhere (a GPU, or a CPU without the C kernels): dequantized in torch, then `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.kernels import CpuParallel, quant_cpu
from pdserve.engine.quantization.formats import QuantizedWeight

# Up to this many rows the kernel wins over dequantize + GEMM (measured in DECISIONS.md,
# 2026-12-05: the kernel decodes each weight once per 4 rows, the GEMM once per call).
KERNEL_MAX_ROWS = 16
# Weights per dequantized block: 1 MB of fp32, which stays in L2 while the GEMM reads it.
_BLOCK_WEIGHTS = 1 << 18


def quantized_matmul(
    w: QuantizedWeight, x: torch.Tensor, parallel: CpuParallel | None = None
) -> torch.Tensor:
    """x [..., K] @ w.T → [..., N] in x's dtype (fp32 accumulation on the CPU paths)."""
    rows = x.reshape(-1, w.in_features)
    if x.device.type == "cpu" and x.dtype == torch.float32 and quant_cpu.available():
        if rows.shape[0] <= KERNEL_MAX_ROWS:
            out = quant_cpu.matmul(w, rows, parallel)
        else:
            out = _blocked_gemm(w, rows.contiguous())
    else:
        out = F.linear(rows, w.dequantize().to(device=x.device, dtype=x.dtype))
    return out.view(*x.shape[:-1], w.out_features)


def _blocked_gemm(w: QuantizedWeight, rows: torch.Tensor) -> torch.Tensor:
    n = w.out_features
    step = max(16, _BLOCK_WEIGHTS // w.in_features)
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[:, start:stop] = torch.matmul(rows, w.dequantize((start, stop)).t())
    return out
