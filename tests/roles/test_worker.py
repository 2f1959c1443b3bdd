"""Worker actors with real Ray: colocated, disaggregated over Gloo, role switches, failures."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.roles.chunk_feed import ChunkFeeds
from pdserve.roles.handoff import (
    ChannelGenerations,
    NoRoomError,
    WorkerRef,
    generate_colocated,
    generate_disaggregated,
)
from pdserve.roles.kv_transfer import Channel, TransferError
from pdserve.roles.worker import RoleError, start_worker
from tests.prompts import prompts_of

BLOCKS = 48
_ids = itertools.count()


def engine_config(checkpoint, **kw) -> EngineConfig:
    kw.setdefault("kv_cache_blocks", BLOCKS)
    return EngineConfig(
        model=str(checkpoint), dtype="float32", block_size=4, num_threads=1, progress=False, **kw
    )


async def worker_ref(ray, checkpoint, role: str) -> WorkerRef:
    worker_id = f"{role}-{next(_ids)}"
    handle = start_worker(worker_id, engine_config(checkpoint), role)
    endpoint = await handle.ready.remote()
    return WorkerRef(worker_id, handle, endpoint)


@pytest.fixture(scope="module")
def workers(ray_session, moe_checkpoint):
    """One prefill, one decode and one `both` worker shared by this module's tests."""

    async def start():
        return await asyncio.gather(
            *(worker_ref(ray_session, moe_checkpoint, r) for r in ("prefill", "decode", "both"))
        )

    prefill, decode, both = asyncio.run(start())
    yield {"prefill": prefill, "decode": decode, "both": both}
    for ref in (prefill, decode, both):
        ray_session.kill(ref.handle)


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=4, progress=False)


def expected(reference, prompts, params_list):
    outs = reference.generate(prompts, params_list)
    return [o.outputs[0].token_ids for o in outs]


async def collect(stream) -> list:
    return [chunk async for chunk in stream]


async def colocated(ref: WorkerRef, rid: str, prompt, params, feeds: ChunkFeeds | None = None):
    """The router's colocated path: start on the worker, chunks on its feed."""
    stream = generate_colocated(ref, rid, prompt, params, ChannelGenerations(), feeds or ChunkFeeds())
    return await collect(stream)


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def assert_released(ray, *refs: WorkerRef):
    for ref in refs:
        load = ray.get(ref.handle.load.remote())
        assert load.kv_blocks_free == load.kv_blocks_total == BLOCKS, ref.worker_id
        assert load.num_running == load.num_waiting == load.num_pending_sends == 0


PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_both_role_streams_what_one_engine_produces(ray_session, workers, reference, params):
    prompts = prompts_of([5, 17, 9], seed=1)
    want = expected(reference, prompts, [params] * len(prompts))

    async def run():
        return await asyncio.gather(
            *(colocated(workers["both"], f"both-{i}-{params.seed}", p, params) for i, p in enumerate(prompts))
        )

    got = asyncio.run(run())
    assert [tokens(c) for c in got] == want
    assert all(c[-1].finished and c[-1].finish_reason == "length" for c in got)
    assert_released(ray_session, workers["both"])


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_disaggregated_equals_one_engine_with_prefix_hits(ray_session, workers, reference, params):
    shared = prompts_of([16], seed=3)[0]
    prompts = [*prompts_of([7, 23], seed=4), [*shared, 5, 6, 7], [*shared, 9, 10]]
    want = expected(reference, prompts, [params] * len(prompts))
    channels, feeds = ChannelGenerations(), ChunkFeeds()

    async def one(i, prompt):
        stream = generate_disaggregated(
            workers["prefill"], workers["decode"], f"pd-{params.seed}-{i}", prompt, params, channels, feeds
        )
        return await collect(stream)

    async def run():
        first = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts[:3])))
        # The last prompt shares 16 tokens with the third: a prefix-cache hit on the prefill worker.
        return [*first, await one(3, prompts[3])]

    got = asyncio.run(run())
    assert [tokens(c) for c in got] == want
    assert got[3][0].num_cached_tokens >= 12
    assert got[0][0].token_ids == want[0][:1]  # the first token comes from the prefill worker
    assert_released(ray_session, workers["prefill"], workers["decode"])


