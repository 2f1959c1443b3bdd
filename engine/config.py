"""Model configuration: the subset of a Hugging Face `config.json` the engine runs on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DENSE_ARCHITECTURE = "Ernie4_5ForCausalLM"
MOE_ARCHITECTURE = "Ernie4_5_MoeForCausalLM"
SUPPORTED_ARCHITECTURES = (DENSE_ARCHITECTURE, MOE_ARCHITECTURE)

# Every config.json key the parser reads. `hf_overrides` may name one of these or any key already
# in the file; anything else is almost certainly a typo, so it is refused rather than ignored.
HF_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "max_position_embeddings",
        "tie_word_embeddings",
        "use_bias",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
        "dtype",
        "moe_num_experts",
        "moe_k",
        "moe_intermediate_size",
        "moe_num_shared_experts",
        "moe_layer_start_index",
        "moe_layer_end_index",
        "moe_layer_interval",
        "moe_norm_min",
        "num_nextn_predict_layers",
    }
)


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
    def from_hf_dict(cls, d: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ModelConfig:
        """Parses a Hugging Face config.json dict (hub or transformers-5 format).

        `overrides` (the user's `hf_overrides`) replace config.json keys before parsing; an override
        key that neither the parser nor the file knows is a ValueError. Values that transformers
        derives when a key is absent (head_dim, defaults) are derived the same way, so the engine
        builds the model transformers would build from the same file.
        """
        return model_config_from_hf_dict(d, overrides)

    @property
    def is_moe(self) -> bool:
        return self.architecture == MOE_ARCHITECTURE and self.moe_num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has a routed-expert MLP (same rule as transformers)."""
        if not self.is_moe:
            return False
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (
            layer_idx + 1
        ) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= layer_idx <= end


_MISSING = object()


def _normalized(d: Mapping[str, Any]) -> dict[str, Any]:
    """Both config.json dialects in one shape: RoPE settings flattened, `dtype` named `torch_dtype`.

    Hub files have a top-level `rope_theta` (and maybe `rope_scaling`); transformers 5 saves a
    `rope_parameters` dict instead, and writes `dtype` where older versions wrote `torch_dtype`.
    """
    out = dict(d)
    for key in ("rope_scaling", "rope_parameters"):  # rope_parameters wins: it is the newer form
        rope = out.get(key)
        if rope is None and key in out:
            out["rope_type"] = "default"  # an explicit null (say in hf_overrides) switches scaling off
        elif isinstance(rope, Mapping):
            if "rope_theta" in rope:
                out["rope_theta"] = rope["rope_theta"]
            kind = rope.get("rope_type", rope.get("type"))
            if kind is not None:
                out["rope_type"] = kind
        elif rope is not None:
            raise ValueError(f"config.json: {key} must be an object or null, got {rope!r}")
    if out.get("dtype") is not None:
        out["torch_dtype"] = out["dtype"]
    return out


class _Reader:
    """Typed, validated access to the merged config; errors name the key and where it came from."""

    def __init__(self, d: dict[str, Any], overridden: set[str]) -> None:
        self.d = d
        self.overridden = overridden

    def where(self, key: str) -> str:
        return "hf_overrides" if key in self.overridden else "config.json"

    def fail(self, key: str, problem: str) -> ValueError:
        return ValueError(f"{self.where(key)}: {key} {problem}")

    def get(
        self,
        key: str,
        kind: type,
        default: Any = _MISSING,
        *,
        positive: bool = False,
        at_least: int | None = None,
        nullable: bool = False,
    ) -> Any:
        """The value of `key` as `kind` (an int is accepted for a float), range-checked."""
        value = self.d.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ValueError(
                    f"config.json: required field {key!r} is missing (add it to config.json, "
                    "or pass it in hf_overrides)"
                )
            return default
        if value is None and nullable:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # bool is an int subclass: `"vocab_size": true` is a broken file, not vocab_size 1.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail(key, f"must be {kind.__name__}, got {value!r}")
        if positive and value <= 0:
            raise self.fail(key, f"must be positive, got {value!r}")
        if at_least is not None and value < at_least:
            raise self.fail(key, f"must be >= {at_least}, got {value!r}")
        return value


def _architecture(r: _Reader) -> str:
    archs = r.d.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch in SUPPORTED_ARCHITECTURES:
        return arch
    hint = ""
    if arch == "Ernie4_5_ForCausalLM":
        # The name used by the hub's original remote-code release, before transformers support.
        hint = " (this is the pre-transformers name: re-download config.json from the hub)"
    raise ValueError(
        f"{r.where('architectures')}: architecture {arch!r} is not supported{hint}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _token_ids(r: _Reader) -> tuple[int | None, tuple[int, ...], int | None]:
    bos = r.get("bos_token_id", int, 1, at_least=0, nullable=True)
    pad = r.get("pad_token_id", int, 0, at_least=0, nullable=True)
    eos = r.d.get("eos_token_id", 2)
    eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos_list):
        raise r.fail("eos_token_id", f"must be a token id or a list of token ids, got {eos!r}")
    return bos, tuple(eos_list), pad


def _moe_fields(r: _Reader, num_layers: int) -> dict[str, Any]:
    # transformers maps `num_experts` / `num_experts_per_tok` onto these names (attribute_map).
    for alias, key in (("num_experts", "moe_num_experts"), ("num_experts_per_tok", "moe_k")):
        if key not in r.d and alias in r.d:
            r.d[key] = r.d[alias]
    if isinstance(r.d.get("moe_num_experts"), list):
        raise r.fail(
            "moe_num_experts",
            f"is a list {r.d['moe_num_experts']!r}: that is the multimodal ERNIE 4.5 VL layout, "
            "which is not supported (only the text models are)",
        )
    experts = r.get("moe_num_experts", int, positive=True)
    k = r.get("moe_k", int, positive=True)
    if k > experts:
        raise r.fail("moe_k", f"({k}) must not exceed moe_num_experts ({experts})")
    start = r.get("moe_layer_start_index", int, 1, at_least=0)
    end = r.get("moe_layer_end_index", int, -1, at_least=-1)
    if end != -1 and end < start:
        raise r.fail(
            "moe_layer_end_index",
            f"({end}) is before moe_layer_start_index ({start}); use -1 for the last layer",
        )
    return dict(
        moe_num_experts=experts,
        moe_k=k,
        moe_intermediate_size=r.get("moe_intermediate_size", int, positive=True),
        moe_num_shared_experts=r.get("moe_num_shared_experts", int, 2, at_least=0),
        moe_layer_start_index=start,
        # -1 means the last layer, as in transformers; an end past the last layer is kept as written
        # (transformers keeps it too), which is what lets hf_overrides shrink num_hidden_layers.
        moe_layer_end_index=num_layers - 1 if end == -1 else end,
        moe_layer_interval=r.get("moe_layer_interval", int, 1, positive=True),
        moe_norm_min=r.get("moe_norm_min", float, 1e-12, at_least=0),
    )


def model_config_from_hf_dict(
    raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> ModelConfig:
    """Parses a Hugging Face config.json dict (hub or transformers-5 format) plus user overrides."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - HF_CONFIG_KEYS - set(raw))
    if unknown:
        raise ValueError(
            f"hf_overrides: unknown config key {unknown[0]!r}"
            + (f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else "")
            + "; it is neither read by pdserve nor present in config.json"
        )
    # Normalised separately, so an override of `rope_theta` beats a file's `rope_parameters`.
    override_norm = _normalized(overrides)
    r = _Reader({**_normalized(raw), **override_norm}, set(override_norm))

    arch = _architecture(r)
    hidden = r.get("hidden_size", int, positive=True)
    heads = r.get("num_attention_heads", int, positive=True)
    # null means "same as heads" in transformers. An absent key would silently take the 0.3B's or
    # the 21B's head count there, so here it is required instead.
    kv_heads = r.get("num_key_value_heads", int, nullable=True, positive=True) or heads
    if heads % kv_heads:
        raise r.fail("num_key_value_heads", f"must divide num_attention_heads ({heads}), got {kv_heads}")
    # transformers' dense config defaults head_dim to 128 when the key is absent; null, and the
    # MoE model in every case, fall back to hidden_size // num_attention_heads.
    derived = hidden // heads
    head_dim = r.get(
        "head_dim", int, 128 if arch == DENSE_ARCHITECTURE else derived, positive=True, nullable=True
    )
    head_dim = head_dim or derived
    if head_dim < 1:
        raise r.fail(
            "head_dim", f"is 0 (hidden_size {hidden} // num_attention_heads {heads}); set it explicitly"
        )

    rope_type = r.d.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"{r.where('rope_parameters')}: rope_type {rope_type!r} is not supported, only 'default' "
            "RoPE (no scaling); remove rope_scaling/rope_parameters scaling to run this model"
        )
    hidden_act = r.get("hidden_act", str, "silu")
    if hidden_act != "silu":
        raise r.fail("hidden_act", f"must be 'silu' (ERNIE 4.5 uses SwiGLU), got {hidden_act!r}")
    bos, eos, pad = _token_ids(r)
    num_layers = r.get("num_hidden_layers", int, positive=True)
    moe = _moe_fields(r, num_layers) if arch == MOE_ARCHITECTURE else {}
    return ModelConfig(
        architecture=arch,
        vocab_size=r.get("vocab_size", int, positive=True),
        hidden_size=hidden,
        intermediate_size=r.get("intermediate_size", int, positive=True),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=r.get("rms_norm_eps", float, 1e-5, positive=True),
        rope_theta=r.get("rope_theta", float, 500000.0, positive=True),
        max_position_embeddings=r.get("max_position_embeddings", int, 131072, positive=True),
        tie_word_embeddings=r.get("tie_word_embeddings", bool, True),
        use_bias=r.get("use_bias", bool, False),
        hidden_act=hidden_act,
        bos_token_id=bos,
        eos_token_ids=eos,
        pad_token_id=pad,
        torch_dtype=r.get("torch_dtype", str, "bfloat16"),
        # transformers 5's Ernie4_5_MoeConfig writes null for "no MTP layers".
        num_nextn_predict_layers=r.get("num_nextn_predict_layers", int, 0, at_least=0, nullable=True) or 0,
        **moe,
    )
