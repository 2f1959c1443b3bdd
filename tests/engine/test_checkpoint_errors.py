"""Loading real transformers-made checkpoints, and refusing bad ones with errors that name the culprit."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.loader import CheckpointError
from tests.conftest import make_checkpoint


def llm(path, **kw):
    return LLM(str(path), dtype="float32", progress=False, **kw)


@pytest.fixture()
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "ck", moe=True)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    single = make_checkpoint(tmp_path / "single", moe=True, seed=3)
    sharded = make_checkpoint(tmp_path / "sharded", moe=True, seed=3, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    params = SamplingParams(temperature=0, max_tokens=8)
    a = llm(single).generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    b = llm(sharded).generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    assert a == b


def _rewrite(path, change):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors.*experts\.3\.up_proj"):
        llm(ckpt)


def test_extra_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.9.self_attn.q_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"layers\.9\.self_attn\.q_proj"):
        llm(ckpt)


def test_mis_shaped_tensor_is_named_with_both_shapes(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(65,\).*expects \(64,\)"):
        llm(ckpt)


def test_truncated_file_is_named(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-500])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        llm(ckpt)


def test_missing_shard_is_named(tmp_path):
    path = make_checkpoint(tmp_path / "sh", moe=False, max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        llm(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(architectures=["LlamaForCausalLM"]), "supported: Ernie4_5ForCausalLM"),
        (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads must divide"),
        (lambda c: c.pop("hidden_size"), "hidden_size"),
        (lambda c: c.update(vocab_size="big"), "vocab_size must be int"),
        (lambda c: c.update(moe_k=99), "moe_k"),
    ],
)
def test_bad_config_json_names_the_field(ckpt, edit, message):
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        llm(ckpt)


def test_unparseable_config_and_missing_dir_are_clear(tmp_path, ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        llm(ckpt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        llm(tmp_path / "empty")


def test_mtp_tensors_are_loaded_and_kept(ckpt):
    h = 64
    extra = {
        "model.mtp_emb_norm.0.weight": torch.full((h,), 2.0),
        "model.mtp_hidden_norm.0.weight": torch.ones(h),
        "model.mtp_linear_proj.0.weight": torch.randn(h, 2 * h),
    }
    block = {
        k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if k.startswith("model.layers.0.")
    }
    extra.update({k.replace("model.layers.0.", "model.mtp_block.0."): v.clone() for k, v in block.items()})
    _rewrite(ckpt, lambda t: t.update(extra))
    engine = llm(ckpt).engine
    assert engine.model_config.num_nextn_predict_layers == 1
    assert torch.equal(engine.model.model.mtp_emb_norm[0].weight, torch.full((h,), 2.0))
    assert torch.equal(engine.model.model.mtp_linear_proj[0].weight, extra["model.mtp_linear_proj.0.weight"])


def test_hf_overrides_and_bundled_configs():
    engine = llm(
        "ernie-4.5-21b-a3b",
        load_format="dummy",
        kv_cache_blocks=4,
        hf_overrides={
            "num_hidden_layers": 2,
            "moe_num_experts": 4,
            "moe_k": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "moe_intermediate_size": 32,
            "intermediate_size": 64,
            "vocab_size": 128,
        },
    ).engine
    mc = engine.model_config
    assert (mc.num_hidden_layers, mc.moe_num_experts, mc.head_dim) == (2, 4, 16)
    assert mc.is_moe_layer(1) and not mc.is_moe_layer(0)
    with pytest.raises(ValueError, match="unknown config key 'num_layers'"):
        llm("ernie-4.5-0.3b", load_format="dummy", hf_overrides={"num_layers": 2})