def test_request_finishing_on_its_first_token_never_transfers(ray_session, workers, reference):
    params = SamplingParams(temperature=0, max_tokens=1)
    prompt = prompts_of([6], seed=9)[0]

    async def run():
        return await collect(
            generate_disaggregated(
                workers["prefill"],
                workers["decode"],
                "one-token",
                prompt,
                params,
                ChannelGenerations(),
                ChunkFeeds(),
            )
        )

    chunks = asyncio.run(run())
    assert tokens(chunks) == expected(reference, [prompt], [params])[0]
    assert chunks[-1].finished
    assert_released(ray_session, workers["prefill"], workers["decode"])


def test_roles_refuse_work_they_do_not_serve(ray_session, workers):
    params = SamplingParams(max_tokens=2)
    with pytest.raises(RoleError, match="role 'prefill', not 'decode'"):
        ray_session.get(workers["prefill"].handle.reserve.remote("x", 4))
    with pytest.raises(RoleError, match="role 'decode', not 'prefill'"):
        ray_session.get(workers["decode"].handle.prefill.remote("x", [3, 4], params))


def test_no_room_on_decode_fails_before_any_work(ray_session, workers):
    prompt = prompts_of([BLOCKS * 4 - 8], seed=2)[0]
    decode = workers["decode"]
    assert ray_session.get(decode.handle.reserve.remote("hog", BLOCKS * 4 - 8))

    async def run():
        stream = generate_disaggregated(
            workers["prefill"],
            decode,
            "starved",
            prompt[:40],
            SamplingParams(max_tokens=2),
            ChannelGenerations(),
            ChunkFeeds(),
        )
        return await collect(stream)

    with pytest.raises(NoRoomError, match="no room"):
        asyncio.run(run())
    assert ray_session.get(decode.handle.abort.remote("hog"))
    assert_released(ray_session, workers["prefill"], decode)


def test_transfer_timeout_releases_both_sides(ray_session, workers):
    prefill, decode = workers["prefill"], workers["decode"]
    prompt = prompts_of([10], seed=5)[0]
    assert ray_session.get(decode.handle.reserve.remote("lost", len(prompt)))
    result = ray_session.get(prefill.handle.prefill.remote("lost", prompt, SamplingParams(max_tokens=4)))
    assert result.handoff is not None and result.handoff.num_blocks == 3
    # Nobody receives on this channel: the send must give up, not hang.
    channel = Channel(prefill.endpoint, decode.endpoint, generation=999)
    with pytest.raises(TransferError, match="failed"):
        ray_session.get(prefill.handle.send_kv.remote("lost", channel, 2.0))
    assert ray_session.get(decode.handle.abort.remote("lost"))
    assert_released(ray_session, prefill, decode)


def test_cancelled_stream_frees_the_request(ray_session, workers):
    both = workers["both"]
    prompt = prompts_of([12], seed=6)[0]

    async def run():
        stream = generate_colocated(
            both, "cancel-me", prompt, SamplingParams(max_tokens=200, ignore_eos=True), ChannelGenerations(),
            ChunkFeeds(),
        )  # fmt: skip
        first = await stream.__anext__()
        assert first.token_ids and not first.finished
        await stream.aclose()  # the reader leaves: the worker is told to free the request
        load = await both.handle.load.remote()
        return load

    load = asyncio.run(run())
    assert load.num_running == 0 and load.kv_blocks_free == BLOCKS


def test_a_closed_feed_aborts_what_it_still_runs(ray_session, workers):
    """A router that goes away (its feed closed) leaves nothing running on the worker."""
    both = workers["both"]
    prompt = prompts_of([12], seed=13)[0]

    async def run():
        feeds = ChunkFeeds()
        feed = feeds.of(both.worker_id, both.handle)
        feed.open("orphan")
        started = await feed.start("orphan", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
        assert started.running
        first = await feed.chunks("orphan").__anext__()
        await feeds.stop()  # no abort sent: only the feed's end tells the worker
        for _ in range(200):
            load = await both.handle.load.remote()
            if load.num_running == 0:
                break
            await asyncio.sleep(0.05)
        return first, load

    first, load = asyncio.run(run())
    assert first.token_ids
    assert load.num_running == 0 and load.kv_blocks_free == BLOCKS


def test_the_feed_link_carries_the_workers_cache_changes(ray_session, workers):
    """A router's index is fed on its link: a snapshot at once, then the blocks a request stored,
    and a fresh snapshot when the router asks (its index lost entries); each agrees with the
    worker's own log read over Ray."""
    both = workers["both"]
    prompt = prompts_of([17], seed=71)[0]

    async def until(received, done):
        for _ in range(200):
            if done(received):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"cache events never arrived: {received}")

    async def run():
        feeds, received = ChunkFeeds(), []
        feeds.on_cache_events = received.append
        feed = feeds.of(both.worker_id, both.handle)
        await until(received, lambda r: r)
        first = received[0]
        before = await both.handle.cache_events.remote(-1)
        await colocated(both, "cached-now", prompt, SamplingParams(max_tokens=3), feeds)
        after = await both.handle.cache_events.remote(-1)
        await until(received, lambda r: r[-1].seq >= after.seq)
        changes = received[1:]
        seen = len(received)
        await feed.resync()
        await until(received, lambda r: len(r) > seen and r[-1].snapshot is not None)
        again = received[-1]
        await feeds.stop()
        return first, before, changes, after, again

    first, before, changes, after, again = asyncio.run(run())
    assert first.snapshot is not None and set(first.snapshot) == set(before.snapshot)
    new = set(after.snapshot) - set(before.snapshot)
    assert len(new) >= len(prompt) // 4  # every full block of the prompt, stored
    assert all(c.snapshot is None for c in changes)
    assert new <= {h for c in changes for h in c.stored}
    assert set(again.snapshot) == set(after.snapshot) and again.seq >= after.seq


