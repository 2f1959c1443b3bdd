"""The context cache's lookups run off the step loop: a slow Redis delays only the request asking.

Redis sits behind a `GatedProxy` whose replies the test holds and releases, so "slow" is a state
the test controls, not a duration: while a lookup's reply is held, the engine keeps stepping the
other requests (counted in steps and tokens), and the waiting request then gets its prefix from
Redis, token-exact. Cancelling during a lookup, Redis dropping the connection, and a lookup past
`timeout_s` leave no KV block behind.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
import redis

from pdserve.engine import LLM, Engine, GuidedDecoding, SamplingParams
from tests.gated_proxy import GatedProxy

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")

BLOCK = 8
PROMPT = list(range(3, 3 + 6 * BLOCK + 5))  # its 6 full blocks are put in Redis first
STREAM = list(range(300, 300 + 3 * BLOCK + 2))  # the running request's prompt, never in Redis
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def make_llm(url: str | None, **cache) -> LLM:
    context_cache = {"redis_url": url, **cache} if url else None
    return LLM(model="demo", num_threads=1, progress=False, block_size=BLOCK, context_cache=context_cache)


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    plain = make_llm(None)
    outs = plain.generate([PROMPT, STREAM], [GREEDY, LONG])
    return {"prompt": outs[0].outputs[0].token_ids, "stream": outs[1].outputs[0].token_ids}


@pytest.fixture
def proxy(redis_port: int) -> Iterator[GatedProxy]:
    """Redis (emptied, then holding PROMPT's blocks) behind a proxy whose replies can be held."""
    client = redis.Redis(port=redis_port)
    client.flushall()
    client.close()
    writer = make_llm(f"redis://127.0.0.1:{redis_port}")
    writer.generate([PROMPT], GREEDY)
    writer.engine.context_cache.flush()
    p = GatedProxy(redis_port)
    yield p
    p.close()


def engine_behind(proxy: GatedProxy, **cache) -> Engine:
    return make_llm(f"redis://127.0.0.1:{proxy.port}", **{"timeout_s": 30.0, **cache}).engine


class Driver:
    """Steps an engine, keeping each request's tokens and its Redis-cached prompt tokens."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.from_redis: dict[str, int] = {}

    def step(self) -> None:
        for d in self.engine.step():
            self.tokens[d.request_id] += d.new_token_ids
            if d.finished:
                self.from_redis[d.request_id] = d.num_context_cached_tokens

    def until(self, done: Callable[[], bool], limit: int = 5000) -> None:
        for _ in range(limit):
            if done():
                return
            self.step()
        raise AssertionError(f"not done after {limit} steps")


def no_blocks_held(e: Engine) -> bool:
    return e.kv.num_free_blocks == e.kv.num_blocks and not e.has_unfinished()


def test_a_running_stream_keeps_stepping_while_a_lookup_waits_on_slow_redis(proxy, reference):
    e = engine_behind(proxy)
    run = Driver(e)
    e.add_request("stream", STREAM, LONG)
    run.until(lambda: len(run.tokens["stream"]) >= 2)
    proxy.shut()  # Redis is slow from now on: no reply comes until the test says so
    e.add_request("late", PROMPT, GREEDY)
    before = len(run.tokens["stream"])
    for _ in range(6):
        run.step()
    # Every step ran the stream (one token each); none waited on the held lookup.
    assert len(run.tokens["stream"]) == before + 6
    assert run.tokens["late"] == []
    stats = e.stats()
    assert stats.num_fetching_context == 1 and "late" in e.request_ids()
    assert stats.num_waiting == 1 and stats.waiting_prefill_tokens == len(PROMPT)  # placement sees it
    proxy.open()
    run.until(lambda: not e.has_unfinished())
    assert run.tokens["late"] == reference["prompt"]
    assert run.tokens["stream"] == reference["stream"]
    assert run.from_redis["late"] == 6 * BLOCK  # it waited for the answer, and used it
    assert proxy.held_replies >= 1
    assert no_blocks_held(e)


def test_cancel_during_a_lookup_frees_everything_and_loads_nothing(proxy, reference):
    e = engine_behind(proxy)
    run = Driver(e)
    proxy.shut()
    e.add_request("gone", PROMPT, GREEDY)
    for _ in range(3):
        run.step()
    assert e.stats().num_fetching_context == 1 and e.unstarted_request_ids() == ["gone"]
    assert e.abort("gone")
    assert "gone" not in e.request_ids() and not e.has_unfinished()
    proxy.open()
    _wait_for(lambda: e.stats().context_cache.fetches >= 1)  # the answer came, for nobody
    for _ in range(3):
        run.step()
    assert run.tokens["gone"] == [] and e.kv.pool.num_cached == 0 and no_blocks_held(e)
    # The engine goes on as before: the same prompt now loads its prefix.
    e.add_request("again", PROMPT, GREEDY)
    run.until(lambda: not e.has_unfinished())
    assert run.tokens["again"] == reference["prompt"] and run.from_redis["again"] == 6 * BLOCK
    assert no_blocks_held(e)


def test_redis_dropping_the_connection_during_a_lookup_the_request_computes(proxy, reference):
    e = engine_behind(proxy)
    run = Driver(e)
    proxy.shut()
    e.add_request("r", PROMPT, GREEDY)
    run.step()
    proxy.drop()  # Redis gone mid-call
    proxy.open()
    run.until(lambda: not e.has_unfinished())
    assert run.tokens["r"] == reference["prompt"] and run.from_redis["r"] == 0
    assert e.stats().context_cache.errors >= 1
    assert no_blocks_held(e)


def test_a_lookup_past_timeout_s_is_given_up_and_the_request_computes(proxy, reference):
    e = engine_behind(proxy, timeout_s=0.3)
    run = Driver(e)
    proxy.shut()  # and never opened while the request runs
    e.add_request("r", PROMPT, GREEDY)
    run.until(lambda: not e.has_unfinished())
    assert run.tokens["r"] == reference["prompt"] and run.from_redis["r"] == 0
    cc = e.stats().context_cache
    # Given up by the engine, or by the client's socket timeout first: either way, not loaded.
    assert cc.fetch_timeouts + cc.errors >= 1 and cc.hit_blocks == 0
    assert no_blocks_held(e)


def test_a_guided_request_waits_for_its_lookup_and_its_grammar(proxy):
    guided = SamplingParams(
        temperature=0, max_tokens=12, guided_decoding=GuidedDecoding("regex", "(alpha|beta) [a-z]+")
    )
    want = make_llm(None).generate([PROMPT], guided)[0].outputs[0].token_ids
    e = engine_behind(proxy)
    run = Driver(e)
    proxy.shut()
    e.add_request("g", PROMPT, guided)
    run.step()
    assert e.stats().num_fetching_context == 1
    proxy.open()
    run.until(lambda: not e.has_unfinished())
    assert run.tokens["g"] == want and run.from_redis["g"] == 6 * BLOCK
    assert no_blocks_held(e)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """For what happens on another thread (a deadline for a hang, not a measure of speed)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
