"""ERNIE 4.5's mixture-of-experts MLP: fp32 router with a bias-corrected top-k, plus shared experts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.config import ModelConfig
from pdserve.engine.kernels import moe_cpu
from pdserve.engine.layers.linear import CpuGemm
from pdserve.engine.layers.mlp import GatedMLP

if TYPE_CHECKING:
    from pdserve.engine.expert_parallel.dispatch import ExpertDispatcher

# The C kernel runs a step's routed experts while they average at most this many tokens each
# (decode batches); above it, BLAS GEMMs catch up and then win (prefills). Measured on demo's
# [M, 256] x [256, 512]: 47 against 50 us at M = 8, 80 against 73 us at M = 16.
KERNEL_MAX_TOKENS_PER_EXPERT = 16


class Router(nn.Module):
    """The gate: `weight` [E, H] kept in fp32, as the hub checkpoints store it."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False
        )


class MoEStatics(nn.Module):
    """Holds `e_score_correction_bias` [1, E]: shifts which experts are chosen, not their weights."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(1, num_experts, dtype=torch.float32), requires_grad=False
        )


class HeldExperts(nn.Module):
    """The routed experts a model instance holds, named by their logical ids as the checkpoint
    names them (`experts.5.gate_proj.weight`); indexed and iterated in local-slot order. One
    engine holds all of them (local slot = logical id); an expert-parallel rank holds its share."""

    def __init__(self, logical_ids: list[int], make: Callable[[], GatedMLP]) -> None:
        super().__init__()
        self.logical_ids = list(logical_ids)
        for e in self.logical_ids:
            self.add_module(str(e), make())

    def __len__(self) -> int:
        return len(self.logical_ids)

    def __iter__(self) -> Iterator[GatedMLP]:
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __getitem__(self, slot: int) -> GatedMLP:
        return self._modules[str(self.logical_ids[slot])]  # type: ignore[return-value]


class SparseMoE(nn.Module):
    """Routed experts (top-k of `moe_num_experts`) plus `moe_num_shared_experts` always-on experts.

    `held`: the logical experts this instance holds (default all). With fewer, `forward` needs an
    expert-parallel dispatcher (`attach`) to reach the others.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, held: list[int] | None = None) -> None:
        super().__init__()
        self.top_k = config.moe_k
        self.norm_min = config.moe_norm_min
        self.num_experts = config.moe_num_experts
        self.gate = Router(config.hidden_size, config.moe_num_experts)
        self.moe_statics = MoEStatics(config.moe_num_experts)
        self.experts = HeldExperts(
            list(range(config.moe_num_experts)) if held is None else held,
            lambda: GatedMLP(config.hidden_size, config.moe_intermediate_size, config.use_bias, dtype),
        )
        self.shared_experts = (
            GatedMLP(
                config.hidden_size,
                config.moe_intermediate_size * config.moe_num_shared_experts,
                config.use_bias,
                dtype,
            )
            if config.moe_num_shared_experts > 0
            else None
        )
        self._gemm: CpuGemm | None = None
        self._kernel: moe_cpu.RoutedExpertsKernel | None = None
        # Expert parallelism: the group's dispatcher, this layer's id in it, and copies of other
        # ranks' experts in local slots after the held ones (`install_spares`).
        self._dispatcher: ExpertDispatcher | None = None
        self._layer_id = -1
        self._spares: list[GatedMLP] = []

    def pack_for_cpu(self, gemm: CpuGemm) -> None:
        """Fuses each expert's gate and up into one row-major weight, and runs decode-sized steps
        through the C kernel where it is built (fp32 CPU weights without biases, or every expert
        quantized). The experts' weights stay as checkpoints store them: the kernel reads rows,
        BLAS multiplies by their transposes. Call once weights are loaded (and quantized); the
        shared experts are fused by the model."""
        for expert in self.experts:
            expert.fuse(gemm)
        self._gemm = gemm
        packed = [expert.quantized_weights() for expert in self.experts]
        if all(w is not None for w in packed):
            if moe_cpu.supports(self.gate.weight.shape[1], self.experts[0].down_proj.in_features):
                self._kernel = moe_cpu.RoutedExpertsKernel.quantized(
                    [w[0] for w in packed],  # type: ignore[index]
                    [w[1] for w in packed],  # type: ignore[index]
                )
            return
        weights = [expert.row_major_weights() for expert in self.experts]
        if (
            moe_cpu.supports(self.gate.weight.shape[1], self.experts[0].down_proj.in_features)
            and all(w is not None for w in weights)
            and all(w.device.type == "cpu" and w.dtype == torch.float32 for pair in weights for w in pair)
        ):
            self._kernel = moe_cpu.RoutedExpertsKernel([w[0] for w in weights], [w[1] for w in weights])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights [T, k] in x's dtype, expert ids [T, k])."""
        probs = F.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1, dtype=torch.float32)
        # The correction bias decides *which* experts; the unbiased probabilities weigh them.
        _, ids = torch.topk(probs + self.moe_statics.e_score_correction_bias.view(-1), self.top_k, dim=-1)
        weights = probs.gather(-1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dispatcher is not None:
            if x.device.type == "cpu" and x.dtype == torch.float32 and moe_cpu.available():
                bias = self.moe_statics.e_score_correction_bias.view(-1)
                weights, ids = moe_cpu.route(x, self.gate.weight, bias, self.top_k, self.norm_min)
            else:
                weights, ids = self.route(x)
            out = self._dispatcher.dispatch(self._layer_id, x, weights, ids)
        elif self._uses_kernel(x):
            bias = self.moe_statics.e_score_correction_bias.view(-1)
            weights, ids = moe_cpu.route(x, self.gate.weight, bias, self.top_k, self.norm_min)
            out = self._kernel(x, weights, ids, self._gemm.parallel)
        elif x.device.type == "cpu" and x.dtype == torch.float32 and all(e.numpy_ready for e in self.experts):
            out = torch.from_numpy(self._routed_numpy(x, *self.route(x)))
        else:
            out = self._routed(x, *self.route(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    # ------------------------------------------------------------------ expert parallelism

    def attach(self, dispatcher: ExpertDispatcher, layer_id: int) -> None:
        """Routes this layer's tokens through an expert-parallel group's `dispatcher`."""
        self._dispatcher = dispatcher
        self._layer_id = layer_id
        dispatcher.register(layer_id, self.run_local)

    def run_local(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs of local slot `slots[i]`'s expert on `rows[i]` (held, then spares)."""
        if self._kernel is not None and rows.device.type == "cpu" and rows.dtype == torch.float32:
            ones = torch.ones(rows.shape[0], 1, dtype=torch.float32)
            return self._kernel(rows, ones, slots.view(-1, 1), self._gemm.parallel)
        local = [*self.experts, *self._spares]
        out = torch.empty_like(rows)
        for slot in torch.unique(slots).tolist():
            pick = (slots == slot).nonzero().view(-1)
            out[pick] = local[slot](rows[pick])
        return out

    def expert_row(self, logical_id: int) -> torch.Tensor:
        """A held expert's weights as one flat row (gate, up, down), for copying to another rank."""
        e = self.experts._modules[str(logical_id)]
        return torch.cat(
            [e.gate_proj.weight.reshape(-1), e.up_proj.weight.reshape(-1), e.down_proj.weight.reshape(-1)]
        )

    def install_spares(self, rows: list[torch.Tensor]) -> None:
        """Replaces the spare slots with experts built from `expert_row` rows, and re-points the
        kernel at held + spare weights. Between steps only: a step in flight reads the old ones."""
        template = self.experts[0]
        inter, hidden = template.gate_proj.weight.shape
        spares = []
        for row in rows:
            mlp = GatedMLP(hidden, inter, False, template.gate_proj.weight.dtype)
            gate, up, down = row.split([inter * hidden, inter * hidden, hidden * inter])
            with torch.no_grad():
                for linear, w in ((mlp.gate_proj, gate), (mlp.up_proj, up), (mlp.down_proj, down)):
                    linear.weight = nn.Parameter(w.reshape(linear.weight.shape).clone(), requires_grad=False)
            if self._gemm is not None:
                mlp.fuse(self._gemm)
            spares.append(mlp)
        self._spares = spares
        if self._kernel is not None:
            weights = [e.row_major_weights() for e in [*self.experts, *spares]]
            self._kernel = moe_cpu.RoutedExpertsKernel([w[0] for w in weights], [w[1] for w in weights])

    def _uses_kernel(self, x: torch.Tensor) -> bool:
        return (
            self._kernel is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.shape[0] * self.top_k <= KERNEL_MAX_TOKENS_PER_EXPERT * len(self.experts)
        )

    def _routed_numpy(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
        """The routed experts' weighted sum, in numpy (see `GatedMLP.forward_numpy` for why)."""
        xs = np.ascontiguousarray(x.numpy())
        ids_np, weights_np = ids.numpy(), weights.numpy()
        out = np.zeros_like(xs)
        for expert_id in np.unique(ids_np):
            tokens, slots = np.nonzero(ids_np == expert_id)
            y = self.experts[expert_id].forward_numpy(xs[tokens])
            y *= weights_np[tokens, slots, None]
            out[tokens] += y  # a token picks an expert at most once: no repeated rows here
        return out

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        # Group tokens by expert so each expert runs one matmul over all of its tokens.
        flat_ids = ids.view(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=len(self.experts)).tolist()
        token_of = order // self.top_k
        weight_of = weights.view(-1)[order]
        start = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            y = self.experts[expert_id](x[rows]) * weight_of[start : start + count, None]
            out.index_add_(0, rows, y)
            start += count
        return out
