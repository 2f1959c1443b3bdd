"""The controller and the request runner with real Ray actors: 2+2 correctness, and faults.

Every fault test kills a real worker process at a chosen moment and checks that the stream
still carries each token exactly once (greedy output equal to one engine alone), that the
controller replaces the dead worker, and that the survivors' KV blocks all come back.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.cluster.controller import ControllerConfig
from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.engine.errors import InvalidRequestError
from pdserve.router.request_runner import RequestFailed, RequestRunner, RunnerConfig
from tests.cluster.controller_placement import ControllerPlacement
from tests.cluster.running_controller import running_controller
from tests.prompts import prompts_of

BLOCKS = 96


@pytest.fixture(scope="module")
def controller(ray_session, moe_checkpoint):
    engine = EngineConfig(
        model=str(moe_checkpoint),
        dtype="float32",
        block_size=4,
        num_threads=1,
        progress=False,
        kv_cache_blocks=BLOCKS,
    )
    config = ControllerConfig(engine, prefill=2, decode=2, heartbeat_interval_s=0.2, heartbeat_timeout_s=5.0)
    yield from running_controller(ray_session, config, "pdserve-controller-test")


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=4, progress=False)


def expected(reference, prompts, params):
    return [o.outputs[0].token_ids for o in reference.generate(prompts, params)]


def runner_for(controller, **kw) -> RequestRunner:
    kw.setdefault("transfer_timeout_s", 3.0)
    return RequestRunner(ControllerPlacement(controller), RunnerConfig(**kw))


async def run_one(runner, rid, prompt, params):
    return [c async for c in runner.run(rid, prompt, params)]


def tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


def wait_until_all_released(ray, controller, timeout_s=20.0):
    """Every live worker back to all blocks free, nothing queued, nothing waiting to be sent."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [ray.get(w.handle.load.remote()) for w in ray.get(controller.workers.remote())]
        busy = [
            load
            for load in loads
            if load.kv_blocks_free != load.kv_blocks_total
            or load.num_running
            or load.num_waiting
            or load.num_pending_sends
        ]
        if not busy or time.monotonic() > deadline:
            assert not busy, busy
            return loads
        time.sleep(0.1)


