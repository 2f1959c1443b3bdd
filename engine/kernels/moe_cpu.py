"""A mixture-of-experts layer's routed experts for decode-sized batches, through `moe_cpu.c`.

The C kernel (see its header for why) is optional at install; `available()` says whether it
was built, and callers keep their torch/numpy path for when it was not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pdserve.engine.kernels import CpuParallel
from pdserve.engine.kernels.quant_cpu import FORMAT_CODES

if TYPE_CHECKING:
    from pdserve.engine.quantization.formats import QuantizedWeight

try:
    from pdserve.engine.kernels import _moe_cpu
except ImportError:  # built as an optional extension: no compiler at install time
    _moe_cpu = None


# Experts smaller than this (bytes of weights each) run on the calling thread alone. Large ones
# stream from memory, and two threads' loads overlap: ERNIE 4.5 21B-A3B's layer at 32 tokens took
# 154 ms on two threads, 285 on one. Small ones stay in cache and are compute-bound, and this
# machine's two vCPUs share their FMA units, so the hand-off (~50 us) only costs: the demo's decode
# step was as fast or faster on one thread (12.7-13.2 against 13.0-13.9 ms).
_SPLIT_MIN_EXPERT_BYTES = 1 << 21


def available() -> bool:
    """True when the C kernel was built and imports."""
    return _moe_cpu is not None


def supports(hidden_size: int, intermediate_size: int) -> bool:
    """True when the kernel is built and handles these sizes (multiples of 8: whole vectors)."""
    return available() and hidden_size % 8 == 0 and intermediate_size % 8 == 0


def route(
    x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, top_k: int, norm_min: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE's router in one C call: (weights [T, k] fp32, expert ids [T, k] int64).

    The same math as `SparseMoE.route` (fp32 softmax of x @ gate.T; top-k on probability +
    `bias`; the chosen probabilities renormalised, floored at `norm_min`) without its ten
    torch ops. x: [T, H] fp32; gate: [E, H] fp32; bias: [E] fp32 or None.
    """
    if _moe_cpu is None:
        raise RuntimeError("the MoE CPU kernel was not built (see engine/kernels/moe_cpu.c)")
    num_experts, hidden = gate.shape
    if x.dtype != torch.float32 or gate.dtype != torch.float32 or x.shape[-1] != hidden or x.dim() != 2:
        raise ValueError(f"route: x must be fp32 [T, {hidden}] and the gate fp32 [E, {hidden}]")
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != num_experts):
        raise ValueError(f"route: the correction bias must be fp32 with {num_experts} values")
    x, gate = x.contiguous(), gate.contiguous()
    bias = bias.contiguous() if bias is not None else None
    tokens = x.shape[0]
    ids = torch.empty(tokens, top_k, dtype=torch.int64)
    weights = torch.empty(tokens, top_k, dtype=torch.float32)
    _moe_cpu.route(
        x.data_ptr(),
        gate.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        ids.data_ptr(),
        weights.data_ptr(),
        tokens,
        hidden,
        num_experts,
        top_k,
        norm_min,
    )
    return weights, ids


