"""An expert-parallel group of real rank processes (Gloo all-to-all over loopback) against one
engine: fp32, greedy and seeded outputs must be token-identical."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pdserve.engine.expert_parallel.group import GroupFailed
from pdserve.engine.llm import LLM
from pdserve.engine.sampling_params import SamplingParams

PROMPTS = [
    "def add(a, b):",
    "import os\nimport",
    "class Engine:",
    "The quick brown",
    "print('hello",
    "x = [1, 2,",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
SEEDED = [
    SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=10) for i in range(len(PROMPTS))
]
ARGS = {"dtype": "float32", "num_threads": 1, "progress": False, "block_size": 8}


def tokens(llm: LLM, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def reference() -> dict[str, list[list[int]]]:
    one = LLM("demo", **ARGS)
    return {"greedy": tokens(one, GREEDY), "seeded": tokens(one, SEEDED)}


@pytest.mark.parametrize("size", [2, 4])
def test_group_matches_one_engine(reference, size):
    group = LLM("demo", **ARGS, expert_parallel={"size": size})
    try:
        assert tokens(group, GREEDY) == reference["greedy"]
        assert tokens(group, SEEDED) == reference["seeded"]
        stats = group.engine.rank_stats()
        # Every rank ran sequences and exchanged rows with the others.
        assert all(s["steps"] > 0 and s["rows_sent"] > 0 and s["rows_received"] > 0 for s in stats)
    finally:
        group.close()


def test_redundant_experts_and_rebalance_keep_tokens(reference):
    group = LLM("demo", **ARGS, expert_parallel={"size": 2, "num_redundant_experts": 4})
    try:
        assert tokens(group, GREEDY) == reference["greedy"]
        before = group.engine.placement
        after = group.engine.rebalance()
        assert after.version == before.version + 1
        assert tokens(group, GREEDY) == reference["greedy"]
        assert tokens(group, SEEDED) == reference["seeded"]
    finally:
        group.close()


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_speculative_decoding_through_the_group(method):
    spec = {"method": method, "num_speculative_tokens": 3}
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    plain = tokens(LLM("demo", **ARGS), greedy)
    group = LLM("demo", **ARGS, speculative_config=spec, expert_parallel={"size": 2})
    try:
        assert tokens(group, greedy) == plain
    finally:
        group.close()


def test_a_dead_rank_fails_the_group_without_hanging():
    # The survivor waits in a collective for the dead rank (up to timeout_s); the group watches
    # every rank at once, so it fails well before that.
    group = LLM("demo", **ARGS, expert_parallel={"size": 2, "timeout_s": 60})
    try:
        group.engine.add_request("a", group.engine.tokenize("def add(a, b):"), GREEDY)
        group.engine.add_request("b", group.engine.tokenize("class Engine:"), GREEDY)
        os.kill(group.engine.ranks.pids[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(GroupFailed, match="rank 1"):
            while group.engine.has_unfinished():
                group.engine.step()
        assert time.monotonic() - started < 15
        assert not any(group.engine.ranks.alive())
    finally:
        group.close()


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"expert_parallel\.num_redundant_experts"):
        LLM("demo", **ARGS, expert_parallel={"size": 2, "num_redundant_experts": 3})
    with pytest.raises(ValueError, match="unknown keys"):
        LLM("demo", **ARGS, expert_parallel={"sizes": 2})
    with pytest.raises(ValueError, match=r"expert_parallel\.size must be"):
        LLM("demo", **ARGS, expert_parallel={"size": 0})
