"""The context cache seen from HTTP: a prefix the worker's pool evicted comes back from Redis.

Real stack (Ray prefill and decode workers with small pools, the gRPC router, the gateway) and a
redis-server of its own. `usage.prompt_tokens_details` splits `cached_tokens` (the total) into
`local_cached_tokens` and `redis_cached_tokens`; outputs equal the first, computed answer.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
import redis

from tests.gateway.stack import BLOCK_SIZE, gateway_stack
from tests.prompts import prompts_of

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")

BLOCKS = 48  # 192 tokens per worker: three other prompts evict a prefix
DOCUMENT = prompts_of([100], seed=21)[0]  # 25 blocks
OTHERS = prompts_of([120, 120, 120, 120], seed=22)


@pytest.fixture(scope="module")
def cc_stack(ray_session, moe_checkpoint, redis_url):
    with gateway_stack(
        ray_session, moe_checkpoint, name="pdserve-controller-cc-test", blocks=BLOCKS,
        engine_args={"context_cache": {"redis_url": redis_url}},
    ) as s:  # fmt: skip
        yield s


def complete(stack, prompt: list[int]) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(stack.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_an_evicted_prefix_is_loaded_from_redis_and_usage_splits_the_cached_tokens(cc_stack, redis_url):
    question = [*DOCUMENT, 5, 6, 7]
    first = complete(cc_stack, question)
    assert first["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0, "local_cached_tokens": 0, "redis_cached_tokens": 0,
    }  # fmt: skip
    again = complete(cc_stack, question)  # still in the prefill worker's pool
    details = again["usage"]["prompt_tokens_details"]
    assert (
        details["local_cached_tokens"] == details["cached_tokens"] == 100
        and details["redis_cached_tokens"] == 0
    )

    for other in OTHERS:  # fill the small pools: the document's blocks are evicted
        complete(cc_stack, other)
    names = ("pdserve_router_context_cache_hit_tokens_total", "pdserve_prefix_index_hit_tokens_total")
    seen = [cc_stack.router_metrics.get_sample_value(n) for n in names]
    later = complete(cc_stack, question)
    # Placement counted the whole prefix as reachable: in Redis, or (the index may lag the
    # eviction by a view interval) on the worker.
    now = [cc_stack.router_metrics.get_sample_value(n) for n in names]
    assert (now[0] - seen[0]) + (now[1] - seen[1]) == 100
    details = later["usage"]["prompt_tokens_details"]
    assert details == {"cached_tokens": 100, "local_cached_tokens": 0, "redis_cached_tokens": 100}
    assert later["choices"][0]["text"] == first["choices"][0]["text"]
    cc_stack.wait_idle()  # every block freed on every worker afterwards

    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() > 100 // BLOCK_SIZE  # the blocks written (and the budget's sorted set)
    client.close()
