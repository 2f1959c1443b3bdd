"""An expert-parallel group's prefix cache (real rank processes): the ranks' cached blocks are the
group's, reported as one engine reports its own, and a prompt goes to the rank holding its prefix
until that rank is PREFIX_LOAD_SLACK requests busier than the least-loaded one. Its ranks' start-up
phases reach the owner."""

from __future__ import annotations

from pdserve.engine.block_hash import hash_blocks
from pdserve.engine.block_pool import KVCacheEvent
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.expert_parallel.group import PREFIX_LOAD_SLACK, ExpertParallelGroup
from pdserve.engine.llm import LLM
from pdserve.engine.sampling_params import SamplingParams
from tests.prompts import prompts_of

BLOCK = 8
PARAMS = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def run(group: ExpertParallelGroup) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while group.has_unfinished():
        for delta in group.step():
            out.setdefault(delta.request_id, []).extend(delta.new_token_ids)
    return out


def test_the_ranks_prefix_caches_are_the_groups_and_a_prompt_follows_its_prefix():
    config = EngineConfig(
        model="demo", dtype="float32", num_threads=1, progress=False, block_size=BLOCK,
        expert_parallel={"size": 2},
    )  # fmt: skip
    events: list[KVCacheEvent] = []
    phases: list[str] = []
    group = ExpertParallelGroup(config, on_cache_event=events.append, on_phase=phases.append)
    try:
        # The ranks' start-up phases reach the owner (the worker's progress line), each rank's
        # ending with its KV pool.
        assert phases[0] in (
            "rank 0 importing the engine, rank 1 starting",
            "rank 0 starting, rank 1 importing the engine",
        )
        assert any("rank 1 loading weights" in p for p in phases) and any(
            "rank 0 joining" in p for p in phases
        )
        assert [p.split(" (")[0] for p in phases[-1].split("), ")] == [
            "rank 0 allocating KV cache",
            "rank 1 allocating KV cache",
        ]
        a, b = prompts_of([41, 41], seed=71)
        group.add_request("a", a, PARAMS)  # both idle: rank 0
        group.add_request("b", b, PARAMS)  # rank 0 holds one: rank 1
        first = run(group)
        blocks_a, blocks_b = hash_blocks(a, BLOCK), hash_blocks(b, BLOCK)
        cached = set(group.cached_block_hashes())
        assert set(blocks_a) | set(blocks_b) <= cached
        stored = {h for e in events for h in e.stored} - {h for e in events for h in e.removed}
        assert stored == cached  # the changes reported add up to what is cached

        # b's prefix lives on rank 1: it goes there, and again, until rank 1 holds SLACK more.
        hits = group.stats().prefix_cache_hit_tokens
        placed = []
        for i in range(PREFIX_LOAD_SLACK + 2):
            group.add_request(f"b{i}", b, PARAMS)
            placed.append(group._rank_of[f"b{i}"])
        assert placed == [1] * (PREFIX_LOAD_SLACK + 1) + [0]
        again = run(group)
        assert all(again[f"b{i}"] == first["b"] for i in range(PREFIX_LOAD_SLACK + 2))
        # The three on rank 1 reused b's 5 full blocks (the last prompt token's block is computed).
        assert group.stats().prefix_cache_hit_tokens - hits == (PREFIX_LOAD_SLACK + 1) * 5 * BLOCK
        one = LLM("demo", dtype="float32", num_threads=1, progress=False, block_size=BLOCK)
        assert first["b"] == one.generate([b], PARAMS)[0].outputs[0].token_ids
    finally:
        group.close()
