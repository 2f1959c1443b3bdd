"""The disaggregated path of one request: reserve on decode, prefill, move the KV, stream.

Control messages are Ray calls; the KV itself goes worker to worker over the transport,
never through this coordinator. The router drives requests through `generate_disaggregated`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from pdserve.engine import SamplingParams
from pdserve.roles.kv_transfer import Channel, Endpoint
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
        await release(decode, request_id)
        raise
    yield result.first
    if result.handoff is None:
        await release(decode, request_id)  # returns the reservation
        return
    if after_prefill is not None:
        await after_prefill(request_id)
    channel = channels.channel(prefill, decode)
    sent = prefill.handle.send_kv.remote(request_id, channel, transfer_timeout_s)
    stream = decode.handle.decode.remote(request_id, result.handoff, channel, transfer_timeout_s)
    try:
        async for ref in stream:
            yield await ref
        await sent
    except BaseException:
        channels.failed(channel)
        await release(prefill, request_id)
        await release(decode, request_id)
        raise


async def release(worker: WorkerRef, request_id: str) -> None:
    """Frees whatever `worker` holds for the request; a dead worker holds nothing any more."""
    with contextlib.suppress(Exception):
        await worker.handle.abort.remote(request_id)
