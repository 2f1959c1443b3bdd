"""The router end to end: a real gRPC server over real Ray workers, a real Redis."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.cluster.controller import ControllerConfig, WorkerList, start_controller
from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.engine.served_model import ServedModel
from pdserve.proto import pdserve_pb2, pdserve_pb2_grpc
from pdserve.router.config import RouterConfig
from pdserve.router.request_runner import RunnerConfig
from pdserve.router.server import start_router
from tests.prompts import prompts_of
from tests.redis_server import spare_port, start_redis, stop_redis
from tests.roles.test_worker import metric

BLOCKS = 96
BLOCK = 4


class RouterThread:
    """A router serving from its own event loop thread, as `pdserve router` would in its process."""

    def __init__(self, controller, config: RouterConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.router = self.call(start_router(controller, config))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.router.port}")
        self.stub = pdserve_pb2_grpc.RouterStub(self.channel)

    def call(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        self.call(self.router.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def controller(ray_session, moe_checkpoint):
    engine = EngineConfig(
        model=str(moe_checkpoint), dtype="float32", block_size=BLOCK, num_threads=1, progress=False,
        kv_cache_blocks=BLOCKS,
    )  # fmt: skip
    handle = start_controller(
        ControllerConfig(engine, prefill=2, decode=1), name="pdserve-controller-router-test"
    )
    ray_session.get(handle.start.remote())
    yield handle
    ray_session.get(handle.shutdown.remote())
    ray_session.kill(handle)


@pytest.fixture(scope="module")
def router(controller):
    # Every prompt through a prefill worker: this module tests the disaggregated path (and the
    # conditional one, with a router of its own, at the end).
    config = RouterConfig(port=0, local_prefill_tokens=0, runner=RunnerConfig(transfer_timeout_s=5.0))
    r = RouterThread(controller, config)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=BLOCK, progress=False)


def request(prompt, rid="", **sampling):
    sampling.setdefault("temperature", 0.0)
    return pdserve_pb2.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=pdserve_pb2.SamplingParams(**sampling)
    )


def generate(stub, prompt, timeout=60, **kw):
    chunks = list(stub.Generate(request(prompt, **kw), timeout=timeout))
    return [t for c in chunks for t in c.token_ids], chunks


def wait_idle(ray, controller, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [ray.get(w.handle.load.remote()) for w in ray.get(controller.workers.remote())]
        if all(
            lo.kv_blocks_free == BLOCKS and not lo.num_running and not lo.num_pending_sends for lo in loads
        ):
            return
        assert time.monotonic() < deadline, loads
        time.sleep(0.1)


def test_tokens_and_usage_equal_one_engine(router, reference):
    prompt = prompts_of([13], seed=40)[0]
    got, chunks = generate(router.stub, prompt, max_tokens=9, ignore_eos=True)
    want = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))[0]
    assert got == want.outputs[0].token_ids
    last = chunks[-1]
    assert last.finished and last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (13, 9)
    assert all(not c.HasField("usage") for c in chunks[:-1])


def test_repeated_long_prompt_reports_the_cached_tokens_the_engine_reused(ray_session, router, controller):
    prompt = prompts_of([41], seed=41)[0]
    _, first = generate(router.stub, prompt, max_tokens=2)
    time.sleep(0.5)  # the index learns of the stored blocks within a view interval
    _, second = generate(router.stub, prompt, max_tokens=2)
    assert first[-1].usage.cached_tokens == 0
    # 41 tokens = 10 full blocks; the engine never reuses the block holding the last prompt token.
    assert second[-1].usage.cached_tokens == 40


def test_shared_system_prompt_lands_on_the_worker_that_holds_it(ray_session, router, controller):
    system = prompts_of([48], seed=42)[0]
    generate(router.stub, [*system, 7], max_tokens=1)
    time.sleep(0.5)
    tails = prompts_of([5, 6, 7, 8], seed=43)
    cached = [generate(router.stub, system + t, max_tokens=2)[1][-1].usage.cached_tokens for t in tails]
    # Only the worker holding the system prompt can report its 48 tokens as cached.
    assert cached == [48, 48, 48, 48]
    wait_idle(ray_session, controller)  # incl. the reservation of the request that ended on its first token


def test_a_prompt_beyond_the_engines_context_window_is_invalid_at_once(ray_session, router, controller):
    # The engines hold BLOCKS * BLOCK tokens, far below the checkpoint's max_position_embeddings.
    served = ray_session.get(controller.served_model.remote())
    assert served.max_model_len == BLOCKS * BLOCK
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(router.stub.Generate(request(prompts_of([served.max_model_len + 10], seed=46)[0]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"context window is {BLOCKS * BLOCK}" in err.value.details()
    assert time.monotonic() - start < 10  # refused, not retried until the admission timeout
    wait_idle(ray_session, controller)


def test_invalid_arguments_name_the_field(router):
    cases = [
        (request([]), "prompt_token_ids is empty"),
        (request([3, 100000, 4]), "prompt_token_ids[1] = 100000"),
        (request([3, 4], temperature=-1.0), "temperature"),
        (request([3, 4], top_p=2.0), "top_p"),
    ]
    for req, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(router.stub.Generate(req, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()


def test_deadline_exceeded_and_blocks_freed(ray_session, router, controller):
    # The decode worker's blocks are all but one reserved, so the request waits for room (up to
    # the 30 s admission timeout) and its 1 s deadline passes first, however fast the machine is.
    decode = ray_session.get(controller.workers.remote("decode"))[0]
    assert ray_session.get(decode.handle.reserve.remote("hog", (BLOCKS - 1) * BLOCK))
    prompt = prompts_of([10], seed=44)[0]
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(router.stub.Generate(request(prompt, max_tokens=3000, ignore_eos=True), timeout=1.0))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        assert ray_session.get(decode.handle.abort.remote("hog"))
    wait_idle(ray_session, controller)


def test_abort_ends_the_stream_and_frees_blocks(ray_session, router, controller):
    prompt = prompts_of([10], seed=45)[0]
    stream = router.stub.Generate(
        request(prompt, rid="to-abort", max_tokens=3000, ignore_eos=True), timeout=60
    )
    first = next(stream)
    assert first.token_ids
    assert router.stub.Abort(pdserve_pb2.AbortRequest(request_id="to-abort")).found
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert not router.stub.Abort(pdserve_pb2.AbortRequest(request_id="to-abort")).found
    wait_idle(ray_session, controller)


def test_cancelled_client_stream_frees_blocks(ray_session, router, controller):
    prompt = prompts_of([10], seed=46)[0]
    stream = router.stub.Generate(request(prompt, max_tokens=3000, ignore_eos=True), timeout=60)
    next(stream)
    stream.cancel()
    wait_idle(ray_session, controller)


def test_overload_is_resource_exhausted(ray_session, controller):
    small = RouterThread(controller, RouterConfig(port=0, max_in_flight=1))
    try:
        prompt = prompts_of([10], seed=47)[0]
        busy = small.stub.Generate(request(prompt, max_tokens=3000, ignore_eos=True), timeout=60)
        next(busy)
        with pytest.raises(grpc.RpcError) as err:
            list(small.stub.Generate(request(prompt, max_tokens=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_in_flight" in err.value.details()
        busy.cancel()
    finally:
        small.stop()
    wait_idle(ray_session, controller)


def test_health_reflection_and_cluster_state(router):
    health = health_pb2_grpc.HealthStub(router.channel)
    for service in ("", "pdserve.v1.Router"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    state = router.stub.ClusterState(pdserve_pb2.ClusterStateRequest())
    assert sorted(w.role for w in state.workers) == ["decode", "prefill", "prefill"]
    assert state.policy == "cache_aware" and state.index_backend == "in-process" and state.index_available
    assert state.index_entries > 0  # earlier tests cached prompts
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(router.channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "pdserve.v1.Router" in {s.name for s in reply.list_services_response.service}


def test_metrics_merge_every_live_workers_exposition(ray_session, router, controller):
    reply = router.stub.Metrics(pdserve_pb2.MetricsRequest(), timeout=10)
    assert list(reply.unreachable) == []
    workers = [w.worker_id for w in ray_session.get(controller.workers.remote())]
    assert len(workers) == 3
    for worker in workers:
        assert f'pdserve_kv_blocks_total{{worker="{worker}"}} {float(BLOCKS)}' in reply.text
    # One family, three workers' samples: not three HELP/TYPE headers (Prometheus rejects repeats).
    assert reply.text.count("# TYPE pdserve_kv_blocks_total gauge") == 1


@pytest.fixture
def own_redis():
    """A redis-server of the test's own (tests/redis_server.py): (port, its processes, restart)."""
    port = spare_port()
    procs = [start_redis(port)]
    yield port, procs, lambda: start_redis(port)
    for p in procs:
        stop_redis(p)


