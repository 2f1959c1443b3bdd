"""SwiGLU MLP with the hub's `gate_proj`/`up_proj`/`down_proj` names."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.layers.linear import CpuGemm, FusedInputMajor, FusedRowMajor, Linear, fuse_linears


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): ERNIE's dense MLP, each routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype)
        self._gate_up: FusedInputMajor | FusedRowMajor | None = None
        self._down_in_out: np.ndarray | None = None

    def fuse(self, gemm: CpuGemm, prepack: bool = False) -> None:
        """Computes gate and up with one matmul, and the whole MLP in numpy once packed for the
        CPU's fp32 path; with `prepack`, large weights also get oneDNN-prepacked copies (for MLPs
        that see whole batches, not routed experts). Call after `pack_for_cpu`."""
        self._gate_up = fuse_linears([self.gate_proj, self.up_proj], gemm, prepack)
        if prepack:
            self.down_proj.prepack()
        down = self.down_proj
        if isinstance(self._gate_up, FusedInputMajor) and down.gemm is not None and down.bias is None:
            self._down_in_out = down.weight.t().numpy()  # a view: packing made it [in, out]

    @property
    def numpy_ready(self) -> bool:
        """True once `forward_numpy` can run (fp32 weights packed for the CPU)."""
        return self._down_in_out is not None

    def forward_numpy(self, a: np.ndarray) -> np.ndarray:
        """The MLP on rows `a` [M, H] (fp32, contiguous), in numpy.

        On the CPU a decode step's MLPs are a few microseconds of arithmetic each, and torch's
        per-op dispatch costs as much again; a mixture-of-experts layer runs one MLP per chosen
        expert, so the difference grows with the number of tokens in the step.
        """
        assert isinstance(self._gate_up, FusedInputMajor) and self._down_in_out is not None
        gate_up = torch.from_numpy(self._gate_up.matmul(a))
        gate, up = gate_up.chunk(2, dim=-1)
        # torch's SiLU: vectorised and threaded, where numpy's exp is neither (a 2048-token
        # prefill spent a fifth of its time here).
        hidden = F.silu(gate).mul_(up)
        if self.down_proj.prepacked is not None:  # `linear` decides between it and `gemm` by row count
            return self.down_proj(hidden).numpy()
        return self._gate_up.gemm.matmul(hidden.numpy(), self._down_in_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.numpy_ready:
            rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).numpy())
            return torch.from_numpy(self.forward_numpy(rows)).view(*x.shape[:-1], -1)
        if self._gate_up is not None:
            gate, up = self._gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