def wait_for_replacement(ray, controller, slot, old_id, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for w in ray.get(controller.workers.remote()):
            if w.slot == slot and w.worker_id != old_id and w.load is not None:
                return w
        time.sleep(0.2)
    raise AssertionError(f"{slot} was not replaced")


def find(ray, controller, role, predicate):
    for w in ray.get(controller.workers.remote(role)):
        if predicate(ray.get(w.handle.load.remote())):
            return w
    return None


def test_controller_reports_workers_roles_and_load(ray_session, controller):
    workers = ray_session.get(controller.workers.remote())
    assert sorted(w.slot for w in workers) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
    assert all(w.alive and w.load is not None and w.load.kv_blocks_total == BLOCKS for w in workers)
    assert {w.role for w in workers} == {"prefill", "decode"}
    assert [w.slot for w in ray_session.get(controller.workers.remote("decode"))] == ["decode-0", "decode-1"]


def test_workers_changed_answers_with_news_and_only_then(ray_session, controller):
    """A router's long poll: a stale version is answered at once; a drain is news at once
    (before the next heartbeat would be due at a poll's pace); every answer moves the version."""

    async def run():
        start = time.monotonic()
        listing = await controller.workers_changed.remote(-1, 30.0)
        stale_s = time.monotonic() - start
        target = next(w for w in listing.workers if w.slot == "decode-1")
        await controller.drain.remote(target.worker_id, True)
        start, versions = time.monotonic(), [listing.version]
        try:
            while True:
                listing = await controller.workers_changed.remote(listing.version, 30.0)
                versions.append(listing.version)
                now = next(w for w in listing.workers if w.worker_id == target.worker_id)
                if now.load.drained:
                    break
            news_s = time.monotonic() - start
        finally:
            await controller.drain.remote(target.worker_id, False)
        return stale_s, news_s, versions

    stale_s, news_s, versions = asyncio.run(run())
    assert stale_s < 1.0 and news_s < 1.0, (stale_s, news_s)
    assert versions == sorted(set(versions))  # each answer is a newer version


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=10, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_two_plus_two_equals_one_engine(ray_session, controller, reference, params):
    shared = prompts_of([12], seed=21)[0]
    prompts = [*prompts_of([3, 15, 26, 8], seed=20), [*shared, 4, 5], [*shared, 6]]
    runner = runner_for(controller)

    async def run():
        return await asyncio.gather(
            *(run_one(runner, f"pp-{params.seed}-{i}", p, params) for i, p in enumerate(prompts))
        )

    got = asyncio.run(run())
    assert [tokens(c) for c in got] == expected(reference, prompts, [params] * len(prompts))
    assert all(c[-1].finished and c[0].num_prompt_tokens == len(p) for c, p in zip(got, prompts))
    wait_until_all_released(ray_session, controller)


def test_decode_killed_mid_stream_continues_elsewhere(ray_session, controller, reference):
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    prompt = prompts_of([9], seed=30)[0]
    runner = runner_for(controller)
    victim = {}

    async def run():
        chunks = []
        async for chunk in runner.run("kill-decode", prompt, params):
            chunks.append(chunk)
            if len(chunks) == 3:
                w = find(ray_session, controller, "decode", lambda load: load.num_running == 1)
                victim.update(slot=w.slot, id=w.worker_id)
                ray_session.kill(w.handle)
        return chunks

    chunks = asyncio.run(run())
    assert tokens(chunks) == expected(reference, [prompt], [params])[0]  # none lost, none twice
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    fresh = wait_for_replacement(ray_session, controller, victim["slot"], victim["id"])
    assert fresh.worker_id == f"{victim['slot']}.r1" and fresh.restarts == 1
    wait_until_all_released(ray_session, controller)


def test_prefill_killed_before_its_kv_arrives_is_prefilled_again(ray_session, controller, reference):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = prompts_of([14], seed=31)[0]
    runner = runner_for(controller)
    victim = {}

    async def kill_prefill(request_id):
        if victim:
            return
        w = find(ray_session, controller, "prefill", lambda load: load.num_pending_sends == 1)
        victim.update(slot=w.slot, id=w.worker_id)
        ray_session.kill(w.handle)
        await asyncio.sleep(0.5)  # let the process die before the transfer starts

    runner.after_prefill = kill_prefill

    async def run():
        return await run_one(runner, "kill-prefill", prompt, params)

    chunks = asyncio.run(run())
    assert tokens(chunks) == expected(reference, [prompt], [params])[0]
    wait_for_replacement(ray_session, controller, victim["slot"], victim["id"])
    wait_until_all_released(ray_session, controller)


def test_transfer_timeout_to_a_vanished_decode_retries_elsewhere(ray_session, controller, reference):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = prompts_of([11], seed=32)[0]
    runner = runner_for(controller, transfer_timeout_s=2.0)
    victim = {}

    async def kill_decode(request_id):
        if victim:
            return
        # The decode worker holding this request's reservation disappears before the KV moves:
        # the prefill side's send can only time out.
        w = find(ray_session, controller, "decode", lambda load: load.kv_blocks_free < load.kv_blocks_total)
        victim.update(slot=w.slot, id=w.worker_id)
        ray_session.kill(w.handle)

    runner.after_prefill = kill_decode

    chunks = asyncio.run(run_one(runner, "vanished-decode", prompt, params))
    assert tokens(chunks) == expected(reference, [prompt], [params])[0]
    wait_for_replacement(ray_session, controller, victim["slot"], victim["id"])
    wait_until_all_released(ray_session, controller)


def test_no_room_anywhere_fails_clearly_after_the_admission_timeout(ray_session, controller):
    prompt = prompts_of([BLOCKS * 4], seed=33)[0]  # more tokens than any decode worker's pool
    runner = runner_for(controller, admission_timeout_s=0.5)
    with pytest.raises(RequestFailed, match="no decode worker had room"):
        asyncio.run(run_one(runner, "too-big", prompt, SamplingParams(max_tokens=2)))
    wait_until_all_released(ray_session, controller)


def test_a_request_the_engine_refuses_fails_once_without_migrating(ray_session, controller):
    # Token ids outside the vocabulary reach the engine here (the router would refuse them first):
    # its typed error must end the request at once instead of being taken for a dead worker.
    vocab = ray_session.get(controller.served_model.remote()).vocab_size
    restarts = {w.slot: w.restarts for w in ray_session.get(controller.workers.remote())}
    placement = ControllerPlacement(controller)
    choices = []
    choose = placement.choose

    async def counted(prompt, avoid, group=None):
        choices.append(set(avoid))
        return await choose(prompt, avoid, group)

    placement.choose = counted
    runner = RequestRunner(placement, RunnerConfig(max_migrations=3, transfer_timeout_s=3.0))
    with pytest.raises(InvalidRequestError, match=r"prompt token ids must be integers in \[0, "):
        asyncio.run(run_one(runner, "refused", [3, vocab + 5, 4], SamplingParams(max_tokens=2)))
    assert choices == [set()]  # one attempt: no worker was avoided or retried
    assert {w.slot: w.restarts for w in ray_session.get(controller.workers.remote())} == restarts
    wait_until_all_released(ray_session, controller)
