"""Expert-parallel groups as cluster workers, with real Ray actors and rank processes: every
worker is a group of 2 ranks (tiny MoE, 6 experts: 3 per rank). One router entry per group, KV
from a prefill group into a decode group's rank, a role switch moving streams live out of a
group, and a rank's death taking its worker down and the controller restarting the whole group;
greedy and seeded tokens equal one plain engine's throughout."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from pdserve.cluster.controller import ControllerConfig
from pdserve.cluster.planner import RolePlannerConfig
from pdserve.cluster_state import process_alive
from pdserve.engine import LLM, EngineConfig, SamplingParams
from tests.cluster.running_controller import running_controller
from tests.cluster.test_controller_and_faults import (
    expected,
    find,
    run_one,
    runner_for,
    tokens,
    wait_for_replacement,
    wait_until_all_released,
)
from tests.cluster.test_role_switch import run_with_switch
from tests.prompts import prompts_of

BLOCKS = 64  # per rank
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def controller(ray_session, moe_checkpoint):
    engine = EngineConfig(
        model=str(moe_checkpoint), dtype="float32", block_size=4, num_threads=1, progress=False,
        kv_cache_blocks=BLOCKS, expert_parallel={"size": 2, "timeout_s": 30},
    )  # fmt: skip
    config = ControllerConfig(
        engine, prefill=1, decode=2, heartbeat_interval_s=0.2, heartbeat_timeout_s=10.0,
        role_planner=RolePlannerConfig(enabled=False),
    )  # fmt: skip
    yield from running_controller(ray_session, config, "pdserve-controller-ep-test")


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=4, progress=False)


def test_a_group_is_one_worker_with_its_ranks_summed(ray_session, controller):
    workers = ray_session.get(controller.workers.remote())
    assert sorted(w.slot for w in workers) == ["decode-0", "decode-1", "prefill-0"]
    for w in workers:
        load = ray_session.get(w.handle.load.remote())
        assert [r.rank for r in load.ranks] == [0, 1]
        assert load.kv_blocks_total == 2 * BLOCKS == sum(r.kv_blocks_total for r in load.ranks)
        assert load.kv_blocks_free == sum(r.kv_blocks_free for r in load.ranks)
        assert len({load.pid, *(r.pid for r in load.ranks)}) == 3  # ranks are processes of their own
    text = ray_session.get(workers[0].handle.metrics_text.remote())
    assert f'pdserve_ep_ranks{{group="{workers[0].worker_id}"}} 2.0' in text


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_kv_handed_into_a_decode_group_decodes_token_exact(ray_session, controller, reference, params):
    prompts = [*prompts_of([5, 13, 9, 21], seed=51), prompts_of([7], seed=52)[0] * 2]
    runner = runner_for(controller, transfer_timeout_s=10.0)

    async def run():
        return await asyncio.gather(
            *(run_one(runner, f"ep-{params.seed}-{i}", p, params) for i, p in enumerate(prompts))
        )

    got = asyncio.run(run())
    assert [tokens(c) for c in got] == expected(reference, prompts, [params] * len(prompts))
    assert all(c[-1].finished for c in got)
    loads = wait_until_all_released(ray_session, controller)
    # The decode groups that ran anything ran experts on both ranks (rows crossed between them).
    ran = [load.ranks for load in loads if load.role == "decode" and any(r.expert_tokens for r in load.ranks)]
    assert ran and all(r.expert_tokens > 0 for ranks in ran for r in ranks)


def test_a_group_switches_role_as_one_unit_and_its_streams_move_out_live(ray_session, controller, reference):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = prompts_of([11, 17, 9, 14], seed=31)
    moved, record = asyncio.run(run_with_switch(controller, params, prompts, switch_after=4))
    assert record.error is None and record.moved >= 1, record
    assert (record.from_role, record.to_role) == ("decode", "prefill")
    assert moved == [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    wait_until_all_released(ray_session, controller)
    switched = next(
        w for w in ray_session.get(controller.workers.remote()) if w.worker_id == record.worker_id
    )
    assert switched.role == "prefill" and len(ray_session.get(switched.handle.load.remote()).ranks) == 2
    back = ray_session.get(controller.set_role.remote(record.worker_id, "decode"))
    assert back.error is None and back.to_role == "decode"


def test_a_dead_rank_takes_its_worker_down_and_the_group_restarts(ray_session, controller, reference):
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    prompt = prompts_of([9], seed=30)[0]
    runner = runner_for(controller, transfer_timeout_s=10.0)
    victim = {}

    async def run():
        chunks = []
        async for chunk in runner.run("ep-kill-rank", prompt, params):
            chunks.append(chunk)
            if len(chunks) == 3:
                w = find(ray_session, controller, "decode", lambda load: load.num_running == 1)
                load = ray_session.get(w.handle.load.remote())
                victim.update(slot=w.slot, id=w.worker_id, pids=[r.pid for r in load.ranks])
                os.kill(victim["pids"][1], signal.SIGKILL)
        return chunks

    chunks = asyncio.run(run())
    assert tokens(chunks) == expected(reference, [prompt], [params])[0]  # none lost, none twice
    fresh = wait_for_replacement(ray_session, controller, victim["slot"], victim["id"], timeout_s=180.0)
    assert fresh.worker_id == f"{victim['slot']}.r1"
    fresh_load = ray_session.get(fresh.handle.load.remote())
    assert len(fresh_load.ranks) == 2 and not {r.pid for r in fresh_load.ranks} & set(victim["pids"])
    deadline = time.monotonic() + 30  # the surviving rank went down with its group
    while process_alive(victim["pids"][0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not process_alive(victim["pids"][0])
    overview = ray_session.get(controller.overview.remote())
    death = next(e for e in overview.events if e.kind == "death" and e.worker_id == victim["id"])
    assert "expert-parallel group failed: rank 1" in death.text
    wait_until_all_released(ray_session, controller)
