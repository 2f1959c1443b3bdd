"""Model configuration: the subset of a Hugging Face `config.json` the engine runs on."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SUPPORTED_ARCHITECTURES = ("Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of an ERNIE 4.5 text model (dense or MoE).

    Built from a checkpoint's `config.json` by `ModelConfig.from_hf_dict`; every field the engine
    reads is validated there, so the model code can trust it.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    use_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = 0
    torch_dtype: str = "bfloat16"
    # MoE (architecture Ernie4_5_MoeForCausalLM); zero experts means dense.
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = -1  # resolved to num_hidden_layers - 1 when -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    # ERNIE's multi-token-prediction head (`model.mtp_*` tensors); 0 when absent.
    num_nextn_predict_layers: int = 0

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> ModelConfig:
        return model_config_from_hf_dict(raw, overrides)

    @property
    def is_moe(self) -> bool:
        return self.architecture == "Ernie4_5_MoeForCausalLM" and self.moe_num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has a routed-expert MLP (same rule as transformers)."""
        if not self.is_moe:
            return False
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (
            layer_idx + 1
        ) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= layer_idx <= end


def _field(d: dict[str, Any], key: str, kind: type, *, default: Any = None, positive: bool = False) -> Any:
    value = d.get(key, default)
    if value is None:
        raise ValueError(f"config.json: required field {key!r} is missing")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ValueError(f"config.json: {key} must be {kind.__name__}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"config.json: {key} must be positive, got {value!r}")
    return value


def model_config_from_hf_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Parses a Hugging Face config.json dict (hub or transformers-5 format) plus user overrides."""
    d = dict(raw)
    known = (
        {f.name for f in fields(ModelConfig)} | set(raw) | {"rope_theta", "eos_token_id", "moe_num_experts"}
    )
    for key in overrides or {}:
        if key not in known:
            raise ValueError(f"hf_overrides: unknown config key {key!r}")
    d.update(overrides or {})
    archs = d.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"config.json: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = _field(d, "hidden_size", int, positive=True)
    heads = _field(d, "num_attention_heads", int, positive=True)
    kv_heads = _field(d, "num_key_value_heads", int, default=heads, positive=True)
    if heads % kv_heads:
        raise ValueError(
            f"config.json: num_key_value_heads must divide num_attention_heads ({heads}), got {kv_heads}"
        )
    # transformers' dense config defaults head_dim to 128; the MoE one derives it from hidden_size.
    default_head_dim = 128 if arch == "Ernie4_5ForCausalLM" else hidden // heads
    head_dim = d.get("head_dim") or default_head_dim
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(
            f"config.json: only default RoPE is supported, got rope_type {rope.get('rope_type')!r}"
        )
    rope_theta = rope.get("rope_theta", d.get("rope_theta", 500000.0))
    eos = d.get("eos_token_id", 2)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act must be 'silu', got {d.get('hidden_act')!r}")
    moe: dict[str, Any] = {}
    if arch == "Ernie4_5_MoeForCausalLM":
        experts = d.get("moe_num_experts", 64)
        if isinstance(experts, list):
            raise ValueError("config.json: moe_num_experts as a list (multimodal ERNIE) is not supported")
        moe = dict(
            moe_num_experts=_field(d, "moe_num_experts", int, default=64, positive=True),
            moe_k=_field(d, "moe_k", int, default=6, positive=True),
            moe_intermediate_size=_field(d, "moe_intermediate_size", int, default=1536, positive=True),
            moe_num_shared_experts=_field(d, "moe_num_shared_experts", int, default=2),
            moe_layer_start_index=_field(d, "moe_layer_start_index", int, default=1),
            moe_layer_end_index=_field(d, "moe_layer_end_index", int, default=-1),
            moe_layer_interval=_field(d, "moe_layer_interval", int, default=1, positive=True),
            moe_norm_min=_field(d, "moe_norm_min", float, default=1e-12),
        )
        if moe["moe_k"] > moe["moe_num_experts"]:
            raise ValueError(
                f"config.json: moe_k ({moe['moe_k']}) exceeds moe_num_experts ({moe['moe_num_experts']})"
            )
    return ModelConfig(
        architecture=arch,
        vocab_size=_field(d, "vocab_size", int, positive=True),
        hidden_size=hidden,
        intermediate_size=_field(d, "intermediate_size", int, positive=True),
        num_hidden_layers=_field(d, "num_hidden_layers", int, positive=True),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_field(d, "rms_norm_eps", float, default=1e-5, positive=True),
        rope_theta=float(rope_theta),
        max_position_embeddings=_field(d, "max_position_embeddings", int, default=131072, positive=True),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        use_bias=bool(d.get("use_bias", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=d.get("pad_token_id"),
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
        num_nextn_predict_layers=int(d.get("num_nextn_predict_layers", 0) or 0),
        **moe,
    )
