"""The Redis context cache between worker actors (real Ray, real Gloo, a redis-server of its own).

A prefix computed by one worker is loaded, not computed, by another: a second `both` worker, a
worker restarted in its place, and the worker that becomes the prefill worker after a role switch
(its prefill goes to the decode worker over Gloo as before). Outputs equal an engine's without any
cache, token for token.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time

import pytest
import redis

from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.engine.block_hash import hash_blocks
from pdserve.engine.context_cache_config import block_key
from pdserve.roles.chunk_feed import ChunkFeeds
from pdserve.roles.handoff import ChannelGenerations, WorkerRef, generate_colocated, generate_disaggregated
from pdserve.roles.worker import start_worker
from tests.prompts import prompts_of

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")

BLOCK = 4
SYSTEM = prompts_of([64], seed=11)[0]  # 16 blocks shared by every prompt below
QUESTIONS = prompts_of([9, 13, 7, 11], seed=12)
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
_ids = itertools.count()


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    llm = LLM(str(moe_checkpoint), dtype="float32", block_size=BLOCK, progress=False)
    outs = llm.generate([SYSTEM + q for q in QUESTIONS], PARAMS)
    return [o.outputs[0].token_ids for o in outs]


def start(checkpoint, redis_url: str, role: str) -> WorkerRef:
    import ray

    config = EngineConfig(
        model=str(checkpoint), dtype="float32", block_size=BLOCK, num_threads=1, progress=False,
        kv_cache_blocks=64, context_cache={"redis_url": redis_url},
    )  # fmt: skip
    worker_id = f"{role}-cc-{next(_ids)}"
    handle = start_worker(worker_id, config, role)
    return WorkerRef(worker_id, handle, ray.get(handle.ready.remote()))


async def colocated(ref: WorkerRef, rid: str, prompt: list[int]) -> list:
    """The router's colocated path: start on the worker, chunks on its feed."""
    return [c async for c in generate_colocated(ref, rid, prompt, PARAMS, ChannelGenerations(), ChunkFeeds())]


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def wait_for_blocks(redis_url: str, ns: str, prompt: list[int], timeout_s: float = 30.0) -> None:
    """Until the worker's writer thread has put the prompt's full blocks into Redis."""
    keys = [block_key(ns, h) for h in hash_blocks(prompt, BLOCK)[: (len(prompt) - 1) // BLOCK]]
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while client.exists(*keys) < len(keys):
            assert time.monotonic() < deadline, "the blocks never reached Redis"
            time.sleep(0.05)
    finally:
        client.close()


def flush(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()


def test_two_workers_share_a_system_prompt_and_a_restarted_one_reuses_it(
    ray_session, moe_checkpoint, redis_url, reference
):
    flush(redis_url)
    a, b = start(moe_checkpoint, redis_url, "both"), start(moe_checkpoint, redis_url, "both")
    try:
        ns = ray_session.get(a.handle.served_model.remote()).context_cache_namespace
        first = asyncio.run(colocated(a, "cc-a", SYSTEM + QUESTIONS[0]))
        assert tokens(first) == reference[0]
        assert first[-1].num_context_cached_tokens == 0
        wait_for_blocks(redis_url, ns, SYSTEM + QUESTIONS[0])

        second = asyncio.run(colocated(b, "cc-b", SYSTEM + QUESTIONS[1]))
        assert tokens(second) == reference[1]
        assert second[-1].num_context_cached_tokens == len(SYSTEM)  # B computed none of the system prompt
        assert second[-1].num_cached_tokens == len(SYSTEM)
        load = ray_session.get(b.handle.load.remote())
        assert load.context_cache_hit_tokens == len(SYSTEM) and load.context_cache_bytes_read > 0
        text = ray_session.get(b.handle.metrics_text.remote())
        assert "pdserve_context_cache_hit_blocks_total" in text
        assert 'pdserve_context_cache_fetching{worker="' + b.worker_id + '"} 0.0' in text  # none left waiting

        ray_session.kill(a.handle)  # A restarts as a fresh worker: its pool is empty
        a = start(moe_checkpoint, redis_url, "both")
        third = asyncio.run(colocated(a, "cc-a2", SYSTEM + QUESTIONS[2]))
        assert tokens(third) == reference[2]
        assert third[-1].num_context_cached_tokens == len(SYSTEM)
    finally:
        for ref in (a, b):
            ray_session.kill(ref.handle)


def test_after_a_role_switch_the_new_prefill_worker_loads_the_prefix_before_its_handoff(
    ray_session, moe_checkpoint, redis_url, reference
):
    flush(redis_url)
    prefill, decode, spare = (start(moe_checkpoint, redis_url, r) for r in ("prefill", "decode", "decode"))
    channels, feeds = ChannelGenerations(), ChunkFeeds()
    try:
        ns = ray_session.get(prefill.handle.served_model.remote()).context_cache_namespace

        async def pd(p: WorkerRef, d: WorkerRef, rid: str, prompt: list[int]) -> list:
            return [c async for c in generate_disaggregated(p, d, rid, prompt, PARAMS, channels, feeds)]

        first = asyncio.run(pd(prefill, decode, "cc-pd-1", SYSTEM + QUESTIONS[0]))
        assert tokens(first) == reference[0]
        wait_for_blocks(redis_url, ns, SYSTEM + QUESTIONS[0])
        # The prefill worker leaves the role, and one that never saw the prompt takes it over.
        ray_session.get(prefill.handle.set_role.remote("decode"))
        ray_session.get(spare.handle.set_role.remote("prefill"))
        second = asyncio.run(pd(spare, prefill, "cc-pd-2", SYSTEM + QUESTIONS[3]))
        assert tokens(second) == reference[3]  # the decode side got the full KV, loaded part and all
        assert second[-1].num_context_cached_tokens == second[-1].num_cached_tokens == len(SYSTEM)
        for ref in (prefill, decode, spare):
            load = ray_session.get(ref.handle.load.remote())
            assert load.kv_blocks_free == load.kv_blocks_total and load.num_pending_sends == 0
    finally:
        for ref in (prefill, decode, spare):
            ray_session.kill(ref.handle)
