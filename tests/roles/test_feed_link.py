"""The feed link on its own (no Ray, no engine): a worker-side server with a scripted `serve`.

What the router relies on: only a peer with the token gets in, start calls are answered (errors
with their type and fields, as Ray would deliver them), batches arrive in order, and a link that
ends fails the calls still waiting instead of hanging them.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pdserve.roles.errors import RoleError
from pdserve.roles.feed_link import Batch, FeedServer, LinkClosed, Reply, connect, read_frame, write_frame
from pdserve.roles.messages import Started


def test_start_calls_are_answered_and_batches_arrive_in_order():
    async def serve(subscriber, link):
        async for call in link.calls():
            if call.request_id == "refused":
                await link.send(Reply(call.call_id, error=RoleError("switching role", "w3")))
                continue
            await link.send(Batch([f"{subscriber}:{call.request_id}:{call.prompt_token_ids}"]))
            await link.send(Reply(call.call_id, Started(running=True)))

    async def run():
        server = FeedServer("127.0.0.1", serve)
        link = await connect(await server.start(), "router-1")
        got: list[str] = []

        async def read():
            async for batch in link.batches():
                got.extend(batch)

        reader = asyncio.get_running_loop().create_task(read())
        started = [await link.start(f"r{i}", [i, i + 1], None) for i in range(3)]
        with pytest.raises(RoleError) as refused:
            await link.start("refused", [1], None)
        link.close()
        with pytest.raises(LinkClosed):
            await reader
        server.close()
        return started, got, refused.value

    started, got, refused = asyncio.run(run())
    assert started == [Started(running=True)] * 3
    assert got == ["router-1:r0:[0, 1]", "router-1:r1:[1, 2]", "router-1:r2:[2, 3]"]
    assert refused.worker_id == "w3"  # the router goes around this worker


def test_a_peer_without_the_token_is_refused():
    served: list[str] = []

    async def serve(subscriber, link):
        served.append(subscriber)

    async def run():
        server = FeedServer("127.0.0.1", serve)
        address = await server.start()
        forged = dataclasses.replace(address, token=b"x" * len(address.token))
        reader, writer = await asyncio.open_connection(address.host, address.port)
        await write_frame(writer, (forged.token, "intruder"))
        with pytest.raises(LinkClosed):
            await read_frame(reader)  # the server closed the connection
        writer.close()
        server.close()

    asyncio.run(run())
    assert served == []


def test_a_link_that_ends_fails_the_calls_waiting_on_it():
    async def serve(subscriber, link):
        async for _call in link.calls():
            return  # the worker goes away without answering

    async def run():
        server = FeedServer("127.0.0.1", serve)
        link = await connect(await server.start(), "router-1")

        async def read():
            async for _ in link.batches():
                pass

        reader = asyncio.get_running_loop().create_task(read())
        with pytest.raises(LinkClosed):
            await link.start("r", [1], None)
        with pytest.raises(LinkClosed):
            await reader
        server.close()

    asyncio.run(run())
