"""Role switches in place with real Ray workers: live migration of running requests (token-exact,
with speculative decoding on), prompts handed back, blocks freed on every side, and refusals."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.cluster.controller import ControllerConfig
from pdserve.cluster.planner import RolePlannerConfig
from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.router.request_runner import RequestRunner, RunnerConfig
from tests.cluster.controller_placement import ControllerPlacement
from tests.cluster.running_controller import running_controller
from tests.cluster.test_controller_and_faults import wait_until_all_released
from tests.prompts import prompts_of

BLOCKS = 96
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}


def switch_controller(ray, checkpoint, name: str, decode: int, speculative_config=None, blocks: int = BLOCKS):
    """A controller with 1 prefill and `decode` decode workers of `blocks` KV blocks each, its planner
    off (the switches in these tests are the tests' own); yields its handle and shuts it down after."""
    engine = EngineConfig(
        model=str(checkpoint), dtype="float32", block_size=4, num_threads=1, progress=False,
        kv_cache_blocks=blocks, speculative_config=speculative_config,
    )  # fmt: skip
    config = ControllerConfig(
        engine, prefill=1, decode=decode, heartbeat_interval_s=0.2, heartbeat_timeout_s=5.0,
        role_planner=RolePlannerConfig(enabled=False),
    )  # fmt: skip
    yield from running_controller(ray, config, name)


@pytest.fixture(scope="module")
def controller(ray_session, moe_checkpoint):
    yield from switch_controller(ray_session, moe_checkpoint, "pdserve-controller-switch-test", 2, NGRAM)


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=4, progress=False)


async def run_with_switch(controller, params, prompts, switch_after: int | None):
    """Streams every prompt; once each has `switch_after` tokens, switches the decode worker that
    runs the most of them to prefill. Returns each stream's tokens and the switch's record."""
    runner = RequestRunner(ControllerPlacement(controller), RunnerConfig(transfer_timeout_s=10.0))
    counts = [0] * len(prompts)

    async def one(i):
        out = []
        async for chunk in runner.run(f"sw-{switch_after}-{i}-{params.seed}", prompts[i], params):
            out += chunk.token_ids
            counts[i] = len(out)
        return out

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    record = None
    if switch_after is not None:
        while min(counts) < switch_after:
            await asyncio.sleep(0.01)
        decodes = await controller.workers.remote("decode")
        loads = [await w.handle.load.remote() for w in decodes]
        source = max(zip(decodes, loads, strict=True), key=lambda p: p[1].num_running)[0]
        record = await controller.set_role.remote(source.worker_id, "prefill")
    return await asyncio.gather(*tasks), record


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=40, ignore_eos=True, seed=5),
    ],
    ids=["greedy", "seeded"],
)
def test_a_decode_worker_switching_moves_its_streams_live_and_exactly(
    ray_session, controller, reference, params
):
    prompts = prompts_of([11, 17, 9, 14], seed=31)
    plain, _ = asyncio.run(run_with_switch(controller, params, prompts, None))
    moved, record = asyncio.run(run_with_switch(controller, params, prompts, switch_after=4))
    assert record.error is None and record.moved >= 1, record
    assert (record.from_role, record.to_role) == ("decode", "prefill")
    # Every stream has exactly the tokens it has without a switch (and, greedy, one engine's).
    assert moved == plain
    if params.temperature == 0:
        assert moved == [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    wait_until_all_released(ray_session, controller)
    roles = sorted(w.role for w in ray_session.get(controller.workers.remote()))
    assert roles == ["decode", "prefill", "prefill"]
    # Back again (a prefill worker with nothing queued switches at once), for the next test.
    back = ray_session.get(controller.set_role.remote(record.worker_id, "decode"))
    assert back.error is None and back.handed_back == 0


def test_refused_switches_say_why(ray_session, controller):
    def refused(worker_id, role):
        with pytest.raises(Exception) as err:
            ray_session.get(controller.set_role.remote(worker_id, role))
        return str(err.value)

    assert "last prefill worker" in refused("prefill-0", "decode")
    assert "no worker 'nobody'" in refused("nobody", "decode")
    assert "role must be one of" in refused("decode-0", "chef")
    assert "already has role decode" in refused("decode-0", "decode")


def test_a_switch_with_nothing_running_is_quick_and_recorded(ray_session, controller):
    record = ray_session.get(controller.set_role.remote("decode-1", "prefill"))
    assert record.error is None and record.moved == 0 and record.seconds < 5
    state = ray_session.get(controller.planner.remote("status"))
    assert state.switches[-1].worker_id == "decode-1" and not state.running
    assert ray_session.get(controller.set_role.remote("decode-1", "decode")).to_role == "decode"
    text = ray_session.get(controller.metrics_text.remote())
    assert 'pdserve_role_switches_total{from="decode",reason="manual",to="prefill"}' in text
    wait_until_all_released(ray_session, controller)
