"""Placement policies on constructed candidates, and on the benchmark's shared-prefix simulation."""

from __future__ import annotations

from collections import Counter

import pytest

from pdserve.bench.router_bench import simulate_shared_prefix
from pdserve.roles.messages import WorkerLoad
from pdserve.router.policies import (
    CONTEXT_CACHE_WEIGHT,
    DEFAULT_POLICY,
    POLICIES,
    CacheAware,
    Candidate,
    PrefillPolicy,
    choose_decode,
    make_policy,
)

BS = 16


def cand(
    worker_id: str,
    *,
    queued: int = 0,
    running: int = 0,
    waiting: int = 0,
    cached: int = 0,
    total: int = 1000,
    free: int = 1000,
    in_redis: int = 0,
) -> Candidate:
    load = WorkerLoad(
        worker_id=worker_id,
        role="prefill",
        num_waiting=waiting,
        num_running=running,
        num_pending_sends=0,
        kv_blocks_total=total,
        kv_blocks_free=free,
        block_size=BS,
        waiting_prefill_tokens=queued,
        last_step_seconds=0.01,
        draining=False,
    )
    return Candidate(worker_id, load, cached, in_redis)


def test_make_policy_knows_every_policy_and_names_them_on_a_typo() -> None:
    assert set(POLICIES) == {"round_robin", "least_load", "power_of_two", "cache_aware"}
    assert DEFAULT_POLICY == "cache_aware"
    for name in POLICIES:
        policy = make_policy(name, seed=3)
        assert isinstance(policy, PrefillPolicy) and policy.name == name
    with pytest.raises(ValueError, match="round_robin, least_load, power_of_two, cache_aware"):
        make_policy("cache-aware")


def test_policies_refuse_an_empty_candidate_list() -> None:
    for name in POLICIES:
        with pytest.raises(ValueError):
            make_policy(name).choose([], 100)


def test_round_robin_cycles_whatever_the_candidate_order() -> None:
    policy = make_policy("round_robin")
    cs = [cand("a"), cand("b"), cand("c")]
    picks = []
    for i in range(6):
        order = cs if i % 2 else list(reversed(cs))
        picks.append(policy.choose(order, 100).worker_id)
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_load_prefers_fewest_queued_tokens_then_fewer_running_then_id() -> None:
    policy = make_policy("least_load")
    assert policy.choose([cand("a", queued=500), cand("b", queued=400, running=9)], 10).worker_id == "b"
    assert (
        policy.choose([cand("a", queued=400, running=2), cand("b", queued=400, running=1)], 10).worker_id
        == "b"
    )
    assert policy.choose([cand("b", queued=400), cand("a", queued=400)], 10).worker_id == "a"


def test_power_of_two_is_deterministic_per_seed() -> None:
    cs = [cand(f"w{i}", queued=100 * i) for i in range(6)]
    policies = [make_policy("power_of_two", seed=s) for s in (7, 7, 8)]
    picks = [[p.choose(cs, 10).worker_id for _ in range(50)] for p in policies]
    assert picks[0] == picks[1]
    assert picks[0] != picks[2]
    assert len(set(picks[0])) > 2  # it samples, not always the global minimum
    assert make_policy("power_of_two").choose([cs[3]], 10) is cs[3]


def test_power_of_two_never_picks_the_most_loaded_of_three_when_two_are_idle() -> None:
    policy = make_policy("power_of_two", seed=1)
    cs = [cand("idle1"), cand("busy", queued=5000, running=8), cand("idle2")]
    picks = Counter(policy.choose(cs, 10).worker_id for _ in range(300))
    assert picks["busy"] == 0 and picks["idle1"] > 0 and picks["idle2"] > 0


def test_cache_aware_follows_a_long_shared_prefix_when_loads_are_similar() -> None:
    policy = make_policy("cache_aware")
    holder = cand("holder", queued=300, running=2, cached=64)  # 1024 tokens cached
    others = [cand("a", queued=0, running=1), cand("b", queued=100)]
    assert policy.choose([*others, holder], 1100).worker_id == "holder"


def test_cache_aware_leaves_the_prefix_holder_once_its_queue_outweighs_the_savings() -> None:
    policy = make_policy("cache_aware")
    saved = 64 * BS
    # Break-even: the holder's extra queue against what its prefix saves.
    below = [cand("holder", queued=saved - 1, cached=64), cand("idle")]
    above = [cand("holder", queued=saved + 1, cached=64), cand("idle")]
    assert policy.choose(below, 1100).worker_id == "holder"
    assert policy.choose(above, 1100).worker_id == "idle"
    much_longer = [cand("holder", queued=8000, running=4, cached=64), cand("idle", queued=200)]
    assert policy.choose(much_longer, 1100).worker_id == "idle"


def test_cache_aware_is_least_load_when_nothing_is_cached() -> None:
    cache_aware, least_load = make_policy("cache_aware"), make_policy("least_load")
    cases = [
        [cand("a", queued=500), cand("b", queued=400, running=9)],
        [cand("a", queued=400, running=2), cand("b", queued=400, running=1)],
        [cand("b"), cand("a")],
        [cand(f"w{i}", queued=(37 * i) % 11 * 100, running=i % 3) for i in range(8)],
    ]
    for cs in cases:
        assert cache_aware.choose(cs, 700).worker_id == least_load.choose(cs, 700).worker_id


