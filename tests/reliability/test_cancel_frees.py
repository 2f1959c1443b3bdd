"""Issue 26, items 6 and 7: cancelled requests are really freed, on real prefill and decode workers.

A client's cancel is not a transport failure: however many streams are cancelled, and at
whatever moment of the prefill -> decode handoff, the workers end up with the KV channel they
had, the file descriptors and threads they had, every KV block free and nothing running,
waiting or left to send. A transport channel that does fail is closed on both ends.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.roles.handoff import ChannelGenerations, WorkerRef
from pdserve.roles.kv_channel import Channel, TransferError
from pdserve.roles.worker import start_worker
from tests.prompts import prompts_of
from tests.reliability.cancel_storm import (
    KV_BLOCKS,
    MOMENTS,
    cancel_one,
    runner_over,
    storm,
    usage,
    wait_idle,
    warm_up,
)
from tests.roles.test_worker import metric

# The worker's default thread pool (asyncio.to_thread: transfers, channel set-up) grows lazily up
# to min(32, cpus + 4) threads and keeps them: that much growth is a pool warming up, not a leak.
# The leak this guards against grew by about one thread and three descriptors per cancel.
POOL_THREADS = min(32, (os.cpu_count() or 1) + 4)
FD_SLACK = 4
# Bound on the poll for "freed": it takes well under a second even on 2 loaded cores, while a
# decode left running without a reader would run for its MAX_TOKENS (many seconds).
SETTLE_S = 3.0


@pytest.fixture(scope="module")
def workers(ray_session, moe_checkpoint):
    """A prefill and a decode worker shared by this module's tests."""
    config = EngineConfig(
        model=str(moe_checkpoint), dtype="float32", block_size=4, num_threads=1, progress=False,
        kv_cache_blocks=KV_BLOCKS,
    )  # fmt: skip

    async def start():
        refs = []
        for role in ("prefill", "decode"):
            handle = start_worker(f"cancel-{role}", config, role)
            refs.append(WorkerRef(f"cancel-{role}", handle, await handle.ready.remote()))
        return refs

    prefill, decode = asyncio.run(start())
    yield prefill, decode
    for ref in (prefill, decode):
        ray_session.kill(ref.handle)


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=4, progress=False)


def transfer_counts(ray, ref: WorkerRef) -> dict[str, float]:
    text = ray.get(ref.handle.metrics_text.remote())
    return {
        "sends": metric(text, "pdserve_kv_transfer_seconds_count", direction="send"),
        "receives": metric(text, "pdserve_kv_transfer_seconds_count", direction="recv"),
        "send failures": metric(text, "pdserve_kv_transfer_failures_total", direction="send"),
        "receive failures": metric(text, "pdserve_kv_transfer_failures_total", direction="recv"),
        "channels": metric(text, "pdserve_kv_channels_open"),
    }


def settled_transfer_counts(ray, workers, timeout_s: float = SETTLE_S) -> list[dict[str, float]]:
    """Both workers' transfer counts once every send has been counted as received too (a
    transfer's two ends count it a moment apart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [transfer_counts(ray, r) for r in workers]
        if counts[0]["sends"] == counts[1]["receives"] or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def assert_cancelled_where_meant(moment: tuple, reads: list[int]) -> None:
    """Each stream was cancelled where `moment` says: after exactly its chunks when it has no
    delay (nothing can arrive in between), at or after them when it waits a little first."""
    _, after_chunks, delay_s, _ = moment
    if delay_s == 0:
        assert set(reads) == {after_chunks}, (moment, reads)
    else:
        assert min(reads) >= after_chunks, (moment, reads)


def assert_exact_after(runner, reference, seed: int) -> None:
    """A request after the cancels still streams exactly what one engine produces."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = prompts_of([14], seed=seed)[0]

    async def run():
        return [t async for c in runner.run(f"after-{seed}", prompt, params) for t in c.token_ids]

    assert asyncio.run(run()) == reference.generate([prompt], params)[0].outputs[0].token_ids


