"""Which layers of a model are quantized, and doing it: at load from full precision, or by
preparing packed storage that a quantized checkpoint is loaded into.

Every `Linear` is quantized (attention, dense MLPs, routed and shared experts, the MTP layer's
projection and block), and the LM head when `QuantizationConfig.lm_head` says so; embeddings,
norms and the MoE router gate (not `Linear`s) stay in full precision. With tied embeddings a
quantized head is a packed copy of the embedding matrix, held as an `lm_head` layer, so a
quantized checkpoint stores it under `lm_head.weight_*` like an untied one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from pdserve.engine.layers.linear import Linear
from pdserve.engine.model_source import ModelSource
from pdserve.engine.quantization.config import QuantizationConfig
from pdserve.engine.quantization.formats import Parallel, QuantizedWeight, check_shape, quantize
from pdserve.engine.quantization.hybrid import LayerFormat, plan_formats

if TYPE_CHECKING:
    from pdserve.engine.models.ernie45 import Ernie45ForCausalLM


def resolve_quantization(
    requested: QuantizationConfig | None, source: ModelSource
) -> tuple[QuantizationConfig | None, bool]:
    """(the scheme to run, whether the checkpoint is already packed in it).

    A quantized checkpoint's own config decides; asking for a different scheme is an error (it
    cannot be re-quantized from packed weights)."""
    declared = QuantizationConfig.from_checkpoint(source.hf_config, f"{source.name}/config.json")
    if declared is None:
        return requested, False
    if requested is not None and requested != declared:
        raise ValueError(
            f"quantization: {source.name!r} is a checkpoint already quantized as {declared}; "
            "leave quantization unset to serve it as it is, or quantize the full-precision release"
        )
    return declared, True


def _targets(model: Ernie45ForCausalLM, config: QuantizationConfig) -> list[tuple[str, Linear]]:
    """The layers to quantize, by checkpoint name (the head last, and only when configured)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear) and name != "lm_head"]
    if config.lm_head:
        layers.append(("lm_head", model.lm_head or _head_shell(model)))
    return layers


def _head_shell(model: Ernie45ForCausalLM) -> Linear:
    """An `lm_head` layer without storage, for the quantized copy of tied embeddings."""
    embed = model.model.embed_tokens.weight
    with torch.device("meta"):
        shell = Linear(embed.shape[1], embed.shape[0], bias=False, dtype=embed.dtype)
    shell.weight.requires_grad_(False)
    return shell


def layer_formats(model: Ernie45ForCausalLM, config: QuantizationConfig) -> dict[str, LayerFormat]:
    """{target layer name: its packed format and group} (one for all but with wint2's hybrid code)."""
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in _targets(model, config)}
    return plan_formats(shapes, config)


def check_groups(
    model: Ernie45ForCausalLM, config: QuantizationConfig, formats: dict[str, LayerFormat] | None = None
) -> dict[str, LayerFormat]:
    """Each target layer's format (`formats`, else this model's `layer_formats`); raises
    ValueError naming the first layer whose input size the group size does not divide."""
    plan = layer_formats(model, config) if formats is None else formats
    for name, layer in _targets(model, config):
        check_shape(plan[name].fmt, layer.out_features, layer.in_features, plan[name].group, name)
    return plan


def prepare_quantized(model: Ernie45ForCausalLM, config: QuantizationConfig) -> None:
    """Gives every target layer empty packed storage (on the model's device, meta included), so a
    quantized checkpoint loads into it name for name."""
    plan = check_groups(model, config)
    for name, layer in _targets(model, config):
        f = plan[name]
        layer.quantize(
            QuantizedWeight.empty(f.fmt, layer.out_features, layer.in_features, f.group, _device_of(model))
        )
        if name == "lm_head" and model.lm_head is None:
            model.lm_head = layer


def quantize_model(
    model: Ernie45ForCausalLM,
    config: QuantizationConfig,
    parallel: Parallel | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    formats: dict[str, LayerFormat] | None = None,
) -> None:
    """Quantizes the target layers in place from their loaded full-precision weights, freeing
    each fp32 weight as its packed form replaces it. `on_layer(done, total)` hears progress.
    `formats`: the layers' formats when they are not this model's own `layer_formats` (an
    expert-parallel rank holds a share of the layers but quantizes them as the whole model would)."""
    plan = check_groups(model, config, formats)
    targets = _targets(model, config)
    for done, (name, layer) in enumerate(targets, start=1):
        source = model.model.embed_tokens.weight if layer.weight.device.type == "meta" else layer.weight
        layer.quantize(quantize(source, plan[name].fmt, plan[name].group, parallel, name))
        if name == "lm_head" and model.lm_head is None:
            model.lm_head = layer
        if on_layer is not None:
            on_layer(done, len(targets))


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the packed layers, bytes the same layers take in fp32): the weight memory a
    scheme saves (embeddings, norms and gates are the same either way and not counted)."""
    packed = full = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.quant_format is not None:
            q = m.quantized
            assert q is not None
            packed += q.nbytes
            full += 4 * q.out_features * q.in_features
    return packed, full


def _device_of(model: nn.Module) -> torch.device:
    return model.model.embed_tokens.weight.device  # type: ignore[union-attr]


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds (packed or not, embeddings and norms included, and
    the input-major copy of a tied head the CPU path keeps); the KV cache is not counted."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    extra = getattr(model, "_tied_head_input_major", None)
    return total + (extra.numel() * extra.element_size() if extra is not None else 0)
