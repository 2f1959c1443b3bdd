"""The engine's ERNIE 4.5 forward pass and greedy decoding against transformers on the same checkpoints."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.layers import linear as linear_module
from tests.conftest import make_checkpoint
from tests.engine.reference import assert_same_greedy, engine_logits, hf_logits, hf_model

SHAPES = {
    "dense": dict(moe=False),
    "dense-mqa-untied": dict(
        moe=False, num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=False
    ),
    "moe": dict(moe=True),
    "moe-late-start-interval2-2shared": dict(
        moe=True,
        num_hidden_layers=4,
        moe_layer_start_index=2,
        moe_layer_interval=2,
        moe_num_shared_experts=2,
        moe_k=3,
    ),
    "moe-mha-no-shared": dict(
        moe=True,
        num_attention_heads=4,
        num_key_value_heads=4,
        moe_num_shared_experts=0,
        moe_num_experts=8,
        moe_k=2,
    ),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), **SHAPES[request.param])


@pytest.mark.parametrize("cpu_gemm", ["torch", "openblas"])
def test_logits_match_transformers_on_every_attention_path(checkpoint, cpu_gemm):
    llm = LLM(
        str(checkpoint), dtype="float32", block_size=4, kv_cache_blocks=64, cpu_gemm=cpu_gemm, progress=False
    )
    ids = torch.randint(3, 320, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf_model(checkpoint), ids)
    # one prompt chunk, a chunk on cached context, then single-token decodes
    got = engine_logits(llm.engine, ids, [13, 10] + [1] * 14)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff:.2e}"
    assert llm.engine.kv.num_free_blocks == 64


def test_prepacked_weights_logits_match_transformers(checkpoint, monkeypatch):
    # The test models' weights are below the prepacking threshold; lower it to cover that path.
    monkeypatch.setattr(linear_module, "PREPACK_MIN_ELEMENTS", 0)
    llm = LLM(
        str(checkpoint), dtype="float32", block_size=4, kv_cache_blocks=64, cpu_gemm="torch", progress=False
    )
    if llm.engine.model._head_packed is None:
        pytest.skip("this torch build has no usable oneDNN linear")
    ids = torch.randint(3, 320, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = hf_logits(hf_model(checkpoint), ids)
    got = engine_logits(llm.engine, ids, [20, 9, 5, 1, 2])
    assert (got - ref).abs().max().item() <= 1e-4


def test_greedy_matches_transformers_generate(checkpoint):
    model = hf_model(checkpoint)
    llm = LLM(str(checkpoint), dtype="float32", progress=False)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 17, 40)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, min_tokens=24))
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = model.generate(
                torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert len(out.outputs[0].token_ids) == 24
        assert_same_greedy(model, prompt, ref, out.outputs[0].token_ids)


def test_bf16_logits_as_close_to_fp32_as_transformers_bf16(checkpoint):
    # bf16 keeps ~3 significant digits, so there is no fixed tolerance to hold both
    # implementations to; the reference is transformers' own bf16 error against fp32.
    ids = torch.randint(3, 320, (37,), generator=torch.Generator().manual_seed(4)).tolist()
    exact = hf_logits(hf_model(checkpoint), ids)
    theirs = (hf_logits(hf_model(checkpoint, torch.bfloat16), ids) - exact).abs()
    llm = LLM(str(checkpoint), dtype="bfloat16", block_size=4, kv_cache_blocks=64, progress=False)
    assert llm.engine.model.model.norm.weight.dtype == torch.bfloat16
    ours = (engine_logits(llm.engine, ids, [13, 10] + [1] * 14) - exact).abs()
    print(
        f"bf16 error vs fp32: ours max {ours.max():.3e} mean {ours.mean():.3e}, "
        f"transformers max {theirs.max():.3e} mean {theirs.mean():.3e}"
    )
    assert ours.mean() <= 2 * theirs.mean() and ours.max() <= 2 * theirs.max()
    assert llm.engine.kv.num_free_blocks == 64
