"""Scheduler and KVCacheManager: budgets, chunking, prefix reuse, preemption, accounting."""

from __future__ import annotations

from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler


def req(rid: str, n: int, arrival: int, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(), max_tokens=100, arrival=arrival)


def advance(batch) -> None:
    """What the engine does after a step: count computed tokens, sample where the prompt is done."""
    for r, n in zip(batch.requests, batch.num_tokens):
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(7)


def test_token_budget_chunks_long_prompts_and_mixes_decodes():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    short, long = req("s", 3, 0), req("l", 25, 1, start=100)
    s.add(short)
    s.add(long)
    b = s.schedule()
    assert [r.request_id for r in b.requests] == ["s", "l"] and b.num_tokens == [3, 7]
    advance(b)
    b = s.schedule()
    assert b.num_tokens == [1, 9]  # one decode for s, the next chunk of l
    assert b.total_tokens <= 10


def test_max_num_seqs_limits_admission():
    kv = KVCacheManager(64, 4, True)
    s = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        s.add(req(str(i), 4, i, start=10 * i))
    assert len(s.schedule()) == 2 and s.num_waiting == 1


def test_prefix_hit_skips_cached_blocks_but_never_the_last_token():
    kv = KVCacheManager(64, 4, True)
    s = Scheduler(kv, 8, 100)
    a = req("a", 12, 0)
    s.add(a)
    advance(s.schedule())
    kv.cache_computed_blocks(a)
    b = req("b", 12, 1)  # same 12 tokens: 3 full blocks cached, but the last token must be computed
    s.add(b)
    batch = s.schedule()
    i = batch.requests.index(b)
    assert b.num_cached_tokens == 8 and batch.num_tokens[i] == 4
    assert b.block_ids[:2] == a.block_ids[:2]
    assert kv.pool.ref_count(a.block_ids[0]) == 2


def test_preemption_frees_the_latest_request_and_requeues_it_first():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    s = Scheduler(kv, 8, 100)
    first, second = req("first", 8, 0), req("second", 7, 1, start=50)
    s.add(first)
    s.add(second)
    advance(s.schedule())  # first: 2 blocks + 1 token -> needs a 3rd block next step; second: 2 blocks
    b = s.schedule()
    assert [r.request_id for r in b.requests] == ["first"]
    assert second.status is RequestStatus.WAITING and second.num_computed_tokens == 0
    assert s.waiting[0] is second and s.num_preemptions == 1
    assert kv.num_free_blocks == 1


def test_free_returns_every_block():
    kv = KVCacheManager(16, 4, True)
    s = Scheduler(kv, 8, 100)
    rs = [req(str(i), 9, i, start=20 * i) for i in range(3)]
    for r in rs:
        s.add(r)
    advance(s.schedule())
    for r in rs:
        kv.cache_computed_blocks(r)
        s.remove(r)
        kv.free(r)
    assert kv.num_free_blocks == 16


def test_a_prompt_being_computed_is_waited_for_not_computed_twice():
    # Three copies of one 12-token prompt (a request's n=3 choices) arrive together: the first
    # computes it; the others wait a step for its blocks instead of computing them again, while
    # a request with another prompt behind them is admitted at once.
    kv = KVCacheManager(64, 4, True)
    s = Scheduler(kv, 8, 100)
    a, b, c, other = req("a", 12, 0), req("b", 12, 1), req("c", 12, 2), req("o", 8, 3, start=50)
    for r in (a, b, c, other):
        s.add(r)
    first = s.schedule()
    assert [r.request_id for r in first.requests] == ["a", "o"]
    assert [r.request_id for r in s.waiting] == ["b", "c"]  # still first in line
    advance(first)
    kv.cache_computed_blocks(a)  # what the engine does after the step
    second = s.schedule()
    assert [r.request_id for r in second.requests] == ["a", "o", "b", "c"]
    assert b.num_cached_tokens == c.num_cached_tokens == 8  # 2 of 3 blocks shared; the last token computes
    assert second.num_tokens[2:] == [4, 4]
    assert kv.pool.ref_count(a.block_ids[0]) == 3


def test_a_request_waits_only_for_blocks_someone_is_computing():
    kv = KVCacheManager(64, 4, False)  # no prefix caching: nothing to share, nothing to wait for
    s = Scheduler(kv, 8, 100)
    s.add(req("a", 12, 0))
    s.add(req("b", 12, 1))
    assert len(s.schedule()) == 2
    kv = KVCacheManager(64, 4, True)
    s = Scheduler(kv, 8, 100)
    a = req("a", 12, 0)
    s.add(a)
    advance(s.schedule())
    kv.cache_computed_blocks(a)
    s.add(req("b", 12, 1))  # a's prompt is computed and cached: b is admitted with its prefix
    assert [r.request_id for r in s.schedule().requests] == ["a", "b"]
