"""The prefix index: one behaviour suite over both backends, plus Redis going away and coming back.

The Redis backend runs against the machine's Redis (PDSERVE_TEST_REDIS_URL, default
redis://127.0.0.1:6379) under a fresh model name per test, so keys never collide with anything;
the outage test starts its own `redis-server` on a spare port.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from pdserve.engine.block_hash import hash_blocks
from pdserve.router.prefix_index import (
    IndexUnavailable,
    InProcessPrefixIndex,
    PrefixIndex,
    RedisPrefixIndex,
    make_prefix_index,
)
from tests.redis_server import spare_port, start_redis

pytestmark = pytest.mark.anyio

REDIS_URL = os.environ.get("PDSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379")

MakeIndex = Callable[[], PrefixIndex]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _redis_reachable(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest.fixture(params=["inprocess", "redis"])
async def make_index(request: pytest.FixtureRequest) -> AsyncIterator[MakeIndex]:
    """Makes indexes of one backend, each under a fresh model name; deletes their keys afterwards."""
    made: list[PrefixIndex] = []
    if request.param == "redis" and not await _redis_reachable(REDIS_URL):
        pytest.fail(
            f'no Redis at {REDIS_URL}: start one (redis-server --daemonize yes --port 6379 --save "") or set PDSERVE_TEST_REDIS_URL'
        )

    def make() -> PrefixIndex:
        model = f"test-{uuid.uuid4().hex}"
        index: PrefixIndex = (
            RedisPrefixIndex(REDIS_URL, model) if request.param == "redis" else InProcessPrefixIndex(model)
        )
        made.append(index)
        return index

    yield make
    for index in made:
        await index.close()
    if request.param == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            for index in made:
                keys = [k async for k in client.scan_iter(match=f"pdserve:*:{index.model}:*", count=1000)]
                if keys:
                    await client.delete(*keys)
        finally:
            await client.aclose()


async def test_apply_stores_and_removes(make_index: MakeIndex) -> None:
    index = make_index()
    await index.apply("w1", [1, 2, 3], [])
    assert await index.longest_prefix([1, 2, 3, 9], ["w1"]) == {"w1": 3}
    await index.apply("w1", [], [2])
    assert await index.longest_prefix([1, 2, 3], ["w1"]) == {"w1": 1}
    assert await index.num_entries() == 2
    # Removing what was never stored, and storing twice, change nothing.
    await index.apply("w1", [1], [7])
    assert await index.num_entries() == 2


async def test_stored_then_removed_in_one_batch_ends_absent(make_index: MakeIndex) -> None:
    index = make_index()
    await index.apply("w1", [1, 2], [2])
    assert await index.longest_prefix([1, 2], ["w1"]) == {"w1": 1}
    assert await index.num_entries() == 1


async def test_longest_prefix_stops_at_the_first_gap(make_index: MakeIndex) -> None:
    index = make_index()
    await index.apply("w1", [1, 2, 4], [])
    await index.apply("w2", [2, 3, 4], [])  # holds later blocks but not the first: no prefix
    await index.apply("w3", [1, 2, 3, 4], [])
    got = await index.longest_prefix([1, 2, 3, 4], ["w1", "w2", "w3"])
    assert got == {"w1": 2, "w2": 0, "w3": 4}


async def test_only_listed_workers_count(make_index: MakeIndex) -> None:
    index = make_index()
    await index.apply("w1", [1, 2, 3], [])
    await index.apply("w2", [1], [])
    # w1 (say, dead) holds the longest prefix but is not listed; w3 is listed but unknown.
    assert await index.longest_prefix([1, 2, 3], ["w2", "w3"]) == {"w2": 1, "w3": 0}
    assert await index.longest_prefix([1, 2, 3], []) == {}
    assert await index.longest_prefix([], ["w1"]) == {"w1": 0}


async def test_drop_worker_removes_all_its_entries(make_index: MakeIndex) -> None:
    index = make_index()
    await index.apply("w1", [1, 2, 3], [])
    await index.apply("w2", [1, 2], [])
    await index.drop_worker("w1")
    assert await index.longest_prefix([1, 2, 3], ["w1", "w2"]) == {"w1": 0, "w2": 2}
    assert await index.num_entries() == 2
    await index.drop_worker("w1")  # twice, or an unknown worker: no error
    await index.drop_worker("never-seen")
    await index.apply("w1", [1], [])  # a restarted worker starts from what it reports
    assert await index.longest_prefix([1, 2], ["w1"]) == {"w1": 1}


async def test_replace_worker_takes_a_full_snapshot(make_index: MakeIndex) -> None:
    index = make_index()
    await index.apply("w1", [1, 2, 3], [])
    await index.apply("w2", [1, 2, 3], [])
    await index.replace_worker("w1", [3, 4, 4])
    assert await index.longest_prefix([1, 2], ["w1", "w2"]) == {"w1": 0, "w2": 2}
    assert await index.longest_prefix([3, 4], ["w1", "w2"]) == {"w1": 2, "w2": 1}
    assert await index.num_entries() == 5
    await index.replace_worker("w3", [1])  # a worker first seen through its snapshot
    assert await index.longest_prefix([1], ["w3"]) == {"w3": 1}
    await index.replace_worker("w1", [])  # an empty snapshot empties the worker
    assert await index.num_entries() == 4


async def test_models_are_namespaced(make_index: MakeIndex) -> None:
    a, b = make_index(), make_index()
    await a.apply("w1", [1, 2], [])
    assert await b.longest_prefix([1, 2], ["w1"]) == {"w1": 0}
    assert await b.num_entries() == 0
    await b.apply("w1", [1], [])
    await b.drop_worker("w1")
    assert await a.longest_prefix([1, 2], ["w1"]) == {"w1": 2}
    assert await a.num_entries() == 2


async def test_num_entries_counts_worker_block_pairs(make_index: MakeIndex) -> None:
    index = make_index()
    assert await index.num_entries() == 0
    await index.apply("w1", [1, 2], [])
    await index.apply("w2", [1], [])
    assert await index.num_entries() == 3
    await index.apply("w1", [], [1, 2])
    assert await index.num_entries() == 1


async def test_real_chained_hashes_round_trip(make_index: MakeIndex) -> None:
    """Engine hashes use all 64 bits; they must survive the trip through Redis (and its Lua) intact."""
    index = make_index()
    system = list(range(64))
    shared = hash_blocks(system, 16)
    mine = hash_blocks(system + [7] * 32, 16)
    assert mine[:4] == shared and max(mine) > 2**53
    await index.apply("w1", mine, [])
    await index.replace_worker("w2", shared)
    assert await index.longest_prefix(mine, ["w1", "w2"]) == {"w1": 6, "w2": 4}


async def test_make_prefix_index_picks_the_backend() -> None:
    assert isinstance(make_prefix_index("m", None), InProcessPrefixIndex)
    index = make_prefix_index("m", "redis://127.0.0.1:1")  # no connection until first use
    assert isinstance(index, RedisPrefixIndex) and index.model == "m"
    await index.close()


async def test_clear_forgets_everything(make_index: MakeIndex) -> None:
    index = make_index()
    await index.apply("w1", [1, 2], [])
    await index.replace_worker("w2", [1])
    await index.clear()
    assert await index.num_entries() == 0
    assert await index.longest_prefix([1, 2], ["w1", "w2"]) == {"w1": 0, "w2": 0}


async def _keys(client: aioredis.Redis, pattern: str) -> dict[bytes, int]:
    """Each matching key and its remaining TTL in seconds."""
    return {k: await client.ttl(k) async for k in client.scan_iter(match=pattern, count=1000)}


async def test_clusters_on_one_redis_are_apart_and_their_keys_expire() -> None:
    # Two clusters serving the same model on one Redis: separate keys, all with a TTL that
    # `refresh` renews, and `clear` deletes one cluster's keys only.
    model = f"test-{uuid.uuid4().hex}"
    a = RedisPrefixIndex(REDIS_URL, model, cluster="team-a", ttl_s=5)
    b = RedisPrefixIndex(REDIS_URL, model, cluster="team-b", ttl_s=5)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await a.apply("prefill-0", [1, 2], [])
        await a.replace_worker("prefill-1", [1])
        await b.apply("prefill-0", [7], [])
        assert await b.longest_prefix([1, 2], ["prefill-0", "prefill-1"]) == {"prefill-0": 0, "prefill-1": 0}
        assert await a.longest_prefix([1, 2], ["prefill-0"]) == {"prefill-0": 2}
        a_keys = await _keys(client, f"pdserve:team-a:{model}:*")
        assert len(a_keys) == 5  # blk 1, blk 2, two worker sets, the registry
        assert all(0 < ttl <= 5 for ttl in a_keys.values()), a_keys
        await client.expire(f"pdserve:team-a:{model}:blk:2", 1)  # as if time passed since the write
        await a.refresh()
        assert all(ttl > 1 for ttl in (await _keys(client, f"pdserve:team-a:{model}:*")).values())
        await a.clear()
        assert await _keys(client, f"pdserve:team-a:{model}:*") == {}
        assert await b.longest_prefix([7], ["prefill-0"]) == {"prefill-0": 1}
    finally:
        await b.clear()
        for index in (a, b):
            await index.close()
        await client.aclose()


# ---------------------------------------------------------------------------- Redis outage


async def _raises_unavailable_fast(call: Callable[[], Awaitable[object]]) -> None:
    start = time.monotonic()
    with pytest.raises(IndexUnavailable):
        await call()
    assert time.monotonic() - start < 1.0


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
async def test_redis_killed_then_restarted() -> None:
    port = spare_port()
    proc = start_redis(port)
    index = RedisPrefixIndex(f"redis://127.0.0.1:{port}", "outage-test")
    try:
        await index.apply("w1", [1, 2], [])
        assert await index.longest_prefix([1, 2], ["w1"]) == {"w1": 2}

        proc.kill()
        proc.wait()
        await _raises_unavailable_fast(lambda: index.longest_prefix([1, 2], ["w1"]))
        await _raises_unavailable_fast(lambda: index.apply("w1", [3], []))
        await _raises_unavailable_fast(lambda: index.replace_worker("w1", [1]))
        await _raises_unavailable_fast(index.num_entries)

        proc = start_redis(port)
        # Back, and empty (no persistence): the router rebuilds it from the workers' snapshots.
        assert await index.longest_prefix([1, 2], ["w1"]) == {"w1": 0}
        assert await index.num_entries() == 0
        await index.replace_worker("w1", [1, 2])
        assert await index.longest_prefix([1, 2], ["w1"]) == {"w1": 2}

        # Hung rather than gone (stopped process: connections open, no answers): the socket
        # timeout bounds the wait, and the index answers again once Redis does.
        proc.send_signal(signal.SIGSTOP)
        try:
            await _raises_unavailable_fast(lambda: index.longest_prefix([1, 2], ["w1"]))
        finally:
            proc.send_signal(signal.SIGCONT)
        assert await index.longest_prefix([1, 2], ["w1"]) == {"w1": 2}
    finally:
        await index.close()
        proc.kill()
        proc.wait()
