"""The router's look at the context cache: the leading run of a prompt's blocks in Redis, and 0
while Redis is gone (a redis-server of the test's own, killed and restarted)."""

from __future__ import annotations

import shutil

import pytest
import redis

from pdserve.engine.block_hash import hash_blocks
from pdserve.engine.context_cache_config import block_key
from pdserve.router.context_cache_view import ContextCacheView, make_context_cache_view
from tests.redis_server import spare_port, start_redis, stop_redis

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_counts_the_leading_run_and_survives_an_outage() -> None:
    port = spare_port()
    proc = start_redis(port)
    url = f"redis://127.0.0.1:{port}"
    hashes = hash_blocks(list(range(64)), 8)  # 8 blocks
    client = redis.Redis.from_url(url)
    view = ContextCacheView(url, "pdserve:ctx:test")
    try:
        for h in hashes[:3] + hashes[4:6]:  # block 3 is missing: the run is 3 long
            client.set(block_key(view.ns, h), b"x")
        client.set(block_key("pdserve:ctx:other", hashes[3]), b"x")  # another model's: not counted
        assert await view.leading_blocks(hashes) == 3
        assert await view.leading_blocks(hashes[4:]) == 2
        assert await view.leading_blocks([]) == 0

        stop_redis(proc)
        assert await view.leading_blocks(hashes) == 0 and not view.available
        proc = start_redis(port)  # back, and empty (no persistence)
        client = redis.Redis.from_url(url)
        client.set(block_key(view.ns, hashes[0]), b"x")
        assert await view.leading_blocks(hashes) == 1 and view.available
    finally:
        client.close()
        await view.close()
        stop_redis(proc)


def test_no_view_when_the_engines_keep_no_context_cache() -> None:
    assert make_context_cache_view(None, None) is None
    assert make_context_cache_view("redis://127.0.0.1:6379", None) is None
