"""The disaggregated path of one request: reserve on decode, prefill, move the KV, stream.

Control messages are Ray calls; the KV itself goes worker to worker over the transport,
never through this coordinator. The router drives requests through `generate_disaggregated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from pdserve.engine import SamplingParams
from pdserve.roles.kv_channel import Channel, Endpoint
from pdserve.roles.messages import TokenChunk


class NoRoomError(RuntimeError):
    """The decode worker has no free KV blocks for the request right now."""


@dataclass
class WorkerRef:
    """A worker actor and the endpoint its KV transport listens on."""

    worker_id: str
    handle: object  # ray.actor.ActorHandle of a Worker
    endpoint: Endpoint


class ChannelGenerations:
    """Hands out a fresh channel generation per (sender, receiver) after each failed transfer."""

    def __init__(self) -> None:
        self._generation: dict[tuple[str, str], int] = {}
        self._counter = itertools.count(1)

    def channel(self, sender: WorkerRef, receiver: WorkerRef) -> Channel:
        key = (sender.worker_id, receiver.worker_id)
        return Channel(sender.endpoint, receiver.endpoint, self._generation.get(key, 0))

    def failed(self, channel: Channel) -> None:
        self._generation[(channel.sender.worker_id, channel.receiver.worker_id)] = next(self._counter)


async def generate_disaggregated(
    prefill: WorkerRef,
    decode: WorkerRef,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    channels: ChannelGenerations,
    transfer_timeout_s: float = 30.0,
    after_prefill: Callable[[str], Awaitable[None]] | None = None,
) -> AsyncIterator[TokenChunk]:
    """Streams a request prefilled on `prefill` and decoded on `decode`.

    Raises NoRoomError before any work when `decode` cannot reserve the blocks, and the
    transfer's error (after releasing both sides) when the KV does not arrive.
    `after_prefill(request_id)` runs between the prefill and the transfer (an observer hook;
    the fault tests use it to kill a worker at exactly that moment).
    """
    if not await decode.handle.reserve.remote(request_id, len(prompt_token_ids)):
        raise NoRoomError(f"decode worker {decode.worker_id} has no room for request {request_id}")
    try:
        result = await prefill.handle.prefill.remote(request_id, prompt_token_ids, params)
    except BaseException:
        await release(request_id, decode, prefill)
        raise
    if result.handoff is None:  # finished on its first token: return the reservation first
        await release(request_id, decode)
        yield result.first
        return
    yield result.first
    if after_prefill is not None:
        await after_prefill(request_id)
    channel = channels.channel(prefill, decode)
    sent = prefill.handle.send_kv.remote(request_id, channel, transfer_timeout_s)
    stream = decode.handle.decode.remote(request_id, result.handoff, channel, transfer_timeout_s)
    finished = False
    try:
        async for ref in stream:
            chunk = await ref
            finished = chunk.finished
            yield chunk
        await sent
    except (Exception, asyncio.CancelledError):
        channels.failed(channel)
        await release(request_id, prefill, decode)
        raise
    except GeneratorExit:
        # The consumer stopped reading; after the last chunk there is nothing left to free.
        if not finished:
            for worker in (prefill, decode):
                worker.handle.abort.remote(request_id)
        raise


async def release(request_id: str, *workers: WorkerRef) -> None:
    """Frees whatever the workers hold for the request; a dead worker holds nothing any more.

    Every abort is submitted before the first is awaited, so a second cancellation arriving
    while we wait (a client hanging up during cleanup) cannot keep one of them from happening.
    """
    refs = [w.handle.abort.remote(request_id) for w in workers]
    for ref in refs:
        with contextlib.suppress(Exception):
            await ref
