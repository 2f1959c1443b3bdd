"""`rank_weight_bytes`: the weight memory one rank of an expert-parallel group needs, from the
model's shape alone (a meta-device model: nothing is allocated or loaded).

A rank holds every attention, norm and small dense-layer or shared-expert weight, its base share
of the routed experts, and `num_redundant_experts / size` spare expert slots per MoE layer; with
`split_dense`, its vocabulary slice of the embedding (and of an untied head) and its units of the
large MLPs' gate and up. On CPUs an fp32 tied head also keeps an input-major copy of its rows (see
`model_weight_bytes`).
Full-precision shapes in `config.dtype`: weight-only quantization is not counted.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.engine import build_model_shell, model_config_of
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.expert_parallel.config import MAX_EP_SIZE
from pdserve.engine.expert_parallel.placement import base_range
from pdserve.engine.expert_parallel.rank import split_mlps
from pdserve.engine.model_source import resolve_model
from pdserve.engine.quantization.apply import model_weight_bytes


def rank_weight_bytes(config: EngineConfig) -> int:
    """Weight bytes of the group's largest rank under `config.expert_parallel` (size 1: one engine)."""
    model_config = _model_config(config)
    dtype = config.torch_dtype(model_config.torch_dtype)
    ep = config.expert_parallel
    n = model_config.moe_num_experts
    share = max((list(base_range(r, ep.size, n)) for r in range(ep.size)), key=len) if n else []
    model = build_model_shell(model_config, dtype, None, False, (lambda layer: share) if n else None)
    total = model_weight_bytes(model)
    moe_layers = model.moe_layers()
    if moe_layers and ep.num_redundant_experts:
        one_expert = sum(
            p.numel() * p.element_size() for p in next(iter(moe_layers.values())).experts[0].parameters()
        )
        total += len(moe_layers) * (ep.num_redundant_experts // ep.size) * one_expert
    embed = model.model.embed_tokens.weight
    vocab = model_config.vocab_size
    rows = vocab if ep.size == 1 or not ep.split_dense else -(-vocab // ep.size)  # the widest slice
    row_bytes = embed.shape[1] * embed.element_size()
    tables = 1 if model.lm_head is None else 2  # the embedding, and an untied head beside it
    total -= tables * (vocab - rows) * row_bytes  # each keeps its vocabulary slice alone
    if model.lm_head is None and embed.dtype == torch.float32:
        total += rows * row_bytes  # the CPU path's input-major copy of the tied head's rows
    for mlp in split_mlps(model, ep):  # gate and up keep the widest rank's units alone
        gone = mlp.intermediate_size - -(-mlp.intermediate_size // ep.size)
        total -= 2 * gone * mlp.gate_proj.in_features * mlp.gate_proj.weight.element_size()
    return total


def smallest_group_within(config: EngineConfig, limit_bytes: int) -> int | None:
    """The smallest power-of-two group size whose ranks' weights fit `limit_bytes` (spare slots
    per rank as `config` has them), or None if none up to the model's expert count does."""
    spares = config.expert_parallel.num_redundant_experts // config.expert_parallel.size
    experts = _model_config(config).moe_num_experts
    size = 1
    while size <= min(MAX_EP_SIZE, max(experts, 1)):
        ep = replace(config.expert_parallel, size=size, num_redundant_experts=spares * size)
        if rank_weight_bytes(replace(config, expert_parallel=ep)) <= limit_bytes:
            return size
        size *= 2
    return None


def _model_config(config: EngineConfig) -> ModelConfig:
    return model_config_of(resolve_model(config.model), config.hf_overrides)
