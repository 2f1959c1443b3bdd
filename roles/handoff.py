"""The disaggregated path of one request: reserve on decode, prefill, move the KV, stream.

Control messages are Ray calls; the KV itself goes worker to worker over the transport,
never through this coordinator; the tokens come on each worker's chunk feed (`ChunkFeeds`).
The router drives requests through `generate_disaggregated` and `generate_colocated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from pdserve.engine import SamplingParams
from pdserve.roles.chunk_feed import ChunkFeed, ChunkFeeds
from pdserve.roles.errors import MoveFailed
from pdserve.roles.kv_channel import Channel, Endpoint, TransferError
from pdserve.roles.messages import Handoff, Started, TokenChunk

# Picks a decode worker with room for `num_tokens` tokens of KV, avoiding some ids (or None).
MoveTarget = Callable[[int, set[str]], Awaitable["WorkerRef | None"]]


class NoRoomError(RuntimeError):
    """The decode worker has no free KV blocks for the request right now."""


@dataclass
class WorkerRef:
    """A worker actor and the endpoint its KV transport listens on."""

    worker_id: str
    handle: object  # ray.actor.ActorHandle of a Worker
    endpoint: Endpoint


class ChannelGenerations:
    """The router's KV channels: one per (sender, receiver), a new generation after each failure.

    A failed transfer may leave either end's communicator half-way through a message, so the
    pair moves to the next generation and both ends close the failed one (`failed`). A client's
    cancel is not a failure and changes nothing here; a send left behind by a cancelled or
    failed request is followed to its end (`watch`), so a failure it meets still retires the
    channel, and its error is read (Ray logs errors nobody reads).
    """

    def __init__(self) -> None:
        self._generation: dict[tuple[str, str], int] = {}
        self._counter = itertools.count(1)
        self._watched: set[asyncio.Task] = set()

    def channel(self, sender: WorkerRef, receiver: WorkerRef) -> Channel:
        """The channel that transfers from `sender` to `receiver` use now."""
        key = (sender.worker_id, receiver.worker_id)
        return Channel(sender.endpoint, receiver.endpoint, self._generation.get(key, 0))

    async def failed(self, channel: Channel, sender: WorkerRef, receiver: WorkerRef) -> None:
        """A transfer on `channel` failed: later ones get a new generation, and both ends close it."""
        key = (channel.sender.worker_id, channel.receiver.worker_id)
        if self._generation.get(key, 0) != channel.generation:
            return  # an earlier failure on it retired it already
        self._generation[key] = next(self._counter)
        refs = [w.handle.close_channel.remote(channel) for w in (sender, receiver)]
        for ref in refs:
            with contextlib.suppress(Exception):  # a dead end has nothing left to close
                await ref

    def watch(self, sent, channel: Channel, sender: WorkerRef, receiver: WorkerRef) -> None:
        """Follows a send (`Worker.send_kv`'s ref) whose request no longer waits for it."""

        async def settle() -> None:
            try:
                await sent
            except TransferError:
                await self.failed(channel, sender, receiver)
            except Exception:
                pass  # the sender died: the controller closes every channel with it

        task = asyncio.get_running_loop().create_task(settle())
        self._watched.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._watched.discard)


async def generate_disaggregated(
    prefill: WorkerRef,
    decode: WorkerRef,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    channels: ChannelGenerations,
    feeds: ChunkFeeds,
    transfer_timeout_s: float = 30.0,
    after_prefill: Callable[[str], Awaitable[None]] | None = None,
    move_target: MoveTarget | None = None,
) -> AsyncIterator[TokenChunk]:
    """Streams a request prefilled on `prefill` and decoded on `decode`, and on any decode worker
    it is moved to later (`move_target(num_tokens, avoid)` picks one with room, or None).

    Raises NoRoomError before any work when `decode` cannot reserve the blocks, and the
    transfer's error (after releasing both sides) when the KV does not arrive.
    `after_prefill(request_id)` runs between the prefill and the transfer (an observer hook;
    the fault tests use it to kill a worker at exactly that moment).

    Cancelled or closed at any moment, it leaves nothing behind: until the transfer starts
    both workers are told to abort the request; once `send_kv` and `decode` are called only
    the decode worker is, because `send_kv` then owns the prefill side's copy and always sends
    it (a receive waiting for KV that never comes would hold its channel until the timeout),
    and the decode worker drops KV that arrives for an aborted request.
    """
    try:
        reserved = await decode.handle.reserve.remote(request_id, len(prompt_token_ids))
    except BaseException:
        await release(request_id, decode)  # a reservation may still land after we stop waiting
        raise
    if not reserved:
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
    try:
        yield result.first
        if after_prefill is not None:
            await after_prefill(request_id)
    except BaseException:  # the reader left before the transfer began: both sides hold it
        await release(request_id, decode, prefill)
        raise
    async with aclosing(
        _transfer_and_stream(
            prefill, decode, request_id, result.handoff, channels, feeds, transfer_timeout_s, move_target
        )
    ) as chunks:
        async for chunk in chunks:
            yield chunk