def test_redis_index_survives_redis_going_away_and_coming_back(ray_session, controller, own_redis):
    port, procs, start = own_redis
    r = RouterThread(controller, RouterConfig(port=0, redis_url=f"redis://127.0.0.1:{port}/0"))
    try:
        prompt = prompts_of([33], seed=48)[0]
        generate(r.stub, prompt, max_tokens=2)
        time.sleep(0.5)
        state = r.stub.ClusterState(pdserve_pb2.ClusterStateRequest())
        assert state.index_backend == "redis" and state.index_available and state.index_entries > 0
        assert generate(r.stub, prompt, max_tokens=2)[1][-1].usage.cached_tokens == 32

        stop_redis(procs[0])
        # Still serving, by load only.
        got, chunks = generate(r.stub, prompts_of([9], seed=49)[0], max_tokens=3)
        assert len(got) == 3 and chunks[-1].finished
        time.sleep(0.5)
        assert not r.stub.ClusterState(pdserve_pb2.ClusterStateRequest()).index_available

        procs.append(start())  # same port, empty
        deadline = time.monotonic() + 10
        while True:
            state = r.stub.ClusterState(pdserve_pb2.ClusterStateRequest())
            if state.index_available and state.index_entries > 0:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        # Rebuilt from the workers' snapshots: the old prompt is found again.
        assert generate(r.stub, prompt, max_tokens=2)[1][-1].usage.cached_tokens == 32
    finally:
        r.stop()