def test_set_role_switches_without_reloading(ray_session, moe_checkpoint, reference):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = prompts_of([8], seed=8)[0]

    async def run():
        ref = await worker_ref(ray_session, moe_checkpoint, "prefill")
        with pytest.raises(RoleError):
            await colocated(ref, "r0", prompt, params)
        switch = await ref.handle.set_role.remote("both")
        assert (switch.from_role, switch.to_role, switch.moved, switch.handed_back) == (
            "prefill",
            "both",
            0,
            0,
        )
        out = tokens(await colocated(ref, "r1", prompt, params))
        load = await ref.handle.load.remote()
        ray_session.kill(ref.handle)
        return out, load

    out, load = asyncio.run(run())
    assert out == expected(reference, [prompt], [params])[0]
    assert load.role == "both"


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_transfers_and_failures_show_in_metrics(ray_session, workers):
    prefill, decode = workers["prefill"], workers["decode"]
    before_sent = metric(
        ray_session.get(prefill.handle.metrics_text.remote()), "pdserve_kv_transfer_bytes_total"
    )
    before_failed = metric(
        ray_session.get(prefill.handle.metrics_text.remote()),
        "pdserve_kv_transfer_failures_total",
        direction="send",
    )
    prompt = prompts_of([9], seed=12)[0]

    async def run():
        return await collect(
            generate_disaggregated(
                prefill,
                decode,
                "metered",
                prompt,
                SamplingParams(max_tokens=3, ignore_eos=True),
                ChannelGenerations(),
                ChunkFeeds(),
            )
        )

    asyncio.run(run())
    sent_text = ray_session.get(prefill.handle.metrics_text.remote())
    recv_text = ray_session.get(decode.handle.metrics_text.remote())
    # 9 tokens in 4-token blocks: 3 blocks of [L=3, 2, 4, KVH=2, D=8] fp32.
    moved = 3 * 3 * 2 * 4 * 2 * 8 * 4
    assert metric(sent_text, "pdserve_kv_transfer_bytes_total", direction="send") - before_sent == moved
    assert metric(recv_text, "pdserve_kv_transfer_bytes_total", direction="recv") >= moved
    assert metric(recv_text, "pdserve_kv_transfer_seconds_count", direction="recv") >= 1
    assert metric(sent_text, "pdserve_kv_transfer_failures_total", direction="send") == before_failed
    assert metric(recv_text, "pdserve_worker_role", role="decode") == 1
    assert metric(recv_text, "pdserve_kv_blocks_total") == BLOCKS
    # Steps and the time in them: the prefill worker computed the prompt, the decode worker the rest.
    for text in (sent_text, recv_text):
        assert metric(text, "pdserve_engine_steps_total") >= 1
        assert metric(text, "pdserve_engine_busy_seconds_total") > 0


def test_a_worker_of_a_multi_node_cluster_listens_on_its_nodes_address(ray_session, moe_checkpoint):
    # Joined to a Ray cluster (`up --address`), workers on other machines must reach its KV
    # transport: with no host given it listens on the node's address as Ray knows it.
    engine = EngineConfig(model=str(moe_checkpoint), dtype="float32", block_size=4, num_threads=1,
                          progress=False, kv_cache_blocks=16)  # fmt: skip
    handle = start_worker("w-node", engine, "both", host=None)
    try:
        endpoint = ray_session.get(handle.ready.remote())
        assert endpoint.host == ray_session.util.get_node_ip_address()
    finally:
        ray_session.kill(handle)