async def generate_colocated(
    worker: WorkerRef,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    channels: ChannelGenerations,
    feeds: ChunkFeeds,
    transfer_timeout_s: float = 30.0,
    move_target: MoveTarget | None = None,
) -> AsyncIterator[TokenChunk]:
    """Streams a request computed whole on `worker` (a `both` worker, or a decode worker that
    computes a short prompt itself), and on any decode worker it is moved to later.

    Cancelled or closed before the end, it tells the worker to free the request."""
    finished, moved = False, None
    feed = feeds.of(worker.worker_id, worker.handle)
    feed.open(request_id)
    try:
        started = await feed.start(request_id, prompt_token_ids, params)
        async for chunk in _chunks(feed, request_id, started):
            if chunk.moved is not None:  # the worker's last chunk: it handed the request on
                moved = chunk.moved
                break
            finished = chunk.finished
            yield chunk
    finally:
        feed.close(request_id)
        if not finished and moved is None:
            await release(request_id, worker)
    if moved is not None:
        async with aclosing(
            _move(worker, request_id, moved, channels, feeds, transfer_timeout_s, move_target)
        ) as chunks:
            async for chunk in chunks:
                yield chunk


async def _chunks(feed: ChunkFeed, request_id: str, started: Started) -> AsyncIterator[TokenChunk]:
    """The request's chunks on `feed` once a worker answered `started` (none when it did not
    start; only the move when it moved on at once)."""
    if started.moved is not None:
        yield TokenChunk(request_id, [], "", False, None, None, 0, 0, moved=started.moved)
    elif started.running:
        async for chunk in feed.chunks(request_id):
            yield chunk


async def _transfer_and_stream(
    sender: WorkerRef,
    receiver: WorkerRef,
    request_id: str,
    handoff: Handoff,
    channels: ChannelGenerations,
    feeds: ChunkFeeds,
    transfer_timeout_s: float,
    move_target: MoveTarget | None,
) -> AsyncIterator[TokenChunk]:
    """Ships the request's KV from `sender` to `receiver` (which reserved room for it) and streams
    the receiver's chunks; follows the request on when the receiver moves it (`TokenChunk.moved`)."""
    channel = channels.channel(sender, receiver)
    feed = feeds.of(receiver.worker_id, receiver.handle)
    feed.open(request_id)
    sent = sender.handle.send_kv.remote(request_id, channel, transfer_timeout_s)
    started = receiver.handle.decode.remote(request_id, handoff, channel, transfer_timeout_s, feed.subscriber)
    finished, moved = False, None
    try:
        async for chunk in _chunks(feed, request_id, await started):
            if chunk.moved is not None:  # the receiver's last chunk: it handed the request on
                moved = chunk.moved
                break
            finished = chunk.finished
            yield chunk
        await sent
    except BaseException as e:
        channels.watch(sent, channel, sender, receiver)
        if isinstance(e, TransferError):  # the receiving side's receive failed
            await channels.failed(channel, sender, receiver)
        if not finished:
            await release(request_id, receiver)
        raise
    finally:
        feed.close(request_id)
    if moved is not None:
        async with aclosing(
            _move(receiver, request_id, moved, channels, feeds, transfer_timeout_s, move_target)
        ) as chunks:
            async for chunk in chunks:
                yield chunk


async def _move(
    source: WorkerRef,
    request_id: str,
    handoff: Handoff,
    channels: ChannelGenerations,
    feeds: ChunkFeeds,
    transfer_timeout_s: float,
    move_target: MoveTarget | None,
) -> AsyncIterator[TokenChunk]:
    """Continues a request its decode worker moved off (live migration) on another decode worker;
    MoveFailed (the source dropping its copy) when no worker can take it now."""
    target = await move_target(handoff.num_computed_tokens, {source.worker_id}) if move_target else None
    try:
        reserved = target is not None and await target.handle.reserve.remote(
            request_id, handoff.num_computed_tokens
        )
    except BaseException:
        await release(request_id, source, *([target] if target is not None else []))
        raise
    if not reserved:
        await release(request_id, source)
        raise MoveFailed(
            f"no decode worker could take request {request_id} from {source.worker_id}", source.worker_id
        )
    assert target is not None
    async with aclosing(
        _transfer_and_stream(
            source, target, request_id, handoff, channels, feeds, transfer_timeout_s, move_target
        )
    ) as chunks:
        async for chunk in chunks:
            yield chunk


async def release(request_id: str, *workers: WorkerRef) -> None:
    """Frees whatever the workers hold for the request; a dead worker holds nothing any more.

    Every abort is submitted before the first is awaited, so a second cancellation arriving
    while we wait (a client hanging up during cleanup) cannot keep one of them from happening.
    """
    refs = [w.handle.abort.remote(request_id) for w in workers]
    for ref in refs:
        with contextlib.suppress(Exception):
            await ref
