"""`pdserve bench ep` on the demo model: a `--worker-memory-gb` one rank's weights exceed is
refused for EP 1 with the fix named, and served on a group; the weight estimate is the loaded
model's."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.bench.ep_bench import EPBenchArgs, run_ep_bench
from pdserve.engine.engine import Engine, _materialize, build_model_shell, model_config_of
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.expert_parallel.collective import StoreAddress
from pdserve.engine.expert_parallel.memory import rank_weight_bytes, smallest_group_within
from pdserve.engine.expert_parallel.placement import base_range
from pdserve.engine.expert_parallel.rank import ExpertParallelRank, keep_rank_slices
from pdserve.engine.layers.linear import CpuGemm
from pdserve.engine.loader import init_dummy_weights
from pdserve.engine.model_source import resolve_model
from pdserve.engine.quantization.apply import model_weight_bytes

DEMO_EXPERTS, DEMO_MOE_LAYERS = 8, 3  # engine/demo_models/demo/config.json (layers 1-3 are MoE)


def test_rank_weight_estimate_is_the_loaded_models():
    one = EngineConfig(model="demo", dtype="float32", num_threads=1, progress=False)
    engine = Engine(one)
    assert rank_weight_bytes(one) == model_weight_bytes(engine.model)
    expert = engine.model.moe_layers()[1].experts[0]
    expert_bytes = sum(p.numel() * p.element_size() for p in expert.parameters())
    two = EngineConfig(model="demo", dtype="float32", expert_parallel={"size": 2, "num_redundant_experts": 2})
    # Half the routed experts go; one spare slot per MoE layer comes back; of the embedding and
    # the tied head's input-major copy of it a rank keeps its half of the vocabulary (split_dense,
    # the default).
    head_row_bytes = engine.model.config.hidden_size * 4
    gone = DEMO_MOE_LAYERS * (DEMO_EXPERTS // 2 - 1) * expert_bytes
    half_head = engine.model.config.vocab_size // 2 * head_row_bytes
    assert rank_weight_bytes(one) - rank_weight_bytes(two) == gone + 2 * half_head
    whole = EngineConfig(
        model="demo", dtype="float32",
        expert_parallel={"size": 2, "num_redundant_experts": 2, "split_dense": False},
    )  # fmt: skip
    assert rank_weight_bytes(one) - rank_weight_bytes(whole) == gone


# Dense layer 0 and the shared experts over SPLIT_MIN_ELEMENTS (4096 shared units: 1366 on the
# widest of 3 ranks), as tests/engine/expert_parallel/test_split_products.py has them.
BIG_MLPS = {"intermediate_size": 6144, "moe_num_shared_experts": 16}


@pytest.mark.parametrize(
    "size, overrides",
    [(2, {}), (3, {}), (3, {"tie_word_embeddings": False}), (3, BIG_MLPS)],
    ids=["ep2", "ep3", "ep3-untied", "ep3-big-mlps"],
)
def test_rank_weight_estimate_is_the_widest_ranks_loaded_slices(size, overrides):
    config = EngineConfig(
        model="demo", dtype="float32", hf_overrides=overrides, expert_parallel={"size": size}
    )
    model_config = model_config_of(resolve_model("demo"), overrides)
    # The last rank holds the widest slices (base_range gives the remainders to the last ranks).
    rank = ExpertParallelRank(size - 1, config.expert_parallel, StoreAddress("127.0.0.1", 0, ""))
    held = rank.held_experts(model_config.moe_num_experts)
    model = build_model_shell(model_config, torch.float32, None, False, held)
    _materialize(model, torch.device("cpu"))
    init_dummy_weights(model, seed=0, dtype=torch.float32)
    keep_rank_slices(model, rank)
    model.pack_for_cpu(CpuGemm(1, "torch"))
    vocab = base_range(size - 1, size, model_config.vocab_size)
    assert model.model.embed_tokens.weight.shape[0] == len(vocab) < model_config.vocab_size
    assert model_weight_bytes(model) == rank_weight_bytes(config)


def test_a_memory_limit_refuses_ep1_and_serves_a_group(tmp_path):
    one = EngineConfig(model="demo", dtype="float32")
    two = EngineConfig(model="demo", dtype="float32", expert_parallel={"size": 2})
    limit_gb = (rank_weight_bytes(one) + rank_weight_bytes(two)) / 2 / 2**30  # between the two
    assert smallest_group_within(one, int(limit_gb * 2**30)) == 2
    args = EPBenchArgs(
        model="demo", load_format="auto", hf_overrides={}, sizes=(1, 2), batches=(2,),
        input_len=8, output_len=4, total_threads=2, repeats=1, worker_memory_gb=limit_gb,
    )  # fmt: skip
    out = tmp_path / "ep.json"
    run_ep_bench(args, out)
    doc = json.loads(out.read_text())
    [refused] = doc["refused"]
    assert refused["ep"] == 1 and refused["weight_gib_per_rank"] > limit_gb
    assert "--worker-memory-gb" in refused["error"] and "use --ep 2" in refused["error"]
    [row] = doc["decode"]
    assert row["ep"] == 2 and row["decode_tok_s"] > 0 and row["weight_gib_per_rank"] < limit_gb
    # A decode step is a round per MoE layer (3 in the demo) and at least one closing round.
    assert row["rounds_per_step"] >= DEMO_MOE_LAYERS + 1
    assert row["rows_sent_per_token"] > 0 and row["dispatch_ms_per_round"] > 0
    assert [r["ep"] for r in doc["imbalance"]] == [2]


def test_every_size_refused_is_an_error():
    args = EPBenchArgs(
        model="demo", load_format="auto", hf_overrides={}, sizes=(1, 2), batches=(1,),
        repeats=1, worker_memory_gb=0.001,
    )  # fmt: skip
    with pytest.raises(SystemExit, match="no group size fits it; raise the limit"):
        run_ep_bench(args)


def test_rebalancing_evens_the_slots_the_ranks_ran():
    # EP 4 of the demo's 8 experts, one spare slot per rank, one prompt repeated: the counted
    # imbalance and the one from the rows each rank's experts ran agree, and the rebalance evens it.
    args = EPBenchArgs(
        model="demo", load_format="auto", hf_overrides={}, sizes=(4,), batches=(8,),
        input_len=8, output_len=4, total_threads=2, repeats=1,
    )  # fmt: skip
    [row] = run_ep_bench(args, None)["imbalance"]
    assert row["before"] >= 1.2 and row["measured_before"] == pytest.approx(row["before"], abs=0.02)
    assert row["after"] <= 1.05 and row["measured_after"] <= 1.1