class RoutedExpertsKernel:
    """The routed experts of one MoE layer (fp32, CPU), computed by the C kernel.

    `gate_up[e]` is expert e's [2I, H] weight (gate rows, then up rows) and `down[e]` its
    [H, I] weight, both row-major as checkpoints store them. The kernel reads them by address,
    so the tensors are kept referenced here and must not be re-stored afterwards.
    """

    def __init__(
        self,
        gate_up: list[torch.Tensor],
        down: list[torch.Tensor],
        split_min_expert_bytes: int = _SPLIT_MIN_EXPERT_BYTES,
    ) -> None:
        if _moe_cpu is None:
            raise RuntimeError("the MoE CPU kernel was not built (see engine/kernels/moe_cpu.c)")
        if not gate_up or len(gate_up) != len(down):
            raise ValueError("need one gate_up and one down weight per expert")
        two_i, hidden = gate_up[0].shape
        for w, shape in [(w, (two_i, hidden)) for w in gate_up] + [(w, (hidden, two_i // 2)) for w in down]:
            if (
                w.device.type != "cpu"
                or w.dtype != torch.float32
                or not w.is_contiguous()
                or w.shape != shape
            ):
                raise ValueError(f"expert weights must be contiguous fp32 CPU tensors of shape {shape}")
        if hidden % 8 or two_i % 16:
            raise ValueError("hidden and intermediate sizes must be multiples of 8")
        self.hidden_size = hidden
        self.intermediate_size = two_i // 2
        self.num_experts = len(gate_up)
        # Split over threads only when experts stream from memory (see _SPLIT_MIN_EXPERT_BYTES).
        self._split = 3 * hidden * self.intermediate_size * 4 >= split_min_expert_bytes
        self._weights = (list(gate_up), list(down))
        self._gate_up = np.array([w.data_ptr() for w in gate_up], dtype=np.int64)
        self._down = np.array([w.data_ptr() for w in down], dtype=np.int64)
        self._format: tuple[int, ...] = ()  # fp32

    @classmethod
    def quantized(
        cls,
        gate_up: list[QuantizedWeight],
        down: list[QuantizedWeight],
        split_min_expert_bytes: int = _SPLIT_MIN_EXPERT_BYTES,
    ) -> RoutedExpertsKernel:
        """The same for packed experts (`quant_dot.h` formats): gate_up[e] [2I, H], down[e] [H, I],
        one format and group for all. The kernel decodes them as it multiplies."""
        if _moe_cpu is None:
            raise RuntimeError("the MoE CPU kernel was not built (see engine/kernels/moe_cpu.c)")
        if not gate_up or len(gate_up) != len(down):
            raise ValueError("need one gate_up and one down weight per expert")
        two_i, hidden = gate_up[0].out_features, gate_up[0].in_features
        first = gate_up[0]
        for w, shape in [(w, (two_i, hidden)) for w in gate_up] + [(w, (hidden, two_i // 2)) for w in down]:
            tensors = (w.packed, w.scale, w.offset)
            if (
                (w.out_features, w.in_features) != shape
                or (w.fmt, w.group) != (first.fmt, first.group)
                or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors)
            ):
                raise ValueError(f"packed experts must be contiguous CPU matrices {shape} of one format")
        if hidden % first.group or (two_i // 2) % first.group:
            raise ValueError("the group size must divide the hidden and intermediate sizes")
        kernel = cls.__new__(cls)
        kernel.hidden_size, kernel.intermediate_size, kernel.num_experts = hidden, two_i // 2, len(gate_up)
        bits = {"q8": 8, "q4": 4}.get(first.fmt, 2)
        kernel._split = 3 * hidden * kernel.intermediate_size * bits // 8 >= split_min_expert_bytes
        kernel._weights = (list(gate_up), list(down))

        def table(ws: list[QuantizedWeight]) -> np.ndarray:
            return np.array([[w.packed.data_ptr(), w.scale.data_ptr(), w.offset.data_ptr()] for w in ws])

        kernel._gate_up, kernel._down = table(gate_up).astype(np.int64), table(down).astype(np.int64)
        kernel._format = (FORMAT_CODES[first.fmt], first.group)
        return kernel

    def __call__(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        parallel: CpuParallel,
    ) -> torch.Tensor:
        """sum over slots s of weights[t, s] * expert_{ids[t, s]}(x[t]) for each row t of x.

        x: [T, H] fp32; weights: [T, k]; ids: [T, k] int64. `parallel(fn, max_parts)` runs
        `fn(part, parts)` for every part at once (`CpuGemm.parallel`).
        """
        t, k = ids.shape
        if x.dtype != torch.float32 or ids.dtype != torch.int64 or x.shape != (t, self.hidden_size):
            raise ValueError("routed experts kernel: x must be fp32 [T, H] and ids int64 [T, k]")
        x = x.contiguous()
        ids = ids.contiguous()
        weights = weights.to(torch.float32).contiguous()
        per_slot = torch.empty(t, k, self.hidden_size, dtype=torch.float32)
        args = (
            x.data_ptr(),
            ids.data_ptr(),
            weights.data_ptr(),
            self._gate_up.ctypes.data,
            self._down.ctypes.data,
            per_slot.data_ptr(),
            t,
            self.hidden_size,
            self.intermediate_size,
            k,
            self.num_experts,
        )
        fmt = self._format
        parallel(
            lambda part, parts: _moe_cpu.routed_experts(*args, part, parts, *fmt), None if self._split else 1
        )
        out = torch.empty(t, self.hidden_size, dtype=torch.float32)
        _moe_cpu.combine_slots(per_slot.data_ptr(), out.data_ptr(), t, k, self.hidden_size)
        return out


def combine_slots(per_slot: torch.Tensor, out: torch.Tensor) -> None:
    """out[t] = sum over s of per_slot[t, s], in slot order; per_slot [T, k, H], out [T, H], fp32."""
    if _moe_cpu is None:
        raise RuntimeError("the MoE CPU kernel was not built (see engine/kernels/moe_cpu.c)")
    t, k, h = per_slot.shape
    if per_slot.dtype != torch.float32 or not per_slot.is_contiguous() or out.shape != (t, h):
        raise ValueError("combine_slots: per_slot must be contiguous fp32 [T, k, H] and out [T, H]")
    _moe_cpu.combine_slots(per_slot.data_ptr(), out.data_ptr(), t, k, h)
