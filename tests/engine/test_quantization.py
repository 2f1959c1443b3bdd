"""Weight-only quantization in the engine: a quantized model computes what the plain fp32 path
computes on its dequantized weights, every feature keeps working with it, its checkpoints round
trip, and bad settings or files are refused with the field or tensor named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pdserve.engine import LLM, Engine, EngineConfig, SamplingParams
from pdserve.engine.engine import check_model
from pdserve.engine.layers.linear import Linear
from pdserve.engine.loader import CheckpointError, save_sharded
from pdserve.engine.quantization import formats
from pdserve.engine.quantization.apply import quantized_bytes
from pdserve.engine.quantization.checkpoint import write_quantized_checkpoint
from pdserve.engine.quantization.config import QuantizationConfig
from tests.prompts import prompts_of

GREEDY = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, ignore_eos=True)
SCHEMES = [
    {"method": "wint8", "group_size": 32},
    {"method": "wint4", "group_size": 32},
    {"method": "wint2", "group_size": 32},
    {"method": "wint2", "group_size": 32, "code": "ccq"},
    {"method": "wint2", "group_size": 32, "code": "plain"},
]


def _llm(model, quantization=None, **kw) -> LLM:
    return LLM(str(model), dtype="float32", progress=False, quantization=quantization, **kw)


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _dequantized_checkpoint(engine: Engine, out: Path) -> Path:
    """The quantized engine's weights, dequantized, as a plain fp32 checkpoint (head untied)."""
    state = {}
    for name, module in engine.model.named_modules():
        if isinstance(module, Linear) and module.quant_format is not None:
            state[f"{name}.weight"] = module.quantized.dequantize()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias
    for name, tensor in engine.model.state_dict().items():
        if not name.endswith(("weight_packed", "weight_scale", "weight_offset")) and name not in state:
            state[name] = tensor
    out.mkdir()
    config = dict(engine.source.hf_config, tie_word_embeddings="lm_head.weight" not in state)
    (out / "config.json").write_text(json.dumps(config))
    save_sharded(state, out)
    return out


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s['method']}-{s.get('code', 'default')}")
def test_quantized_model_equals_plain_path_on_dequantized_weights(moe_checkpoint, tmp_path, scheme):
    quantized = _llm(moe_checkpoint, scheme)
    reference = _llm(_dequantized_checkpoint(quantized.engine, tmp_path / "ref"))
    prompts = prompts_of([5, 9, 17])
    # Batch 3 decodes through the C kernels; the 17-token prompt's prefill through block GEMMs.
    assert _tokens(quantized, prompts) == _tokens(reference, prompts)
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    got = quantized.engine.model.compute_logits(hidden)
    want = reference.engine.model.compute_logits(hidden)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_only_linear_layers_are_packed_and_memory_shrinks(moe_checkpoint):
    llm = _llm(moe_checkpoint, {"method": "wint4", "group_size": 32})
    model = llm.engine.model
    state = model.state_dict()
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    assert state["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router gate
    assert state["model.norm.weight"].dtype == torch.float32
    assert "lm_head.weight_packed" in state and "model.layers.1.mlp.experts.0.up_proj.weight_packed" in state
    assert not [n for n in state if n.endswith("proj.weight")]
    packed, full = quantized_bytes(model)
    assert packed / full == pytest.approx((4 + 32 / 32) / 32)  # 4 bits + fp16 scale and offset per 32
    assert llm.engine.served_model.quantization == "wint4"


def test_lm_head_can_stay_in_full_precision(moe_checkpoint):
    llm = _llm(moe_checkpoint, {"method": "wint4", "group_size": 32, "lm_head": False})
    assert "lm_head.weight_packed" not in llm.engine.model.state_dict()
    assert llm.engine.model.lm_head is None  # the tied embedding is the head again


def test_prefix_cache_and_disaggregated_handoff_with_a_quantized_model(moe_checkpoint):
    q = {"method": "wint4", "group_size": 32}
    cfg = dict(model=str(moe_checkpoint), progress=False, block_size=4, kv_cache_blocks=64, quantization=q)
    single, prefill, decode = (Engine(EngineConfig(**cfg)) for _ in range(3))
    prompt = prompts_of([13])[0]

    def run(engine):
        out = {}
        while engine.has_unfinished():
            for d in engine.step():
                out.setdefault(d.request_id, []).extend(d.new_token_ids)
                if d.kv_ready:
                    decode.import_kv(engine.export_kv(d.request_id))
                    engine.release_exported(d.request_id)
        return out

    single.add_request("a", prompt, GREEDY)
    expected = run(single)["a"]
    single.add_request("b", prompt, GREEDY)  # the same prompt again: its blocks are cached
    assert run(single)["b"] == expected
    assert single.stats().prefix_cache_hit_tokens > 0
    prefill.add_request("a", prompt, GREEDY, prefill_only=True)
    first = run(prefill)["a"]
    assert first + run(decode)["a"] == expected
    for engine in (single, prefill, decode):
        assert engine.kv.num_free_blocks == 64


def test_quantized_target_with_full_precision_draft_and_mtp():
    q = "wint4"
    prompts = prompts_of([6, 11])
    plain = _tokens(_llm("demo", q), prompts)
    draft = _llm(
        "demo", q, speculative_config={"method": "draft", "model": "demo-draft", "num_speculative_tokens": 3}
    )
    assert draft.engine.proposer.draft.runner.model.lm_head is None  # the draft is not quantized
    assert _tokens(draft, prompts) == plain
    mtp = _llm("demo", q, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert mtp.engine.model.model.mtp_block[0].mlp.down_proj.quant_format == "q4"
    assert _tokens(mtp, prompts) == plain


def test_quantized_checkpoint_loads_without_requantizing(moe_checkpoint, tmp_path, monkeypatch):
    scheme = {"method": "wint2", "group_size": 32}
    llm = _llm(moe_checkpoint, scheme)
    expected = _tokens(llm, prompts_of([7, 12]))
    sizes = write_quantized_checkpoint(llm.engine, tmp_path / "q")
    assert sizes["packed_bytes"] < 0.12 * sizes["fp32_bytes"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["method"] == "wint2"

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must not be quantized again")

    monkeypatch.setattr("pdserve.engine.quantization.apply.quantize", refuse)
    loaded = _llm(tmp_path / "q")
    assert loaded.engine.prequantized and loaded.engine.quantization == QuantizationConfig(**scheme)
    assert _tokens(loaded, prompts_of([7, 12])) == expected
    with pytest.raises(ValueError, match="already quantized"):
        _llm(tmp_path / "q", "wint4")


def test_a_quantized_checkpoint_that_does_not_match_its_config_names_the_tensor(moe_checkpoint, tmp_path):
    llm = _llm(moe_checkpoint, {"method": "wint4", "group_size": 32})
    write_quantized_checkpoint(llm.engine, tmp_path / "q")
    for edit, error in (
        ({"method": "wint8", "format": "q8"}, r"tensor .*weight_packed has shape"),
        ({"group_size": 16}, r"tensor .*weight_scale has shape"),
        ({"format": "ccq"}, r"quantization_config.format is 'ccq'"),
        ({"method": "wint5"}, r"quantization.method must be one of"),
    ):
        bad = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "q", bad)
        config = json.loads((bad / "config.json").read_text())
        config["quantization_config"].update(edit)
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises((CheckpointError, ValueError), match=error):
            check_model(EngineConfig(model=str(bad), progress=False))  # before any engine starts


def test_bad_settings_are_refused_with_the_field_named(moe_checkpoint):
    with pytest.raises(ValueError, match=r"quantization\.method must be one of wint8, wint4, wint2"):
        EngineConfig(model="demo", quantization="int4")
    with pytest.raises(ValueError, match=r"quantization\.group_size must be one of"):
        EngineConfig(model="demo", quantization={"method": "wint4", "group_size": 48})
    with pytest.raises(ValueError, match="only applies to wint2"):
        EngineConfig(model="demo", quantization={"method": "wint4", "code": "plain"})
    with pytest.raises(
        ValueError, match=r"group_size 128 does not divide model\.layers\.0\.self_attn\.q_proj's 64"
    ):
        check_model(
            EngineConfig(model=str(moe_checkpoint), quantization={"method": "wint4", "group_size": 128})
        )


def test_formats_round_trip_and_ccq_beats_plain_two_bit():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = {}
    for fmt in ("q8", "q4", "q2", "ccq"):
        q = formats.quantize(w, fmt, 64)
        torch.testing.assert_close(q.dequantize(), _torch_dequantize(q), rtol=0, atol=0)
        errors[fmt] = float((q.dequantize() - w).square().mean())
    assert errors["q8"] < 1e-4 < errors["q4"] < 0.01 < errors["ccq"] < 0.9 * errors["q2"]


def _torch_dequantize(q: formats.QuantizedWeight) -> torch.Tensor:
    """The torch reference decoding (the GPU path), bypassing the C kernel."""
    levels = q.levels().float().view(q.out_features, -1, q.group)
    return (levels * q.scale.float()[..., None] + q.offset.float()[..., None]).view(q.out_features, -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_model_runs_on_gpu_through_torch(moe_checkpoint):
    cpu = _llm(moe_checkpoint, {"method": "wint4", "group_size": 32})
    gpu = _llm(moe_checkpoint, {"method": "wint4", "group_size": 32}, device="cuda")
    prompts = prompts_of([5, 9])
    assert _tokens(gpu, prompts) == _tokens(cpu, prompts)


def _meta_model(name: str):
    from pdserve.engine.config import ModelConfig
    from pdserve.engine.model_source import resolve_model
    from pdserve.engine.models.ernie45 import Ernie45ForCausalLM

    with torch.device("meta"):
        return Ernie45ForCausalLM(ModelConfig.from_hf_dict(resolve_model(name).hf_config), torch.float32)


def test_hybrid_plan_raises_the_head_and_pays_for_it_at_the_codes_bits():
    from pdserve.engine.quantization.apply import _targets, layer_formats
    from pdserve.engine.quantization.hybrid import LayerFormat, mean_bits

    hybrid, code = QuantizationConfig(method="wint2"), QuantizationConfig(method="wint2", code="ccq")
    assert hybrid.code == "hybrid"  # wint2's default
    for name in ("demo", "ernie-4.5-21b-a3b"):
        model = _meta_model(name)
        plan = layer_formats(model, hybrid)
        shapes = {n: (layer.out_features, layer.in_features) for n, layer in _targets(model, hybrid)}
        assert plan["lm_head"].fmt == "q4"
        assert mean_bits(shapes, plan) <= mean_bits(shapes, layer_formats(model, code))
        for layer in range(model.config.num_hidden_layers):  # a layer's experts share one format
            experts = {f for n, f in plan.items() if n.startswith(f"model.layers.{layer}.mlp.experts.")}
            assert len(experts) <= 1
    # The demo's head is 12% of its weights: every other layer pays at g128 and the head is q4/g128.
    assert set(layer_formats(_meta_model("demo"), hybrid).values()) == {
        LayerFormat("ccq", 128),
        LayerFormat("q4", 128),
    }
    # 21B-A3B's head is 1%: a few MoE layers' experts at g128 pay for it, the rest stays at g64.
    plan = layer_formats(_meta_model("ernie-4.5-21b-a3b"), hybrid)
    assert plan["lm_head"] == LayerFormat("q4", 64)
    assert plan["model.layers.1.mlp.experts.0.up_proj"] == LayerFormat("ccq", 128)
    assert (
        plan["model.layers.27.mlp.experts.0.up_proj"]
        == plan["model.layers.1.self_attn.q_proj"]
        == LayerFormat("ccq", 64)
    )
    # A head too large for the rest to pay for (0.3B: dense, a 103424 x 1024 head), or none
    # quantized: the plan is the code's.
    assert set(layer_formats(_meta_model("ernie-4.5-0.3b"), hybrid).values()) == {LayerFormat("ccq", 64)}
    no_head = QuantizationConfig(method="wint2", code="hybrid", lm_head=False)
    assert set(layer_formats(_meta_model("demo"), no_head).values()) == {LayerFormat("ccq", 64)}


def test_hybrid_wint2_equals_its_dequantized_weights_and_its_checkpoint_loads(tmp_path, monkeypatch, capsys):
    scheme = {"method": "wint2", "group_size": 64, "code": "hybrid"}
    quantized = _llm("demo", scheme)
    model = quantized.engine.model
    assert (model.lm_head.quant_format, model.lm_head.quant_group) == ("q4", 128)
    expert = model.model.layers[1].mlp.experts[0].down_proj
    assert (expert.quant_format, expert.quant_group) == ("ccq", 128)
    packed, full = quantized_bytes(model)
    assert 32 * packed / full <= 2.5625  # wint2's own rate on the demo (K = 256: 2 bytes a row of padding)
    prompts = prompts_of([5, 9, 17])
    expected = _tokens(quantized, prompts)
    # Kernel agreement: the C kernels (decode, block GEMMs, the MoE kernel at g128) compute what
    # the fp32 path computes on the dequantized weights.
    reference = _llm(_dequantized_checkpoint(quantized.engine, tmp_path / "ref"))
    assert _tokens(reference, prompts) == expected
    del reference
    from pdserve.cli import main

    assert (
        main(["quantize", "demo", str(tmp_path / "q"), "--quantization", "wint2"]) == 0
    )  # hybrid: the default
    assert "code hybrid" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (recorded["method"], recorded["code"], recorded["format"]) == ("wint2", "hybrid", "ccq")

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must not be quantized again")

    monkeypatch.setattr("pdserve.engine.quantization.apply.quantize", refuse)
    loaded = _llm(tmp_path / "q")
    assert loaded.engine.prequantized and loaded.engine.quantization == QuantizationConfig(**scheme)
    assert loaded.engine.model.lm_head.quant_format == "q4"
    assert _tokens(loaded, prompts) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hybrid_wint2_runs_on_gpu_through_torch():
    # Mixed formats and groups in one model (q4/g128 head, code/g128 elsewhere on the demo).
    cpu = _llm("demo", "wint2")
    gpu = _llm("demo", "wint2", device="cuda")
    assert gpu.engine.model.lm_head.quant_format == "q4"
    prompts = prompts_of([5, 9])
    assert _tokens(gpu, prompts) == _tokens(cpu, prompts)
