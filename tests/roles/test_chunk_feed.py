"""The chunk feed's router end and the router's send queue, each isolated with a scripted feed.

The real path (Ray actors, engines, the feed across processes) is in test_worker.py and the
router/cluster suites; here, what a reader that falls behind gets: every token once, in order,
a move or an error never folded into tokens.
"""

from __future__ import annotations

import asyncio

import pytest

from pdserve.roles.chunk_feed import ChunkFeeds
from pdserve.roles.messages import Handoff, TokenChunk
from pdserve.router.server import _DONE, ChunkQueue


def chunk(rid: str, tokens: list[int], finished: bool = False, moved: Handoff | None = None) -> TokenChunk:
    text = "".join(f"<{t}>" for t in tokens)
    return TokenChunk(rid, tokens, text, finished, "length" if finished else None, None, 5, 2, moved=moved)


HANDOFF = Handoff("r", [1, 2], [3], None, 3, 0, [], 1)  # type: ignore[arg-type]


class ScriptedLink:
    """A worker's feed link as the router sees it: batches, released one by one by the test."""

    def __init__(self) -> None:
        self.batches_sent: asyncio.Queue[list[TokenChunk] | Exception] = asyncio.Queue()
        self.closed = False

    async def start(self, request_id, prompt_token_ids, params):
        raise AssertionError("these tests start nothing")

    async def batches(self):
        while True:
            batch = await self.batches_sent.get()
            if isinstance(batch, Exception):
                raise batch
            yield batch

    def close(self) -> None:
        self.closed = True


class Handle:
    """A worker actor whose link the test scripts."""

    def __init__(self) -> None:
        self.link = ScriptedLink()


async def open_scripted(handle: Handle, subscriber: str) -> ScriptedLink:
    return handle.link


def scripted_feeds() -> ChunkFeeds:
    """The router's feeds, each worker's link scripted by the test."""
    return ChunkFeeds(open_link=open_scripted)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_reader_behind_gets_the_chunks_as_one_and_a_move_on_its_own():
    async def run():
        handle = Handle()
        feed = scripted_feeds().of("w", handle)
        feed.open("r")
        feed.open("other")
        for batch in (
            [chunk("r", [1]), chunk("other", [9])],
            [chunk("r", [2, 3])],
            [chunk("r", [], moved=HANDOFF)],
        ):
            handle.link.batches_sent.put_nowait(batch)
        await settle()  # all three batches arrive before the reader reads
        got = [c async for c in feed.chunks("r")]
        await feed.stop()
        return got

    got = asyncio.run(run())
    assert [c.token_ids for c in got] == [[1, 2, 3], []]
    assert got[0].text == "<1><2><3>" and got[0].num_cached_tokens == 2 and got[0].moved is None
    assert got[1].moved is HANDOFF


def test_the_feeds_error_ends_each_reader_after_its_tokens():
    async def run():
        handle = Handle()
        feed = scripted_feeds().of("w", handle)
        feed.open("r")
        handle.link.batches_sent.put_nowait([chunk("r", [4])])
        handle.link.batches_sent.put_nowait(RuntimeError("worker died"))
        await settle()
        got = []
        with pytest.raises(RuntimeError, match="worker died"):
            async for c in feed.chunks("r"):
                got.append(c)
        return got, feed.closed

    got, closed = asyncio.run(run())
    assert [c.token_ids for c in got] == [[4]]
    assert closed


def test_a_closed_feed_is_replaced_on_next_use():
    async def run():
        feeds, handle = scripted_feeds(), Handle()
        first = feeds.of("w", handle)
        handle.link.batches_sent.put_nowait(RuntimeError("gone"))
        await settle()
        second = feeds.of("w", handle)
        await second.stop()
        return first, second

    first, second = asyncio.run(run())
    assert first.closed and second is not first and second.subscriber != first.subscriber


def test_the_send_queue_merges_while_behind_and_keeps_the_end_apart():
    async def run():
        queue = ChunkQueue()
        for c in (chunk("r", [1]), chunk("r", [2]), chunk("r", [3], finished=True)):
            queue.put_nowait(c)
        queue.put_nowait(_DONE)
        return [await queue.get() for _ in range(2)]

    merged, done = asyncio.run(run())
    assert merged.token_ids == [1, 2, 3] and merged.finished and merged.finish_reason == "length"
    assert done is _DONE
