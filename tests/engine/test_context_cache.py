"""The Redis context cache in the engine, against a real redis-server of this module's own.

Outputs are compared token for token between the three ways a prefix's KV can arrive: computed
here (the reference: no context cache at all), found in the local pool, or loaded from Redis.
The bundled demo model has an MTP layer, so with MTP speculation its KV travels too.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator

import pytest
import redis

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.block_hash import hash_blocks
from pdserve.engine.context_cache_config import ContextCacheConfig, block_key, lru_key
from pdserve.engine.redis_block_store import BlockCodec
from tests.redis_server import spare_port, start_redis, stop_redis

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")

BLOCK = 8
PROMPT = list(range(3, 3 + 6 * BLOCK + 5))  # 6 full blocks, the last 5 tokens computed anyway
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)


@pytest.fixture
def url(redis_port: int) -> Iterator[str]:
    """This module's Redis, emptied before each test."""
    client = redis.Redis(port=redis_port)
    client.flushall()
    client.close()
    yield f"redis://127.0.0.1:{redis_port}"


def make_llm(url: str | None, **cache) -> LLM:
    context_cache = {"redis_url": url, **cache} if url else None
    return LLM(model="demo", num_threads=1, progress=False, block_size=BLOCK, context_cache=context_cache)


def run(llm: LLM, prompt=PROMPT, params=GREEDY):
    out = llm.generate([prompt], params)[0]
    if llm.engine.context_cache is not None:
        llm.engine.context_cache.flush()
    return out