def test_cache_aware_prefers_the_longer_prefix_and_breaks_ties_by_running_load() -> None:
    policy = make_policy("cache_aware")
    assert policy.choose([cand("short", cached=4), cand("long", cached=40)], 1000).worker_id == "long"
    tie = [cand("busy", running=3, cached=10), cand("calm", running=1, cached=10)]
    assert policy.choose(tie, 1000).worker_id == "calm"
    # A prompt fully cached saves at most its own length: more cached blocks (a longer conversation
    # of which this prompt is a prefix) buy nothing more, so load decides.
    capped = [cand("a", queued=50, cached=100), cand("b", queued=0, cached=10)]
    assert CacheAware.cost(capped[0], 160) == 50 and CacheAware.cost(capped[1], 160) == 0
    assert policy.choose(capped, 160).worker_id == "b"


def test_choose_decode_needs_room_for_the_prompt_and_one_token() -> None:
    assert choose_decode([], 10) is None
    assert choose_decode([cand("a", free=2), cand("b", free=3)], 3 * BS) is None
    exact = cand("exact", free=4, total=4)  # 64 tokens of room for a 63-token prompt + 1
    assert choose_decode([exact], 63) is exact
    assert choose_decode([exact], 64) is None


def test_choose_decode_needs_room_on_one_rank_of_an_expert_parallel_group() -> None:
    from dataclasses import replace

    from pdserve.engine.stats import RankLoad

    def group(worker_id: str, free: list[int]) -> Candidate:
        ranks = [RankLoad(r, 100 + r, 50, f, 0, 0) for r, f in enumerate(free)]
        c = cand(worker_id, free=sum(free), total=50 * len(free))
        return Candidate(worker_id, replace(c.load, ranks=ranks))

    split = group("split", [3, 3])  # 6 blocks free in all, 3 on each rank
    assert split.load.kv_blocks_free == 6 and split.load.room_blocks == 3
    assert choose_decode([split], 4 * BS - 1) is None  # 4 blocks fit the sum, no single rank
    assert choose_decode([split], 3 * BS - 1) is split
    lopsided = group("lopsided", [0, 5])
    assert choose_decode([split, lopsided], 4 * BS - 1) is lopsided
    # Placement lowers the group's free blocks by what it placed since the report; room follows.
    assert replace(lopsided.load, kv_blocks_free=2).room_blocks == 2


def test_choose_decode_weighs_headroom_then_running_load() -> None:
    roomy_busy = cand("roomy_busy", running=6, waiting=1, free=600, total=1000)
    roomy_calm = cand("roomy_calm", running=2, free=300, total=1000)
    tight_idle = cand("tight_idle", running=0, free=115, total=1000)  # 95 left after 20 blocks: < 10%
    assert choose_decode([roomy_busy, roomy_calm, tight_idle], 20 * BS - 1).worker_id == "roomy_calm"
    assert choose_decode([roomy_busy, tight_idle], 20 * BS - 1).worker_id == "roomy_busy"
    assert choose_decode([tight_idle], 20 * BS - 1).worker_id == "tight_idle"  # tight beats none
    same = [cand("less_free", running=2, free=300), cand("more_free", running=2, free=500)]
    assert choose_decode(same, 100).worker_id == "more_free"


# ---------------------------------------------------------------------------- simulation
# The shared-prefix simulation lives in the router benchmark (part 3), which reports the same numbers.


def test_cache_aware_hit_rate_on_a_shared_prefix_workload() -> None:
    got = simulate_shared_prefix(["oracle", "cache_aware", "round_robin", "least_load"], seed=0)
    rates = {p: round(r.hit_rate, 3) for p, r in got.items()}
    assert got["cache_aware"].hit_rate >= 0.9 * got["oracle"].hit_rate, rates
    assert got["cache_aware"].hit_rate >= got["round_robin"].hit_rate + 0.15, rates
    assert got["cache_aware"].hit_rate >= got["least_load"].hit_rate + 0.15, rates
    # It buys those hits without letting one worker's queue run away, unlike the load-blind oracle.
    assert got["cache_aware"].max_queue <= got["oracle"].max_queue, {p: r.max_queue for p, r in got.items()}


def test_blocks_in_the_context_cache_count_for_every_worker_at_less_than_a_local_hit() -> None:
    policy = CacheAware()
    prompt = 64 * BS
    # Only the Redis part beyond a worker's own prefix is loaded (at a cost), so it saves less.
    redis_only = cand("a", in_redis=48)
    assert CacheAware.cost(redis_only, prompt) == prompt - CONTEXT_CACHE_WEIGHT * 48 * BS
    holder = cand("b", cached=48, in_redis=48)
    assert CacheAware.cost(holder, prompt) == prompt - 48 * BS
    assert policy.choose([redis_only, holder], prompt).worker_id == "b"
    # The holder's edge over the others shrinks to what loading costs: a small queue outweighs it,
    # where without the context cache the whole prefix would (48 blocks of queued tokens).
    queue = int((1 - CONTEXT_CACHE_WEIGHT) * 48 * BS) + BS
    busy_holder = cand("b", cached=48, in_redis=48, queued=queue)
    assert policy.choose([redis_only, busy_holder], prompt).worker_id == "a"
    assert policy.choose([cand("a"), cand("b", cached=48, queued=queue)], prompt).worker_id == "b"
    # Past the prompt (or past the local prefix) nothing more is saved.
    assert CacheAware.cost(cand("c", cached=70, in_redis=90), prompt) == 0