def test_no_live_worker_is_unavailable(ray_session, moe_checkpoint):
    @ray_session.remote(num_cpus=0)
    class EmptyController:
        """Isolates the router from workers: a controller whose pool is empty."""

        def __init__(self, served):
            self.served = served

        async def workers(self, role=None):
            return []

        async def workers_changed(self, version, wait_s):
            await asyncio.sleep(wait_s)
            return WorkerList(0, [])

        async def served_model(self):
            return self.served

        async def report_failure(self, worker_id):
            return None

        async def report_router_signals(self, signals):
            return None

    served = ServedModel("tiny", None, max_model_len=256, vocab_size=1000, block_size=BLOCK, num_kv_blocks=64,
                         dtype="float32")  # fmt: skip
    empty = EmptyController.remote(served)
    r = RouterThread(empty, RouterConfig(port=0, local_prefill_tokens=0))
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(r.stub.Generate(request([3, 4, 5], max_tokens=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no live prefill+decode pair" in err.value.details()
    finally:
        r.stop()
        ray_session.kill(empty)


def test_a_burst_spreads_over_equally_loaded_prefill_workers(ray_session, router, controller):
    # All four arrive within one load report; without counting what it just placed, the router
    # would send every one of them to the same (tie-winning) worker. The prompts are as long as
    # four fit the decode worker at once, so that the first is still being computed when the last
    # is placed (a charge ends with its prefill: the worker is then idle, and may rightly get more).
    prefills = ray_session.get(controller.workers.remote("prefill"))

    def queried():
        return {
            w.worker_id: metric(
                ray_session.get(w.handle.metrics_text.remote()), "pdserve_prefix_cache_queried_tokens"
            )
            for w in prefills
        }

    before = queried()
    streams = [
        router.stub.Generate(request(p, max_tokens=1), timeout=60) for p in prompts_of([80] * 4, seed=50)
    ]
    for s in streams:
        list(s)
    after = queried()
    assert sorted(after[w] - before[w] for w in after) == [160, 160]


def test_multi_turn_conversation_lands_where_its_earlier_turns_live(router):
    turn1 = prompts_of([37], seed=51)[0]
    answer, _ = generate(router.stub, turn1, max_tokens=6, ignore_eos=True)
    time.sleep(0.5)
    turn2 = [*turn1, *answer, *prompts_of([5], seed=52)[0]]
    _, chunks2 = generate(router.stub, turn2, max_tokens=2)
    # Turn 1's prompt blocks are cached on the prefill worker that served it (9 full blocks).
    assert chunks2[-1].usage.cached_tokens >= 36


def test_two_routers_share_one_redis_index(ray_session, controller, own_redis):
    port, _, _ = own_redis
    url = f"redis://127.0.0.1:{port}/0"
    a = RouterThread(controller, RouterConfig(port=0, redis_url=url))
    b = RouterThread(controller, RouterConfig(port=0, redis_url=url))
    try:
        prompt = prompts_of([45], seed=53)[0]
        generate(a.stub, prompt, max_tokens=2)
        time.sleep(0.5)
        sa = a.stub.ClusterState(pdserve_pb2.ClusterStateRequest())
        sb = b.stub.ClusterState(pdserve_pb2.ClusterStateRequest())
        assert sa.index_entries == sb.index_entries > 0  # one index, seen by both
        assert generate(b.stub, prompt, max_tokens=2)[1][-1].usage.cached_tokens == 44
    finally:
        a.stop()
        b.stop()


def test_a_prefill_group_prefills_on_one_worker_which_computes_the_prompt_once(
    ray_session, router, controller
):
    # A request's n choices: the same prompt, sent at once, in one prefill group. Unlike the burst
    # above (spread over both workers), they all land on one prefill worker, whose engine computes
    # the shared blocks once: the other three find them cached.
    prefills = ray_session.get(controller.workers.remote("prefill"))

    def counted(name):
        return {w.worker_id: metric(ray_session.get(w.handle.metrics_text.remote()), name) for w in prefills}

    queried, hits = counted("pdserve_prefix_cache_queried_tokens"), counted("pdserve_prefix_cache_hit_tokens")
    prompt = prompts_of([30], seed=61)[0]
    streams = []
    for i in range(4):
        req = request(prompt, rid=f"group-{i}", max_tokens=2, temperature=1.0, seed=7 + i)
        req.prefill_group = "one-request"
        streams.append(router.stub.Generate(req, timeout=60))
    outputs = [[t for c in s for t in c.token_ids] for s in streams]
    queried_after, hits_after = (
        counted("pdserve_prefix_cache_queried_tokens"),
        counted("pdserve_prefix_cache_hit_tokens"),
    )
    assert sorted(queried_after[w] - queried[w] for w in queried) == [0, 4 * 30]
    assert sorted(hits_after[w] - hits[w] for w in hits) == [0, 3 * 28]  # 7 full blocks of 4, three times
    # Each choice is what its seed gives alone.
    for i, out in enumerate(outputs):
        assert out == generate(router.stub, prompt, max_tokens=2, temperature=1.0, seed=7 + i)[0]
    wait_idle(ray_session, controller)


def test_a_prefill_group_name_is_bounded(router):
    req = request([1, 2, 3], max_tokens=1)
    req.prefill_group = "g" * 257
    with pytest.raises(grpc.RpcError) as err:
        list(router.stub.Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefill_group" in err.value.details()


def _prefill_queried(ray, controller) -> float:
    """Prompt tokens the prefill workers have looked up in their prefix caches (each prefill does)."""
    return sum(
        metric(ray.get(w.handle.metrics_text.remote()), "pdserve_prefix_cache_queried_tokens")
        for w in ray.get(controller.workers.remote("prefill"))
    )


def test_conditional_disaggregation_computes_short_uncached_parts_on_the_decode_worker(
    ray_session, controller, reference
):
    local = RouterThread(controller, RouterConfig(port=0, local_prefill_tokens=24))
    try:
        params = {"max_tokens": 7, "ignore_eos": True}
        short, long = prompts_of([13, 41], seed=60)
        for prompt, computed_locally in ((short, True), (long, False)):
            before = _prefill_queried(ray_session, controller)
            got, _ = generate(local.stub, prompt, **params)
            want = reference.generate([prompt], SamplingParams(temperature=0, **params))[0]
            assert got == want.outputs[0].token_ids  # token-exact whichever worker computed the prompt
            assert (_prefill_queried(ray_session, controller) == before) is computed_locally

        # The next turn of the long conversation: the decode worker holds its first turn (the
        # transferred prompt and the tokens it decoded), so only the new part is computed, there.
        time.sleep(0.5)  # the view's next round indexes the decode worker's blocks
        turn2 = [*long, *got, *prompts_of([6], seed=61)[0]]
        before = _prefill_queried(ray_session, controller)
        got2, chunks = generate(local.stub, turn2, **params)
        want2 = reference.generate([turn2], SamplingParams(temperature=0, **params))[0]
        assert got2 == want2.outputs[0].token_ids
        assert _prefill_queried(ray_session, controller) == before
        assert chunks[-1].usage.cached_tokens >= 40  # the first turn's full blocks came from its cache
        from prometheus_client import generate_latest

        text = generate_latest(local.router.service.metrics.registry).decode()
        assert metric(text, "pdserve_router_local_prefills_total") == 2
        wait_idle(ray_session, controller)
    finally:
        local.stop()


def test_the_in_process_call_answers_and_fails_as_the_grpc_call_does(ray_session, router, controller):
    """`pdserve up`'s gateway calls Generate in process (router.local_call): the same tokens and
    usage as over gRPC, the same status and message for a refusal and a passed deadline, and a
    closed stream frees the request's blocks."""
    from pdserve.router.local_call import local_generate

    generate_here = local_generate(router.router.service)
    prompt = prompts_of([11], seed=47)[0]

    async def collect(req, timeout=60):
        return [c async for c in generate_here(req, timeout=timeout)]

    async def refusal(req, timeout=10):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(req, timeout)
        return err.value.code(), err.value.details()

    async def close_after_first():
        stream = generate_here(request(prompt, max_tokens=3000, ignore_eos=True), timeout=60)
        first = await stream.__anext__()
        await stream.aclose()
        return first

    over_grpc = list(router.stub.Generate(request(prompt, max_tokens=7, ignore_eos=True), timeout=60))
    here = router.call(collect(request(prompt, max_tokens=7, ignore_eos=True)))
    assert [c.token_ids for c in here] and sum(len(c.token_ids) for c in here) == 7
    assert [t for c in here for t in c.token_ids] == [t for c in over_grpc for t in c.token_ids]
    usage = lambda c: (c.usage.prompt_tokens, c.usage.completion_tokens)  # noqa: E731  # (cached differs: 2nd run)
    assert usage(here[-1]) == usage(over_grpc[-1]) == (11, 7) and here[-1].finish_reason == "length"
    with pytest.raises(grpc.RpcError) as err:
        list(router.stub.Generate(request([3, 100000, 4]), timeout=10))
    assert router.call(refusal(request([3, 100000, 4]))) == (err.value.code(), err.value.details())
    decode = ray_session.get(controller.workers.remote("decode"))[0]
    assert ray_session.get(decode.handle.reserve.remote("hog-local", (BLOCKS - 1) * BLOCK))
    try:  # waits for room until its deadline passes, as in test_deadline_exceeded_and_blocks_freed
        code, _ = router.call(refusal(request(prompt, max_tokens=3000, ignore_eos=True), timeout=1.0))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        assert ray_session.get(decode.handle.abort.remote("hog-local"))
    assert router.call(close_after_first()).token_ids
    wait_idle(ray_session, controller)
    # The tokens came on the workers' chunk feeds: batches of chunks, one feed per worker used.
    sample = router.router.service.metrics.registry.get_sample_value
    assert sample("pdserve_router_feed_chunks_total") >= sample("pdserve_router_feed_batches_total") > 0
    assert sample("pdserve_router_feeds_open") >= 1
