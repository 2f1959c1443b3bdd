"""Issue 26, item 8: recovery without errors, with real Ray actors and the real gRPC router.

A decode worker is killed (`ray.kill`: its process ends at once, as with kill -9) while a second
decode worker is alive. Its streams continue on the survivor with exactly the tokens greedy
decoding gives, requests arriving in the same moment are served, and nothing waits for the
replacement: here replacements start loading only when the test opens a gate, and everything
finishes while the gate is still shut.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from pdserve.cluster.controller import Controller, ControllerConfig, WorkerInfo
from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.roles.handoff import WorkerRef
from pdserve.roles.kv_channel import Endpoint
from pdserve.roles.messages import WorkerLoad
from pdserve.router.cluster_view import ClusterView
from pdserve.router.config import RouterConfig
from pdserve.router.metrics import RouterMetrics
from pdserve.router.placement import RouterPlacement
from pdserve.router.policies import make_policy
from pdserve.router.prefix_index import make_prefix_index
from pdserve.router.request_runner import RequestRunner, RunnerConfig
from tests.prompts import prompts_of
from tests.roles.test_worker import metric
from tests.router.test_server import RouterThread, generate, request

BLOCK = 4
BLOCKS = 512  # per worker: every stream of these tests fits on one decode worker at once
PARAMS = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


class GatedRestarts(Controller):
    """The real controller, except that replacements start only once `open_restarts` is called.

    So a test can tell that no request waited for a replacement without timing anything.
    """

    def __init__(self, config: ControllerConfig) -> None:
        super().__init__(config)
        self._gate = asyncio.Event()
        self._at_gate = 0

    async def open_restarts(self) -> None:
        self._gate.set()

    async def close_restarts(self) -> None:
        self._gate.clear()

    async def restarts_waiting(self) -> int:
        """Replacements held at the gate (not started yet)."""
        return self._at_gate

    async def _launch(self, slot: str, role: str, restarts: int) -> WorkerInfo:
        if restarts:
            self._at_gate += 1
            try:
                await self._gate.wait()
            finally:
                self._at_gate -= 1
        return await super()._launch(slot, role, restarts)


@pytest.fixture(scope="module")
def cluster(ray_session, moe_checkpoint):
    """One prefill and two decode workers under a gated controller, and a router over them."""
    engine = EngineConfig(
        model=str(moe_checkpoint), dtype="float32", block_size=BLOCK, num_threads=1, progress=False,
        kv_cache_blocks=BLOCKS,
    )  # fmt: skip
    config = ControllerConfig(engine, prefill=1, decode=2, heartbeat_interval_s=0.2, heartbeat_timeout_s=5.0)
    controller = (
        ray_session.remote(GatedRestarts)
        .options(name="pdserve-controller-recovery", max_concurrency=1000, num_cpus=0)
        .remote(config)
    )
    ray_session.get(controller.start.remote())
    router = RouterThread(controller, RouterConfig(port=0, runner=RunnerConfig(transfer_timeout_s=5.0)))
    yield controller, router
    router.stop()
    ray_session.get(controller.shutdown.remote())
    ray_session.kill(controller)


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=BLOCK, progress=False)


def expected(reference, prompts, params: SamplingParams = PARAMS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in reference.generate(prompts, params)]


def decode_workers(ray, controller) -> list:
    return ray.get(controller.workers.remote("decode"))


def replace_and_wait(ray, controller, slot: str, old_id: str, timeout_s: float = 120.0):
    """Opens the gate, waits until the slot's replacement is listed (with its load), shuts the gate."""
    ray.get(controller.open_restarts.remote())
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            fresh = [w for w in decode_workers(ray, controller) if w.slot == slot and w.worker_id != old_id]
            if fresh:
                return fresh[0]
            time.sleep(0.1)
        raise AssertionError(f"{slot} was not replaced within {timeout_s} s")
    finally:
        ray.get(controller.close_restarts.remote())


def wait_idle(ray, controller, timeout_s: float = 15.0) -> list[WorkerLoad]:
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [ray.get(w.handle.load.remote()) for w in ray.get(controller.workers.remote())]
        idle = [lo.kv_blocks_free == BLOCKS and not (lo.num_running or lo.num_waiting or lo.num_pending_sends)
                for lo in loads]  # fmt: skip
        if all(idle):
            return loads
        assert time.monotonic() < deadline, loads
        time.sleep(0.1)


def test_new_requests_skip_a_decode_worker_that_died_a_moment_ago(ray_session, cluster, reference):
    controller, _ = cluster
    prompts = prompts_of([11, 19, 7, 23], seed=60)

    async def run():
        served = await controller.served_model.remote()
        # A snapshot that is never refreshed: it lists the victim as alive throughout, as the
        # router's view does in the moment after a death (before the controller has noticed).
        view = ClusterView(controller, make_prefix_index(served.name, None, "recovery", 30))
        await view.refresh()
        placement = RouterPlacement(view, make_policy("cache_aware"), BLOCK, RouterMetrics())
        runner = RequestRunner(placement, RunnerConfig(transfer_timeout_s=5.0))
        route = await placement.choose(prompts[0], set())
        placement.settled(route)
        victim = next(w for w in view.workers if w.worker_id == route.decode.worker_id)
        ray_session.kill(victim.handle)

        async def one(i, prompt):
            return [t async for c in runner.run(f"fresh-{i}", prompt, PARAMS) for t in c.token_ids]

        got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        again = await placement.choose(prompts[0], set())
        return victim, got, again.decode.worker_id

    victim, got, chosen_after = asyncio.run(run())
    assert got == expected(reference, prompts)
    assert chosen_after != victim.worker_id  # known dead, though the view still lists it
    assert ray_session.get(controller.restarts_waiting.remote()) == 1  # nobody waited for it
    replace_and_wait(ray_session, controller, victim.slot, victim.worker_id)
    wait_idle(ray_session, controller)


