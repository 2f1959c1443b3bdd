"""SwiGLU MLP with the hub's `gate_proj`/`up_proj`/`down_proj` names."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.layers.linear import (
    CpuGemm,
    FusedInputMajor,
    FusedQuantized,
    FusedRowMajor,
    Linear,
    fuse_linears,
)
from pdserve.engine.quantization.formats import QuantizedWeight


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): ERNIE's dense MLP, each routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size  # the whole MLP's, whatever slice is kept
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype)
        self._gate_up: FusedInputMajor | FusedRowMajor | FusedQuantized | None = None
        self._gemm: CpuGemm | None = None
        # [in, out] numpy views of the fused gate/up and the down weight, for `forward_numpy`.
        self._gate_up_in_out: np.ndarray | None = None
        self._down_in_out: np.ndarray | None = None
        # An expert-parallel rank's slice of the intermediate units (`keep_intermediate_slice`),
        # and how `forward` gathers all of them from the group (rows -> [R, intermediate_size]).
        self.intermediate_slice: tuple[int, int] | None = None
        self.gather_intermediate: Callable[[torch.Tensor], torch.Tensor] | None = None

    def keep_intermediate_slice(self, start: int, end: int) -> None:
        """Keeps gate/up for intermediate units [start, end) alone (an expert-parallel rank's
        slice); call after loading, before `fuse`. `intermediate` then computes the slice, and
        `forward` needs `gather_intermediate` for the rest; down stays whole."""
        for layer in (self.gate_proj, self.up_proj):
            layer.weight.data = layer.weight.data[start:end].clone()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data[start:end].clone()
            layer.out_features = end - start
        self.intermediate_slice = (start, end)

    def fuse(self, gemm: CpuGemm, prepack: bool = False) -> None:
        """Computes gate and up with one matmul, and the whole MLP in numpy where the weights
        are fp32 on the CPU without biases (or packed input-major, `pack_for_cpu`); with
        `prepack`, large weights also get oneDNN-prepacked copies (for MLPs that see whole
        batches, not routed experts). Call after `pack_for_cpu` where that is used: a routed
        expert skips it and keeps its weights row-major, as the MoE kernel reads them."""
        self._gate_up = fuse_linears([self.gate_proj, self.up_proj], gemm, prepack)
        if prepack:
            self.down_proj.prepack()
        down = self.down_proj
        if down.quant_format is not None:
            return  # quantized: `forward` runs the fused packed gate/up and the packed down
        if down.bias is not None or down.weight.device.type != "cpu" or down.weight.dtype != torch.float32:
            return
        if isinstance(self._gate_up, FusedInputMajor) and down.gemm is not None:
            self._gate_up_in_out = self._gate_up.weight.numpy()
        elif isinstance(self._gate_up, FusedRowMajor) and self._gate_up.bias is None and down.gemm is None:
            self._gate_up_in_out = self._gate_up.weight.t().numpy()
        else:
            return
        self._gemm = gemm
        self._down_in_out = down.weight.t().numpy()  # a view either way

    @property
    def numpy_ready(self) -> bool:
        """True once `forward_numpy` can run (fp32 CPU weights fused by `fuse`)."""
        return self._down_in_out is not None

    def row_major_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up [2I, H], down [H, I]), both row-major, when fused so and without biases:
        what the MoE kernel reads. None otherwise."""
        fused = self._gate_up
        if not isinstance(fused, FusedRowMajor) or fused.bias is not None or self.down_proj.bias is not None:
            return None
        down = self.down_proj.weight
        return (fused.weight, down) if down.is_contiguous() else None

    def quantized_weights(self) -> tuple[QuantizedWeight, QuantizedWeight] | None:
        """(gate_up [2I, H], down [H, I]) packed, when quantized, fused so and without biases:
        what the MoE kernel reads. None otherwise."""
        fused, down = self._gate_up, self.down_proj.quantized
        if not isinstance(fused, FusedQuantized) or fused.bias is not None or self.down_proj.bias is not None:
            return None
        return (fused.weight, down) if down is not None else None

    def forward_numpy(self, a: np.ndarray) -> np.ndarray:
        """The MLP on rows `a` [M, H] (fp32, contiguous), in numpy.

        On the CPU a decode step's MLPs are a few microseconds of arithmetic each, and torch's
        per-op dispatch costs as much again; a mixture-of-experts layer runs one MLP per chosen
        expert, so the difference grows with the number of tokens in the step.
        """
        assert self._gemm is not None and self._gate_up_in_out is not None and self._down_in_out is not None
        if isinstance(self._gate_up, FusedInputMajor):  # it adds biases and may use a prepacked copy
            gate_up = torch.from_numpy(self._gate_up.matmul(a))
        else:
            gate_up = torch.from_numpy(self._gemm.matmul(a, self._gate_up_in_out))
        gate, up = gate_up.chunk(2, dim=-1)
        # torch's SiLU: vectorised and threaded, where numpy's exp is neither (a 2048-token
        # prefill spent a fifth of its time here).
        hidden = F.silu(gate).mul_(up)
        if self.down_proj.prepacked is not None:  # `linear` decides between it and `gemm` by row count
            return self.down_proj(hidden).numpy()
        return self._gemm.matmul(hidden.numpy(), self._down_in_out)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x) for the intermediate units held (all, or the slice)."""
        if self._gate_up is not None:
            gate, up = self._gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.intermediate_slice is not None:
            assert self.gather_intermediate is not None, "a sliced MLP needs its group's gather_intermediate"
            rows = x.reshape(-1, x.shape[-1])
            return self.down_proj(self.gather_intermediate(rows).to(x.dtype)).view(*x.shape[:-1], -1)
        if self.numpy_ready:
            rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).numpy())
            return torch.from_numpy(self.forward_numpy(rows)).view(*x.shape[:-1], -1)
        if self._gate_up is not None:
            gate, up = self._gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
