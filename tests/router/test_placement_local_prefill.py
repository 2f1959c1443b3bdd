"""Conditional disaggregation only onto a decode worker with room for the prompt.

A local prefill allocates as it goes (no admission waits for room), so on a full decode worker
it would preempt the requests decoding there and evict the prefix it just loaded from the
context cache. The placement is a unit here: a fixed view of two workers' load reports.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pdserve.cluster.controller import WorkerInfo
from pdserve.roles.kv_channel import Endpoint
from pdserve.roles.messages import WorkerLoad
from pdserve.router.metrics import RouterMetrics
from pdserve.router.placement import RouterPlacement
from pdserve.router.policies import make_policy

BLOCK = 16
PROMPT = list(range(1, 41))  # 40 tokens: within local_prefill_tokens, 3 blocks with the first token


def worker(role: str, free: int, index: int = 0) -> WorkerInfo:
    wid = f"{role}-{index}"
    load = WorkerLoad(wid, role, 0, 0, 0, kv_blocks_total=64, kv_blocks_free=free, block_size=BLOCK,
                      waiting_prefill_tokens=0, last_step_seconds=0.0, draining=False)  # fmt: skip
    return WorkerInfo(wid, wid, role, handle=None, endpoint=Endpoint(wid, "127.0.0.1", 0), load=load)


@dataclass
class FixedView:
    """The part of `ClusterView` placement reads: the workers, and no prefix index."""

    workers: list[WorkerInfo] = field(default_factory=list)
    index_available: bool = False


def placement(decode_free: int, decodes: int = 1) -> RouterPlacement:
    view = FixedView([worker("prefill", 64)] + [worker("decode", decode_free, i) for i in range(decodes)])
    return RouterPlacement(view, make_policy("cache_aware"), BLOCK, RouterMetrics(), local_prefill_tokens=64)


def test_a_short_prompt_is_computed_on_a_decode_worker_with_room():
    route = asyncio.run(placement(decode_free=64).choose(PROMPT, set()))
    assert route.prefill is None and route.decode.worker_id == "decode-0"


def test_a_decode_worker_without_room_gets_the_prompt_through_a_prefill_worker():
    route = asyncio.run(placement(decode_free=2).choose(PROMPT, set()))
    assert route.prefill is not None and route.prefill.worker_id == "prefill-0"
    assert route.decode.worker_id == "decode-0"  # the runner's admission waits for its room


def test_room_counts_what_was_placed_since_the_last_report():
    p = placement(decode_free=4)  # room for one 3-block prompt, not two

    async def two():
        return await p.choose(PROMPT, set()), await p.choose(PROMPT, set())

    first, second = asyncio.run(two())
    assert first.prefill is None
    assert second.prefill is not None


def test_the_choices_of_one_prompt_go_to_one_decode_worker():
    # n > 1: the choices share a group. Without it, equal decode workers would take turns (each
    # placement is charged to the one chosen), and each would compute the prompt itself.
    async def place(group):
        p = placement(decode_free=64, decodes=2)
        return [await p.choose(PROMPT, set(), group) for _ in range(4)]

    grouped = asyncio.run(place("one-request"))
    assert all(r.prefill is None for r in grouped)  # computed on the decode worker
    assert len({r.decode.worker_id for r in grouped}) == 1
    ungrouped = asyncio.run(place(None))
    assert len({r.decode.worker_id for r in ungrouped}) == 2


def test_a_group_moves_on_when_its_decode_worker_is_full():
    p = placement(decode_free=4, decodes=2)  # room for one 3-block prompt on each

    async def place():
        return [await p.choose(PROMPT, set(), "g") for _ in range(2)]

    first, second = asyncio.run(place())
    assert first.decode.worker_id != second.decode.worker_id
