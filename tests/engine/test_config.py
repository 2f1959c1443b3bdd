"""ModelConfig.from_hf_dict against transformers' own reading of the same config.json."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Ernie4_5Config

from pdserve.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig


def bundled(name: str) -> dict:
    return json.loads(resources.files("pdserve.engine.model_configs").joinpath(f"{name}.json").read_text())


def transformers_view(d: dict):
    """The config transformers builds from `d`, and the head_dim its attention layers use."""
    cls = Ernie4_5_MoeConfig if d["architectures"][0] == "Ernie4_5_MoeForCausalLM" else Ernie4_5Config
    t = cls.from_dict(d)
    return t, getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads


def assert_matches_transformers(mc: ModelConfig, d: dict) -> None:
    t, head_dim = transformers_view(d)
    assert mc.head_dim == head_dim
    assert mc.rope_theta == t.rope_parameters["rope_theta"]
    eos = t.eos_token_id if isinstance(t.eos_token_id, list) else [t.eos_token_id]
    assert list(mc.eos_token_ids) == eos
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "use_bias",
        "bos_token_id",
        "pad_token_id",
    ):
        assert getattr(mc, key) == getattr(t, key), key
    if mc.architecture == "Ernie4_5_MoeForCausalLM":
        for key in (
            "moe_num_experts",
            "moe_k",
            "moe_intermediate_size",
            "moe_num_shared_experts",
            "moe_layer_start_index",
            "moe_layer_end_index",
            "moe_layer_interval",
            "moe_norm_min",
        ):
            assert getattr(mc, key) == getattr(t, key), key


@pytest.mark.parametrize("fixture", ["tiny_dense_checkpoint", "tiny_moe_checkpoint"])
def test_transformers_saved_configs_parse_to_what_transformers_reads(fixture, request):
    d = json.loads((request.getfixturevalue(fixture) / "config.json").read_text())
    assert "rope_parameters" in d and "rope_theta" not in d and "dtype" in d  # transformers-5 format
    mc = ModelConfig.from_hf_dict(d)
    assert mc.architecture == d["architectures"][0]
    assert mc.eos_token_ids == (2, 5)
    assert mc.torch_dtype == d["dtype"]
    assert_matches_transformers(mc, d)


@pytest.mark.parametrize(
    "edit, head_dim",
    [
        ({}, 8),  # explicit
        ({"head_dim": None}, 32 // 4),  # null: derived from hidden_size
        ({"head_dim": "absent"}, 128),  # absent: the dense config's own default
    ],
)
def test_dense_head_dim_follows_transformers(tiny_dense_checkpoint, edit, head_dim):
    d = json.loads((tiny_dense_checkpoint / "config.json").read_text())
    d.update(edit)
    if d.get("head_dim") == "absent":
        del d["head_dim"]
    mc = ModelConfig.from_hf_dict(d)
    assert mc.head_dim == head_dim == transformers_view(d)[1]


def test_moe_head_dim_is_derived_and_moe_layers_match_transformers(tiny_moe_checkpoint):
    d = json.loads((tiny_moe_checkpoint / "config.json").read_text())
    d.update(num_hidden_layers=6, moe_layer_interval=2, moe_layer_start_index=1, moe_layer_end_index=4)
    mc = ModelConfig.from_hf_dict(d)
    assert mc.head_dim == 32 // 4 and "head_dim" not in d
    assert_matches_transformers(mc, d)
    model = Ernie4_5_MoeForCausalLM(transformers_view(d)[0])
    theirs = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert [mc.is_moe_layer(i) for i in range(6)] == theirs == [False, True, False, True, False, False]


def test_moe_layer_end_index_minus_one_resolves_to_the_last_layer(tiny_moe_checkpoint):
    d = json.loads((tiny_moe_checkpoint / "config.json").read_text())
    d["moe_layer_end_index"] = -1
    mc = ModelConfig.from_hf_dict(d)
    assert mc.moe_layer_end_index == 2 == transformers_view(d)[0].moe_layer_end_index
    assert [mc.is_moe_layer(i) for i in range(3)] == [False, True, True]


@pytest.mark.parametrize("name", ["ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b"])
def test_bundled_hub_configs_parse_like_transformers(name):
    d = bundled(name)
    assert "rope_theta" in d and "rope_parameters" not in d  # hub format
    mc = ModelConfig.from_hf_dict(d)
    assert_matches_transformers(mc, d)
    assert mc.torch_dtype == d["torch_dtype"] == "bfloat16"


def test_bundled_configs_have_the_published_shapes():
    small = ModelConfig.from_hf_dict(bundled("ernie-4.5-0.3b"))
    assert (small.hidden_size, small.num_hidden_layers, small.vocab_size, small.head_dim) == (
        1024,
        18,
        103424,
        128,
    )
    assert (small.num_attention_heads, small.num_key_value_heads, small.is_moe) == (16, 2, False)
    a3b = ModelConfig.from_hf_dict(bundled("ernie-4.5-21b-a3b"))
    assert (a3b.hidden_size, a3b.num_hidden_layers, a3b.moe_num_experts, a3b.moe_k) == (2560, 28, 64, 6)
    assert (a3b.moe_num_shared_experts, a3b.num_nextn_predict_layers, a3b.tie_word_embeddings) == (2, 1, True)
    assert not a3b.is_moe_layer(0) and a3b.is_moe_layer(1) and a3b.is_moe_layer(27)
    a47b = ModelConfig.from_hf_dict(bundled("ernie-4.5-300b-a47b"))
    assert (a47b.hidden_size, a47b.num_hidden_layers, a47b.moe_k, a47b.moe_num_shared_experts) == (
        8192,
        54,
        8,
        0,
    )
    assert not a47b.tie_word_embeddings and not a47b.is_moe_layer(2) and a47b.is_moe_layer(3)


def test_hub_format_top_level_rope_theta_and_extra_keys():
    d = {
        **bundled("ernie-4.5-0.3b"),
        "rope_theta": 10000,
        "eos_token_id": [2, 100272],
        "use_rmsnorm": True,
        "compression_ratio": 1.0,
        "moe_capacity": [64, 64, 64],
        "rope_scaling": None,
    }
    mc = ModelConfig.from_hf_dict(d)
    assert mc.rope_theta == 10000.0 and mc.eos_token_ids == (2, 100272)
    assert_matches_transformers(mc, d)


def test_overrides_apply_before_parsing():
    mc = ModelConfig.from_hf_dict(
        bundled("ernie-4.5-21b-a3b"),
        {"num_hidden_layers": 2, "moe_num_experts": 8, "moe_k": 2, "rope_theta": 1e6, "dtype": "float32"},
    )
    assert (mc.num_hidden_layers, mc.moe_num_experts, mc.moe_k) == (2, 8, 2)
    assert (mc.rope_theta, mc.torch_dtype) == (1e6, "float32")
    # A rope_theta override beats a transformers-5 file's rope_parameters.
    d = {**bundled("ernie-4.5-0.3b"), "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}
    assert ModelConfig.from_hf_dict(d).rope_theta == 7.0
    assert ModelConfig.from_hf_dict(d, {"rope_theta": 9.0}).rope_theta == 9.0
    # An explicit null override switches a file's RoPE scaling off.
    scaled = {**bundled("ernie-4.5-0.3b"), "rope_scaling": {"type": "yarn", "factor": 2.0}}
    assert ModelConfig.from_hf_dict(scaled, {"rope_scaling": None}).rope_theta == 500000.0


def test_unknown_override_key_is_named():
    with pytest.raises(ValueError, match=r"hf_overrides: unknown config key 'num_layers'"):
        ModelConfig.from_hf_dict(bundled("ernie-4.5-0.3b"), {"num_layers": 2})
    # A key the file already has is a valid override even if the parser ignores it.
    ModelConfig.from_hf_dict(bundled("ernie-4.5-21b-a3b"), {"moe_capacity": [1, 1, 1]})


def test_bad_override_value_blames_hf_overrides():
    with pytest.raises(ValueError, match=r"hf_overrides: hidden_size must be positive, got 0"):
        ModelConfig.from_hf_dict(bundled("ernie-4.5-0.3b"), {"hidden_size": 0})


MOE = "ernie-4.5-21b-a3b"
DENSE = "ernie-4.5-0.3b"


@pytest.mark.parametrize(
    "name, edit, message",
    [
        (DENSE, {"architectures": ["LlamaForCausalLM"]}, "supported: " + ", ".join(SUPPORTED_ARCHITECTURES)),
        (DENSE, {"architectures": ["Ernie4_5_ForCausalLM"]}, "pre-transformers name"),
        (DENSE, {"architectures": None}, "architecture None is not supported"),
        (
            DENSE,
            {"num_key_value_heads": 3},
            r"config\.json: num_key_value_heads must divide num_attention_heads \(16\), got 3",
        ),
        (DENSE, {"hidden_size": None}, "hidden_size must be int"),
        (DENSE, {"vocab_size": "big"}, "vocab_size must be int, got 'big'"),
        (DENSE, {"vocab_size": True}, "vocab_size must be int, got True"),
        (DENSE, {"num_hidden_layers": -2}, "num_hidden_layers must be positive, got -2"),
        (DENSE, {"rms_norm_eps": 0}, "rms_norm_eps must be positive"),
        (DENSE, {"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        (DENSE, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
        (DENSE, {"rope_parameters": {"rope_type": "linear", "rope_theta": 1.0}}, "rope_type 'linear'"),
        (DENSE, {"eos_token_id": [2, "x"]}, "eos_token_id must be a token id or a list"),
        (DENSE, {"tie_word_embeddings": "yes"}, "tie_word_embeddings must be bool"),
        (MOE, {"moe_k": 65}, r"moe_k \(65\) must not exceed moe_num_experts \(64\)"),
        (MOE, {"moe_num_experts": [64, 64]}, "multimodal ERNIE 4.5 VL layout"),
        (MOE, {"moe_num_experts": 0}, "moe_num_experts must be positive"),
        (MOE, {"moe_layer_interval": 0}, "moe_layer_interval must be positive"),
        (MOE, {"moe_num_shared_experts": -1}, "moe_num_shared_experts must be >= 0"),
        (MOE, {"moe_layer_start_index": 5, "moe_layer_end_index": 2}, "moe_layer_end_index .2. is before"),
        (MOE, {"num_nextn_predict_layers": -1}, "num_nextn_predict_layers must be >= 0"),
    ],
)
def test_bad_fields_are_named(name, edit, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**bundled(name), **edit})


@pytest.mark.parametrize(
    "field", ["hidden_size", "vocab_size", "num_key_value_heads", "moe_intermediate_size"]
)
def test_missing_required_field_is_named(field):
    d = bundled(MOE)
    del d[field]
    with pytest.raises(ValueError, match=rf"required field '{field}' is missing"):
        ModelConfig.from_hf_dict(d)


def test_dense_architecture_ignores_moe_keys():
    mc = ModelConfig.from_hf_dict({**bundled(DENSE), "moe_num_experts": 64, "moe_k": 6})
    assert not mc.is_moe and mc.moe_num_experts == 0 and not mc.is_moe_layer(1)