def keys_of(llm: LLM, url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return sorted(client.scan_iter(match=llm.engine.context_cache.ns + ":*"))
    finally:
        client.close()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    plain = make_llm(None)
    return {
        name: run(plain, params=p).outputs[0].token_ids
        for name, p in (("greedy", GREEDY), ("seeded", SEEDED))
    }


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_outputs_are_token_exact_from_the_pool_from_redis_and_recomputed(url, reference, sampling):
    params = GREEDY if sampling == "greedy" else SEEDED
    writer = make_llm(url)
    computed = run(writer, params=params)
    assert computed.outputs[0].token_ids == reference[sampling]
    assert computed.num_cached_tokens == 0
    assert writer.engine.stats().context_cache.blocks_written >= 6

    local = run(writer, params=params)  # the same engine: its own pool holds the prefix
    assert local.outputs[0].token_ids == reference[sampling]
    assert (local.num_cached_tokens, local.num_context_cached_tokens) == (6 * BLOCK, 0)

    reader = make_llm(url)  # a fresh engine (a restarted or other worker): only Redis has it
    loaded = run(reader, params=params)
    assert loaded.outputs[0].token_ids == reference[sampling]
    assert (loaded.num_cached_tokens, loaded.num_context_cached_tokens) == (6 * BLOCK, 6 * BLOCK)
    stats = reader.engine.stats()
    assert stats.context_cache.hit_blocks == 6
    assert stats.context_cache_hit_tokens == 6 * BLOCK
    assert reader.engine.kv.num_free_blocks == reader.engine.kv.num_blocks  # nothing held after


def test_a_longer_prompt_loads_the_stored_prefix_and_computes_the_rest(url):
    longer = PROMPT + list(range(100, 100 + 3 * BLOCK))
    want = run(make_llm(None), longer).outputs[0].token_ids
    run(make_llm(url))  # stores PROMPT's 6 full blocks
    out = run(make_llm(url), longer)
    assert out.outputs[0].token_ids == want
    assert out.num_context_cached_tokens == 6 * BLOCK


def test_the_mtp_layer_kv_is_stored_and_loaded_too(url):
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    want = run(make_llm(None)).outputs[0].token_ids

    def mtp_llm() -> LLM:
        return LLM(model="demo", num_threads=1, progress=False, block_size=BLOCK, speculative_config=spec,
                   context_cache={"redis_url": url})  # fmt: skip

    first = mtp_llm()
    run(first)
    second = mtp_llm()
    out = run(second)
    assert out.outputs[0].token_ids == want
    assert out.num_context_cached_tokens == 6 * BLOCK
    e = second.engine
    assert e.kv_cache.tensor.shape[0] == e.model.num_kv_layers + 1  # the MTP layer is in every block
    # Guessing with the loaded MTP cache is as good as with a computed one.
    assert e.stats().spec_accepted_tokens == first.engine.stats().spec_accepted_tokens


def _tamper(llm: LLM, url: str, index: int, how: str) -> str:
    """Spoils the stored value of PROMPT's block `index`; returns its key."""
    e = llm.engine
    hashes = _prompt_hashes()
    key = block_key(e.context_cache.ns, hashes[index])
    client = redis.Redis.from_url(url)
    try:
        value = client.get(key)
        assert value is not None
        if how == "corrupt":
            value = value[:-10] + bytes(b ^ 0xFF for b in value[-10:])
        elif how == "truncated":
            value = value[: len(value) // 2]
        else:  # another model's value under this key (a digest that is not ours)
            codec = e.context_cache.store.codec
            other = BlockCodec(bytes(16), codec.payload_bytes)
            value = other.encode(hashes[index], value[-codec.payload_bytes :])
        client.set(key, value)
    finally:
        client.close()
    return key


def _prompt_hashes() -> list[int]:
    return hash_blocks(PROMPT, BLOCK)


@pytest.mark.parametrize("how", ["corrupt", "truncated", "foreign"])
def test_a_spoiled_value_is_never_loaded_and_is_deleted(url, reference, how, caplog):
    writer = make_llm(url)
    run(writer)
    key = _tamper(writer, url, 3, how)
    reader = make_llm(url)
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.redis_block_store"):
        out = run(reader)
    assert out.outputs[0].token_ids == reference["greedy"]
    assert out.num_context_cached_tokens == 3 * BLOCK  # the blocks before the spoiled one
    stats = reader.engine.stats().context_cache
    assert stats.rejected == 1
    assert "rejected and deleted" in caplog.text
    # Deleted, then written again by the reader, which computed the block: a sound value now.
    client = redis.Redis.from_url(url)
    value = client.get(key)
    client.close()
    h = _prompt_hashes()[3]
    codec = reader.engine.context_cache.store.codec
    assert len(codec.decode(h, value)) == codec.payload_bytes


def test_a_missing_part_of_a_split_value_is_rejected(url, monkeypatch, reference):
    import pdserve.engine.context_cache_config as ccc
    import pdserve.engine.redis_block_store as store_module

    # Parts of 1 KiB: each demo block (~24 KiB with its MTP layer) is split in many.
    monkeypatch.setattr(store_module, "PART_BYTES", 1024)
    monkeypatch.setattr(ccc, "PART_BYTES", 1024)
    writer = make_llm(url)
    assert writer.engine.context_cache.store.parts > 1
    run(writer)
    hashes = _prompt_hashes()
    client = redis.Redis.from_url(url)
    client.delete(block_key(writer.engine.context_cache.ns, hashes[2], 1))
    client.close()
    reader = make_llm(url)
    out = run(reader)
    assert out.outputs[0].token_ids == reference["greedy"]
    assert out.num_context_cached_tokens == 2 * BLOCK
    assert reader.engine.stats().context_cache.rejected == 1
    # Deleted whole, then written whole again by the reader, which computed the block.
    prefix = block_key(reader.engine.context_cache.ns, hashes[2]).encode()
    assert (
        len([k for k in keys_of(reader, url) if k.startswith(prefix)])
        == reader.engine.context_cache.store.parts
    )


def test_the_memory_budget_keeps_the_most_recent_blocks(url):
    probe = make_llm(url)
    value_bytes = probe.engine.context_cache.store.codec.value_bytes
    llm = make_llm(url, max_bytes=4 * value_bytes)
    run(llm)  # writes 6 blocks (and the generated ones' full blocks): only 4 may stay
    stats = llm.engine.stats().context_cache
    ns = llm.engine.context_cache.ns
    client = redis.Redis.from_url(url)
    try:
        members = client.zrange(lru_key(ns), 0, -1)
        values = [k for k in client.scan_iter(match=ns + ":*") if not k.endswith(b":lru")]
        total = sum(client.strlen(k) for k in values)
    finally:
        client.close()
    assert len(members) == 4 and len(values) == 4
    assert total <= 4 * value_bytes
    assert stats.evictions == stats.blocks_written - 4


def test_values_carry_the_ttl_and_expire(url):
    llm = make_llm(url, ttl_s=1)
    run(llm)
    client = redis.Redis.from_url(url)
    try:
        keys = keys_of(llm, url)
        assert keys and all(0 < client.pttl(k) <= 1000 for k in keys)
        time.sleep(1.2)  # Redis expires them; nothing here depends on how fast the engine is
        assert keys_of(llm, url) == []
    finally:
        client.close()
    out = run(make_llm(url, ttl_s=1))
    assert out.num_context_cached_tokens == 0


def test_min_reuse_zero_writes_blocks_only_when_the_pool_evicts_them(url, reference):
    llm = LLM(model="demo", num_threads=1, progress=False, block_size=BLOCK, kv_cache_blocks=12,
              context_cache={"redis_url": url, "min_reuse": 0})  # fmt: skip
    run(llm)
    assert llm.engine.stats().context_cache.blocks_written == 0  # still in the pool
    run(llm, list(range(200, 200 + 10 * BLOCK)))  # needs the whole pool: PROMPT's blocks leave
    assert llm.engine.stats().context_cache.blocks_written >= 6
    out = run(make_llm(url))
    assert out.outputs[0].token_ids == reference["greedy"]
    assert out.num_context_cached_tokens == 6 * BLOCK


def test_min_reuse_two_writes_a_block_on_its_first_reuse(url):
    llm = make_llm(url, min_reuse=2)
    run(llm)
    assert llm.engine.stats().context_cache.blocks_written == 0
    run(llm)  # the prefix-cache hit is the second use
    assert llm.engine.stats().context_cache.blocks_written >= 6
    assert run(make_llm(url)).num_context_cached_tokens == 6 * BLOCK


def test_no_redis_every_request_completes_and_the_outage_is_logged_once(reference, caplog):
    llm = make_llm(f"redis://127.0.0.1:{spare_port()}", timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.redis_block_store"):
        outs = [run(llm, list(range(i, i + 40))) for i in range(3)] + [run(llm)]
    assert outs[-1].outputs[0].token_ids == reference["greedy"]
    stats = llm.engine.stats().context_cache
    assert not stats.available and stats.errors >= 1
    assert caplog.text.count("unavailable") == 1


def test_redis_killed_mid_run_and_restarted(reference, monkeypatch):
    import pdserve.engine.redis_block_store as store_module

    monkeypatch.setattr(store_module, "RETRY_S", 0.0)  # try again at once after the restart
    port = spare_port()
    proc = start_redis(port)
    url = f"redis://127.0.0.1:{port}"
    try:
        llm = make_llm(url, timeout_s=0.3)
        run(llm, list(range(50, 90)))
        stop_redis(proc)
        # Generating while Redis is gone: fetches and writes fail, the request completes.
        assert run(make_llm(url, timeout_s=0.3)).outputs[0].token_ids == reference["greedy"]
        proc = start_redis(port)
        writer = make_llm(url, timeout_s=0.3)
        assert run(writer).outputs[0].token_ids == reference["greedy"]
        assert writer.engine.stats().context_cache.available
        out = run(make_llm(url, timeout_s=0.3))
        assert out.outputs[0].token_ids == reference["greedy"]
        assert out.num_context_cached_tokens == 6 * BLOCK
    finally:
        stop_redis(proc)


def test_engines_of_other_weights_or_layouts_do_not_share_blocks(url):
    run(make_llm(url))
    other_block = LLM(model="demo", num_threads=1, progress=False, block_size=2 * BLOCK,
                      context_cache={"redis_url": url})  # fmt: skip
    assert run(other_block).num_context_cached_tokens == 0
    dummy = LLM(model="demo", load_format="dummy", seed=1, num_threads=1, progress=False, block_size=BLOCK,
                context_cache={"redis_url": url})  # fmt: skip
    assert run(dummy).num_context_cached_tokens == 0
    assert (
        dummy.engine.served_model.context_cache_namespace
        != make_llm(url).engine.served_model.context_cache_namespace
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"redis_url": "http://x"}, "redis_url must be a redis://"),
        ({"redis_url": "redis://x", "max_bytes": 0}, "max_bytes must be a positive integer"),
        ({"redis_url": "redis://x", "ttl_s": True}, "ttl_s must be a positive integer"),
        ({"redis_url": "redis://x", "min_reuse": -1}, "min_reuse must be an integer >= 0"),
        ({"redis_url": "redis://x", "ttl": 5}, "unknown key 'ttl'"),
    ],
)
def test_bad_settings_name_the_key(value, message):
    with pytest.raises(ValueError, match=message):
        ContextCacheConfig.from_value(value)


def test_the_context_cache_needs_the_prefix_cache():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM(
            model="demo",
            progress=False,
            enable_prefix_caching=False,
            context_cache={"redis_url": "redis://x"},
        )


def test_a_failure_inside_the_context_cache_never_fails_a_request_nor_leaks_blocks(
    url, reference, monkeypatch
):
    run(make_llm(url))
    llm = make_llm(url)
    e = llm.engine

    def broken(hashes):
        raise RuntimeError("a bug in the lookup")

    monkeypatch.setattr(e.context_cache.store, "fetch", broken)
    out = run(llm)
    assert out.outputs[0].token_ids == reference["greedy"] and out.num_cached_tokens == 0
    assert e.kv.num_free_blocks == e.kv.num_blocks
    assert e.stats().context_cache.errors == 1
    monkeypatch.undo()
    # Loaded blocks are the pool's like any other: freed with the request, none held after.
    out = run(make_llm(url))
    assert out.num_context_cached_tokens == 6 * BLOCK
