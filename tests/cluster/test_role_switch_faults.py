"""Role switches under faults, with real Ray actors: the switching worker dies mid-migration, the
migration target dies while receiving, two switches of one worker race. Every request still
completes with exactly the tokens plain decoding gives, and every live worker frees its blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.router.request_runner import RequestRunner, RunnerConfig
from tests.cluster.controller_placement import ControllerPlacement
from tests.cluster.test_controller_and_faults import wait_until_all_released
from tests.cluster.test_role_switch import switch_controller
from tests.prompts import prompts_of

# Long streams: the switch must find them running however fast the workers decode (with 32 tokens
# they could all end before the controller began moving them, and the faults never happened).
GREEDY = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
BLOCKS = 512  # of 4 tokens per decode worker: room for all four streams on one


@pytest.fixture(scope="module")
def controller(ray_session, moe_checkpoint):
    yield from switch_controller(
        ray_session, moe_checkpoint, "pdserve-controller-switch-faults", 3, blocks=BLOCKS
    )


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=4, progress=False)


class Sabotage(ControllerPlacement):
    """The test placement, with a hook where a moved request's target is chosen (mid-migration)."""

    def __init__(self, controller, at_move) -> None:
        super().__init__(controller)
        self.at_move = at_move

    async def decode_target(self, num_tokens: int, avoid: set[str]):
        target = await super().decode_target(num_tokens, avoid)
        await self.at_move(avoid, target)
        return target


async def switch_under_load(ray, controller, prompts, at_move):
    """Streams the prompts, switches the busiest decode worker to prefill once each has tokens, and
    calls `at_move(avoid, target)` when a moved request's target is chosen; returns the outputs."""
    runner = RequestRunner(Sabotage(controller, at_move), RunnerConfig(transfer_timeout_s=5.0))
    counts = [0] * len(prompts)

    async def one(i):
        out = []
        async for chunk in runner.run(f"fault-{id(at_move)}-{i}", prompts[i], GREEDY):
            out += chunk.token_ids
            counts[i] = len(out)
        return out

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    while min(counts) < 3:
        await asyncio.sleep(0.01)
    decodes = await controller.workers.remote("decode")
    loads = [await w.handle.load.remote() for w in decodes]
    source = max(zip(decodes, loads, strict=True), key=lambda p: p[1].num_running)[0]
    switch = asyncio.ensure_future(controller.set_role.remote(source.worker_id, "prefill"))
    outputs = await asyncio.gather(*tasks)
    await asyncio.gather(switch, return_exceptions=True)  # it may fail with its worker
    return outputs


def kill_once(ray, controller, pick):
    """An `at_move` hook that kills one worker (chosen by `pick(avoid, target)`) the first time."""
    killed = []

    async def at_move(avoid, target):
        if not killed:
            victim = pick(avoid, target)
            killed.append(victim)
            workers = await controller.workers.remote()
            ray.kill(next(w.handle for w in workers if w.worker_id == victim))

    return at_move, killed


def check_exact_and_released(ray, controller, reference, prompts, outputs):
    assert outputs == [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY)]
    wait_until_all_released(ray, controller, timeout_s=60.0)


def restore(ray, controller, timeout_s: float = 120.0):
    """Back to 1 prefill + 3 decode serving workers for the next test: a switched worker back to
    decode, and the killed one's replacement loaded."""
    for w in ray.get(controller.workers.remote()):
        if w.role == "prefill" and not w.worker_id.startswith("prefill-"):
            ray.get(controller.set_role.remote(w.worker_id, "decode"))
    deadline = time.monotonic() + timeout_s
    while sorted(w.role for w in ray.get(controller.workers.remote())) != ["decode"] * 3 + ["prefill"]:
        assert time.monotonic() < deadline, ray.get(controller.workers.remote())
        time.sleep(0.2)


def test_the_switching_worker_dies_mid_migration(ray_session, controller, reference):
    prompts = prompts_of([10, 13, 8, 15], seed=41)
    at_move, killed = kill_once(
        ray_session, controller, lambda avoid, target: next(iter(avoid))
    )  # the source
    outputs = asyncio.run(switch_under_load(ray_session, controller, prompts, at_move))
    assert killed, "no request was moved"
    check_exact_and_released(ray_session, controller, reference, prompts, outputs)
    restore(ray_session, controller)


def test_the_migration_target_dies_while_receiving(ray_session, controller, reference):
    prompts = prompts_of([12, 9, 14, 11], seed=43)
    at_move, killed = kill_once(ray_session, controller, lambda avoid, target: target.worker_id)
    outputs = asyncio.run(switch_under_load(ray_session, controller, prompts, at_move))
    assert killed, "no request was moved"
    check_exact_and_released(ray_session, controller, reference, prompts, outputs)
    restore(ray_session, controller)


def test_two_switches_of_one_worker_race_and_one_is_refused(ray_session, controller):
    wait_until_all_released(ray_session, controller, timeout_s=60.0)
    decode = next(w for w in ray_session.get(controller.workers.remote("decode")))

    async def race():
        return await asyncio.gather(
            controller.set_role.remote(decode.worker_id, "prefill"),
            controller.set_role.remote(decode.worker_id, "prefill"),
            return_exceptions=True,
        )

    results = asyncio.run(race())
    done = [r for r in results if not isinstance(r, BaseException)]
    refused = [str(r) for r in results if isinstance(r, BaseException)]
    assert len(done) == 1 and done[0].to_role == "prefill"
    assert len(refused) == 1 and ("already switching" in refused[0] or "already has role" in refused[0])
    ray_session.get(controller.set_role.remote(decode.worker_id, "decode"))
