"""SwiGLU MLP with the hub's `gate_proj`/`up_proj`/`down_proj` names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.layers.linear import CpuGemm, FusedInputMajor, Linear


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): ERNIE's dense MLP, each routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype)
        self._gate_up: FusedInputMajor | None = None

    def fuse_for_cpu(self, gemm: CpuGemm) -> None:
        """Computes gate and up with one GEMM; call after `pack_for_cpu`."""
        if FusedInputMajor.applies([self.gate_proj, self.up_proj]):
            self._gate_up = FusedInputMajor([self.gate_proj, self.up_proj], gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            gate, up = self._gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