def test_cancelled_streams_leave_no_descriptors_threads_channels_or_blocks(ray_session, workers, reference):
    prefill, decode = workers
    runner = runner_over(prefill, decode)

    async def warm():
        await warm_up(runner)
        return (await wait_idle([prefill, decode], SETTLE_S))[1]

    async def run():
        counts = await storm(runner, 160, seed=1)
        settle_s, after = await wait_idle([prefill, decode], SETTLE_S)
        return counts, settle_s, after

    before = asyncio.run(warm())
    before_transfers = [transfer_counts(ray_session, r) for r in workers]
    counts, settle_s, after = asyncio.run(run())
    # Every moment of the handoff was reached, as many times as the others.
    assert {len(reads) for reads in counts.values()} == {20}
    for moment in MOMENTS:
        assert_cancelled_where_meant(moment, counts[moment[0]])
    assert all(u.idle for u in after), (after, settle_s)
    for b, a in zip(before, after):
        assert a.open_fds <= b.open_fds + FD_SLACK, (before, after)
        assert a.threads <= b.threads + POOL_THREADS, (before, after)
    after_transfers = settled_transfer_counts(ray_session, workers)
    for b, a in zip(before_transfers, after_transfers):
        # No new channel was built for a cancel, and no transfer failed or was left half-done.
        assert a["channels"] == b["channels"] == 1, (b, a)
        assert a["send failures"] == b["send failures"] and a["receive failures"] == b["receive failures"]
    sends = after_transfers[0]["sends"] - before_transfers[0]["sends"]
    receives = after_transfers[1]["receives"] - before_transfers[1]["receives"]
    assert sends == receives > 0  # each transfer that started ended on both sides
    assert_exact_after(runner, reference, seed=2)


@pytest.mark.parametrize("moment", MOMENTS, ids=[m[0].replace(" ", "-") for m in MOMENTS])
def test_a_cancel_at_any_moment_of_the_handoff_frees_both_workers_at_once(ray_session, workers, moment):
    prefill, decode = workers
    runner = runner_over(prefill, decode)
    prompts = prompts_of([9, 17, 26, 12, 21, 30], seed=3)

    async def run():
        reads = await asyncio.gather(
            *(cancel_one(runner, f"moment-{moment[0]}-{i}", p, moment) for i, p in enumerate(prompts))
        )
        return reads, await wait_idle([prefill, decode], SETTLE_S)

    reads, (settle_s, after) = asyncio.run(run())
    assert_cancelled_where_meant(moment, reads)
    # Nothing decodes without a reader, nothing waits to be sent, every block is back.
    assert all(u.idle for u in after), (after, settle_s)


def test_a_failed_channel_is_closed_on_both_workers_and_the_next_generation_works(
    ray_session, workers, reference
):
    prefill, decode = workers
    runner = runner_over(prefill, decode)
    channels = runner.channels
    assert_exact_after(runner, reference, seed=4)  # generation 0 is open on both ends
    before = asyncio.run(_usages(workers))

    async def fail_and_retire(generation_of: ChannelGenerations) -> Channel:
        channel = generation_of.channel(prefill, decode)
        await generation_of.failed(channel, prefill, decode)
        return channel

    retired = asyncio.run(fail_and_retire(channels))
    assert channels.channel(prefill, decode).generation != retired.generation
    assert [transfer_counts(ray_session, r)["channels"] for r in workers] == [0, 0]
    # A closed channel is never built again: a late transfer on it fails at once, on either end.
    assert ray_session.get(decode.handle.reserve.remote("late", 8))
    result = ray_session.get(
        prefill.handle.prefill.remote("late", prompts_of([8])[0], SamplingParams(max_tokens=4))
    )
    with pytest.raises(TransferError, match="closed"):
        ray_session.get(prefill.handle.send_kv.remote("late", retired, 30.0))
    assert ray_session.get(decode.handle.abort.remote("late"))
    assert result.handoff is not None
    # The pair moved on: the next request builds generation 1 and streams exactly.
    assert_exact_after(runner, reference, seed=5)
    assert [transfer_counts(ray_session, r)["channels"] for r in workers] == [1, 1]
    after = asyncio.run(_usages(workers))
    for b, a in zip(before, after):
        assert a.open_fds <= b.open_fds + FD_SLACK and a.threads <= b.threads + POOL_THREADS


async def _usages(refs):
    return await asyncio.gather(*(usage(r) for r in refs))
