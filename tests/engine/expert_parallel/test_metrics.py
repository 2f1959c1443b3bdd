"""An expert-parallel group's Prometheus metrics count what they say: token slots per expert and
per rank per MoE layer sum to tokens x top_k, and rebalances and imbalance show."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine.expert_parallel.collective import ExpertCollective
from pdserve.engine.expert_parallel.dispatch import ExpertDispatcher
from pdserve.engine.expert_parallel.metrics import ExpertParallelMetrics
from pdserve.engine.expert_parallel.placement import ExpertPlacement
from pdserve.engine.llm import LLM
from pdserve.engine.sampling_params import SamplingParams

ARGS = {"dtype": "float32", "num_threads": 1, "progress": False, "block_size": 8}
DEMO_TOP_K = 2  # moe_k of engine/demo_models/demo/config.json


class LoopbackCollective(ExpertCollective):
    """A group of one: every all-to-all hands the rows back (isolates the dispatcher's counting)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__(rank=0, size=1, timeout_s=1.0)

    def all_to_all(self, send, send_counts, recv_counts):
        assert send_counts == recv_counts
        return send.clone()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value) of a text exposition."""
    out = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def test_known_routing_is_counted_per_expert_and_per_rank():
    experts, hidden = 4, 8
    dispatcher = ExpertDispatcher(
        LoopbackCollective(), ExpertPlacement.initial([3], experts, 1, 0), hidden_size=hidden
    )
    # Expert e multiplies by e + 1, so the combined output checks the routing too.
    dispatcher.register(3, lambda rows, local: rows * (local + 1).unsqueeze(-1).to(rows.dtype))
    ids = torch.tensor([[0, 2], [2, 3], [2, 0], [1, 2], [3, 3]])
    weights = torch.full(ids.shape, 0.5)
    x = torch.randn(len(ids), hidden)
    out = dispatcher.dispatch(3, x, weights, ids)
    dispatcher.finish_step()
    assert torch.allclose(out, x * ((ids + 1).float() * 0.5).sum(1, keepdim=True))
    assert dispatcher.stats.expert_tokens == {3: [2, 1, 4, 3]}
    assert dispatcher.stats.layer_rows == {3: ids.numel()}

    metrics = ExpertParallelMetrics("g")
    metrics.add_expert_tokens(dispatcher.stats.expert_tokens)
    stats = {"rank": 0, "layer_rows": dict(dispatcher.stats.layer_rows), "dispatch_seconds": 0.25}
    stats |= {"expert_compute_seconds": 0.0, "rows_sent": 0, "rows_received": 0, "rounds": 2}
    metrics.rank_stats([stats])
    metrics.rank_stats([stats])  # the same totals again add nothing
    got = samples(metrics.text())
    per_expert = {s["expert"]: v for s, v in got["pdserve_ep_expert_tokens_total"]}
    assert per_expert == {"0": 2, "1": 1, "2": 4, "3": 3}
    assert got["pdserve_ep_rank_tokens_total"] == [({"group": "g", "rank": "0", "layer": "3"}, 10.0)]
    assert got["pdserve_ep_dispatch_seconds_total"] == [({"group": "g", "rank": "0"}, 0.25)]
    assert got["pdserve_ep_rounds_total"] == [({"group": "g", "rank": "0"}, 2.0)]


def test_group_metrics_count_every_token_slot():
    prompts = ["def add(a, b):", "class Engine:", "The quick brown", "x = [1, 2,"]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = LLM("demo", **ARGS, expert_parallel={"size": 2, "num_redundant_experts": 2})
    try:
        group = llm.engine
        outputs = llm.generate(prompts, params)
        # Each sequence runs its prompt and every generated token but the last through the model.
        tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs)
        top_k = DEMO_TOP_K
        got = samples(llm.metrics_text())

        per_layer = defaultdict(float)
        for labels, value in got["pdserve_ep_expert_tokens_total"]:
            per_layer[labels["layer"]] += value
        assert per_layer and all(v == tokens * top_k for v in per_layer.values()), (per_layer, tokens)
        by_rank = defaultdict(float)
        ranks_per_layer = defaultdict(set)
        for labels, value in got["pdserve_ep_rank_tokens_total"]:
            by_rank[labels["layer"]] += value
            ranks_per_layer[labels["layer"]].add(labels["rank"])
        assert dict(by_rank) == dict(per_layer)
        assert all(r == {"0", "1"} for r in ranks_per_layer.values())  # both ranks' experts worked
        assert all(v > 0 for _, v in got["pdserve_ep_dispatch_seconds_total"])
        assert sum(v for _, v in got["pdserve_ep_rows_sent_total"]) > 0
        [(_, imbalance)] = got["pdserve_ep_imbalance"]
        assert imbalance == group.imbalance() and imbalance >= 1.0
        assert got["pdserve_ep_rebalances_total"] == [({"group": group.name}, 0.0)]

        group.rebalance()
        llm.generate(prompts[:1], params)
        got = samples(llm.metrics_text())
        assert got["pdserve_ep_rebalances_total"] == [({"group": group.name}, 1.0)]
        assert got["pdserve_ep_placement_version"] == [({"group": group.name}, 1.0)]
        # Counters keep counting across the rebalance (the balancing counts start over).
        first = len(outputs[0].prompt_token_ids) + len(outputs[0].outputs[0].token_ids) - 1
        per_layer_after = defaultdict(float)
        for labels, value in got["pdserve_ep_expert_tokens_total"]:
            per_layer_after[labels["layer"]] += value
        assert all(v == (tokens + first) * top_k for v in per_layer_after.values())
        assert np.isclose(
            sum(v for _, v in got["pdserve_ep_rank_tokens_total"]), sum(per_layer_after.values())
        )
    finally:
        llm.close()
