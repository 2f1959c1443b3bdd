"""A mixed cluster (`expert_parallel: {size: 2, roles: [decode]}`), with real Ray actors, rank
processes and a real router: two plain prefill workers hand KV into one expert-parallel decode
group (tiny MoE, 6 experts: 3 per rank). Tokens equal one plain engine's; a slot keeps its kind
through a role switch and a restart; the group's ranks' prefix caches reach the router's index, so
a repeated long prompt is computed on the group, on the rank that holds it; the ranks' memory is
in the worker's RSS."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.cluster.controller import ControllerConfig
from pdserve.cluster.planner import RolePlannerConfig
from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.router.config import RouterConfig
from pdserve.router.request_runner import RunnerConfig
from tests.cluster.running_controller import running_controller
from tests.cluster.test_controller_and_faults import (
    expected,
    run_one,
    runner_for,
    tokens,
    wait_for_replacement,
    wait_until_all_released,
)
from tests.prompts import prompts_of
from tests.router.test_server import RouterThread, generate, request

BLOCKS = 64  # per engine (per rank in the group)
BLOCK = 4
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def controller(ray_session, moe_checkpoint):
    engine = EngineConfig(
        model=str(moe_checkpoint), dtype="float32", block_size=BLOCK, num_threads=1, progress=False,
        kv_cache_blocks=BLOCKS, expert_parallel={"size": 2, "timeout_s": 30},
    )  # fmt: skip
    config = ControllerConfig(
        engine, prefill=2, decode=1, heartbeat_interval_s=0.2, heartbeat_timeout_s=10.0,
        role_planner=RolePlannerConfig(enabled=False), expert_parallel_roles=("decode",),
    )  # fmt: skip
    yield from running_controller(ray_session, config, "pdserve-controller-mixed-ep-test")


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=BLOCK, progress=False)


def _loads(ray, controller) -> dict:
    return {w.slot: ray.get(w.handle.load.remote()) for w in ray.get(controller.workers.remote())}


def test_plain_prefill_workers_hand_kv_into_a_decode_group_token_exact(ray_session, controller, reference):
    loads = _loads(ray_session, controller)
    assert sorted(loads) == ["decode-0", "prefill-0", "prefill-1"]
    assert loads["prefill-0"].ranks == [] and loads["prefill-0"].kv_blocks_total == BLOCKS  # plain engines
    assert [r.rank for r in loads["decode-0"].ranks] == [0, 1] and loads[
        "decode-0"
    ].kv_blocks_total == 2 * BLOCKS
    prompts = [*prompts_of([5, 13, 9, 21], seed=61), prompts_of([7], seed=62)[0] * 2]
    runner = runner_for(controller, transfer_timeout_s=10.0)

    async def run():
        return await asyncio.gather(
            *(run_one(runner, f"mixed-{i}", p, GREEDY) for i, p in enumerate(prompts))
        )

    got = asyncio.run(run())
    assert [tokens(c) for c in got] == expected(reference, prompts, [GREEDY] * len(prompts))
    decode = next(load for load in wait_until_all_released(ray_session, controller) if load.role == "decode")
    assert all(r.expert_tokens > 0 for r in decode.ranks)  # both ranks' experts ran


def test_the_ranks_memory_is_in_the_workers_rss(ray_session, controller):
    loads = _loads(ray_session, controller)
    group, plain = loads["decode-0"], loads["prefill-0"]
    # Each rank holds the whole model but half the experts, and a KV pool: tens of MiB at least.
    assert all(r.rss_bytes > 50 * 2**20 for r in group.ranks)
    ranks = sum(r.rss_bytes for r in group.ranks)
    assert ranks < group.rss_bytes < ranks + 2 * plain.rss_bytes  # the owner's own, plus its ranks'
    text = ray_session.get(next(w for w in ray_session.get(controller.workers.remote())
                                if w.slot == "decode-0").handle.metrics_text.remote())  # fmt: skip
    line = next(ln for ln in text.splitlines() if ln.startswith("pdserve_worker_resident_memory_bytes{"))
    assert float(line.split()[-1]) > ranks


def test_a_repeated_long_prompt_is_computed_on_the_group_by_the_rank_holding_it(
    ray_session, controller, reference
):
    # The router computes a prompt on the decode worker itself when at most 64 of its tokens are
    # missing from that worker's prefix cache (as the index knows it): 90 tokens go through a
    # prefill worker the first time. A holds rank 0 while B arrives, so B's KV lands on rank 1.
    router = RouterThread(controller, RouterConfig(port=0, runner=RunnerConfig(transfer_timeout_s=10.0)))
    try:
        a, b = prompts_of([90, 90], seed=63)
        stream_a = router.stub.Generate(request(a, max_tokens=40, ignore_eos=True), timeout=120)
        first_a = next(stream_a)
        assert first_a.token_ids
        _, first_b = generate(router.stub, b, max_tokens=2, ignore_eos=True)
        rest_a = list(stream_a)
        assert first_b[-1].usage.cached_tokens == 0
        assert [t for c in [first_a, *rest_a] for t in c.token_ids] == expected(
            reference, [a], [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
        )[0]
        before = _loads(ray_session, controller)
        time.sleep(1.0)  # the group's cache changes reach the index on the feed link
        got, second_b = generate(router.stub, b, max_tokens=6, ignore_eos=True)
        after = wait_until_all_released(ray_session, controller)
        assert (
            got == expected(reference, [b], [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)])[0]
        )
        # 90 tokens = 22 full blocks; the block holding the last prompt token is never reused.
        assert second_b[-1].usage.cached_tokens == 88
        group = next(load for load in after if load.role == "decode")
        assert group.prefix_cache_hit_tokens - before["decode-0"].prefix_cache_hit_tokens == 88
        prefill = [load for load in after if load.role == "prefill"]
        queried = sum(before[s].prefix_cache_queried_tokens for s in ("prefill-0", "prefill-1"))
        assert (
            sum(load.prefix_cache_queried_tokens for load in prefill) == queried
        )  # no prefill worker saw it
    finally:
        router.stop()


def test_a_slot_keeps_its_kind_through_a_role_switch_and_a_restart(ray_session, controller):
    switch = ray_session.get(controller.set_role.remote("prefill-1", "decode"))
    assert switch.error is None and switch.to_role == "decode"
    moved = next(w for w in ray_session.get(controller.workers.remote()) if w.slot == "prefill-1")
    assert moved.role == "decode" and ray_session.get(moved.handle.load.remote()).ranks == []  # still plain
    ray_session.get(controller.restart.remote(moved.worker_id))
    fresh = wait_for_replacement(ray_session, controller, "prefill-1", moved.worker_id, timeout_s=180.0)
    assert fresh.role == "decode" and ray_session.get(fresh.handle.load.remote()).ranks == []  # plain again
    back = ray_session.get(controller.set_role.remote(fresh.worker_id, "prefill"))
    assert back.error is None
    wait_until_all_released(ray_session, controller)
