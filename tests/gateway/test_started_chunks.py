"""`StartedChunks`: a stream's request leaves before the response's first byte, and is ended
whether or not the response ever reads it. A fake chunk source isolates the unit; the stack's
streaming tests (`test_app.py`, `test_responses_api.py`) run it over real HTTP and Ray."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from pdserve.gateway.serving import Generation, OpenAIServing, StartedChunks


class Source:
    """What `timed_chunks` is to `StartedChunks`: records when it was asked and whether it ended."""

    def __init__(
        self, items: list[object], first_waits: asyncio.Event | None = None, fail: Exception | None = None
    ):
        self.items, self.first_waits, self.fail = items, first_waits, fail
        self.asked: list[int] = []  # how many chunks had been asked for, at each ask
        self.closed = False

    async def chunks(self):
        try:
            for i, item in enumerate(self.items):
                self.asked.append(i)
                if i == 0 and self.first_waits is not None:
                    await self.first_waits.wait()  # the worker has not answered yet
                yield 0, item
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed = True


def test_the_first_chunk_is_asked_for_before_anything_is_read_then_all_come_in_order():
    async def run():
        source = Source(["a", "b", "c"])
        started = await StartedChunks.start(source.chunks())
        asked_before_reading = list(source.asked)
        got = [item async for item in started]
        await started.aclose()
        return asked_before_reading, got, source.closed

    asked, got, closed = asyncio.run(run())
    assert asked == [0]  # the request was on its way before the response read anything
    assert got == [(0, "a"), (0, "b"), (0, "c")]
    assert closed


def test_an_error_of_the_stream_reaches_its_reader():
    async def run():
        source = Source(["a"], fail=RuntimeError("the router refused"))
        started = await StartedChunks.start(source.chunks())
        got = []
        with pytest.raises(RuntimeError, match="the router refused"):
            async for item in started:
                got.append(item)
        return got

    assert asyncio.run(run()) == [(0, "a")]


def test_closing_an_unread_stream_stops_its_waiting_request():
    async def run():
        source = Source(["a", "b"], first_waits=asyncio.Event())
        started = await StartedChunks.start(source.chunks())
        waiting = list(source.asked)
        await started.aclose()
        await started.aclose()  # twice is harmless (the response's own close and the background's)
        return waiting, source.closed

    waiting, closed = asyncio.run(run())
    assert waiting == [0] and closed


def test_a_client_gone_before_the_stream_began_ends_its_request():
    """The response's background closes the chunks even when its body was never iterated: here
    the status line is still being sent when the client's disconnect arrives."""

    async def run():
        source = Source(["a", "b"], first_waits=asyncio.Event())
        started = await StartedChunks.start(source.chunks())
        gen = Generation("req-gone", None, 3, [])  # type: ignore[arg-type]
        iterated = []

        async def events():
            iterated.append(True)
            async for _ in started:
                yield b"data: x\n\n"

        response = OpenAIServing.event_stream(gen, events(), started)

        async def receive() -> Message:
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await asyncio.Event().wait()  # a client that never takes the status line

        await response({"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST"}, receive, send)
        return iterated, source.closed

    iterated, closed = asyncio.run(run())
    assert not iterated and closed


def test_a_reader_cancelled_while_the_first_chunk_is_on_its_way_can_close_at_once():
    """A client gone after its stream began but before the first token: the reader is cancelled
    while it waits for the first chunk, and the response's background closes right after."""

    async def run():
        source = Source(["a", "b"], first_waits=asyncio.Event())
        started = await StartedChunks.start(source.chunks())

        async def read():
            async for _ in started:
                pass

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.01)  # the reader waits for the first chunk
        reader.cancel()
        await asyncio.wait([reader])
        await started.aclose()  # at once: the fetch it waited on may not have finished unwinding
        return source.closed

    assert asyncio.run(run())