class Stream(threading.Thread):
    """One Generate call read to the end on its own thread; `started` is set after 3 chunks."""

    def __init__(self, stub, prompt: list[int], rid: str) -> None:
        super().__init__(daemon=True)
        self.stub, self.prompt, self.rid = stub, prompt, rid
        self.started = threading.Event()
        self.tokens: list[int] = []
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        fields = {"temperature": 0.0, "max_tokens": PARAMS.max_tokens, "ignore_eos": True}  # PARAMS
        try:
            for i, chunk in enumerate(
                self.stub.Generate(request(self.prompt, self.rid, **fields), timeout=120)
            ):
                self.tokens += chunk.token_ids
                if i == 2:
                    self.started.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.started.set()


def test_a_killed_decode_workers_streams_finish_on_the_survivor_before_its_replacement_starts(
    ray_session, cluster, reference
):
    controller, router = cluster
    running = prompts_of([9, 14, 21, 6], seed=61)
    arriving = prompts_of([12, 17, 8, 25], seed=62)
    streams = [Stream(router.stub, p, f"running-{i}") for i, p in enumerate(running)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60) and s.error is None, s.error
    loads = {
        w.worker_id: (w, ray_session.get(w.handle.load.remote()))
        for w in decode_workers(ray_session, controller)
    }
    victim, victim_load = max(loads.values(), key=lambda wl: wl[1].num_running)
    assert victim_load.num_running >= 1  # it holds streams that must move
    survivor = next(w for w, _ in loads.values() if w.worker_id != victim.worker_id)
    ray_session.kill(victim.handle)
    # New requests in the same moment: the router may still list the victim.
    late = [Stream(router.stub, p, f"arriving-{i}") for i, p in enumerate(arriving)]
    for s in late:
        s.start()
    for s in streams + late:
        s.join(120)
    assert [s.error for s in streams + late] == [None] * 8  # no 503, nothing else either
    assert [s.tokens for s in streams + late] == expected(reference, running + arriving)
    # All of it finished while the replacement was held at the gate, not started.
    assert ray_session.get(controller.restarts_waiting.remote()) == 1
    assert [w.worker_id for w in decode_workers(ray_session, controller)] == [survivor.worker_id]

    fresh, served = serve_while_replacing(ray_session, controller, router, victim)
    assert served and all(tokens == expected(reference, [PROBE], PROBE_PARAMS)[0] for tokens in served)
    assert fresh.load is not None and fresh.worker_id == f"{victim.slot}.r{victim.restarts + 1}"
    wait_idle(ray_session, controller)
    # The live workers closed their KV channels with the dead ones: the prefill worker holds at
    # most one per live decode worker.
    prefill = ray_session.get(controller.workers.remote("prefill"))[0]
    text = ray_session.get(prefill.handle.metrics_text.remote())
    assert metric(text, "pdserve_kv_channels_open") <= len(decode_workers(ray_session, controller))


PROBE = prompts_of([10], seed=63)[0]
PROBE_PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def serve_while_replacing(ray, controller, router, victim) -> tuple[WorkerInfo, list[list[int]]]:
    """Lets the victim's replacement start and register while requests keep arriving.

    Returns the replacement and the tokens of every request served meanwhile (any error fails).
    """
    done = threading.Event()
    served: list[list[int]] = []
    errors: list[grpc.RpcError] = []

    def keep_requesting() -> None:
        while not done.is_set():
            try:
                served.append(generate(router.stub, PROBE, max_tokens=8, ignore_eos=True)[0])
            except grpc.RpcError as e:
                errors.append(e)

    requester = threading.Thread(target=keep_requesting, daemon=True)
    requester.start()
    try:
        fresh = replace_and_wait(ray, controller, victim.slot, victim.worker_id)
    finally:
        done.set()
        requester.join(60)
    assert not errors, errors
    return fresh, served


def _listed(worker_id: str, role: str, load: WorkerLoad | None) -> WorkerInfo:
    return WorkerInfo(worker_id, worker_id, role, None, Endpoint(worker_id, "127.0.0.1", 0), load=load)


def _load(worker_id: str, role: str, free: int) -> WorkerLoad:
    return WorkerLoad(worker_id, role, 0, 0, 0, BLOCKS, free, BLOCK, 0, 0.0, False)


def test_placement_skips_workers_still_registering_instead_of_failing():
    # A unit: what the router's view can hold in the moment a replacement registers (listed
    # before its first load report) while the request avoids the worker that just failed it.
    view = SimpleNamespace(
        workers=[
            _listed("prefill-0.r1", "prefill", None),
            _listed("prefill-1", "prefill", _load("prefill-1", "prefill", BLOCKS)),
            _listed("decode-0", "decode", _load("decode-0", "decode", BLOCKS)),
            _listed("decode-1.r1", "decode", None),
        ],
        index_available=False,
    )
    placement = RouterPlacement(view, make_policy("cache_aware"), BLOCK, RouterMetrics())
    route = asyncio.run(placement.choose(prompts_of([12])[0], avoid={"decode-0"}))
    assert (route.prefill.worker_id, route.decode.worker_id) == ("prefill-1", "decode-0")
    assert isinstance(route.decode, WorkerRef)
