"""The feed link: a router's own TCP connection to a worker, for what every token crosses.

A router starts requests on a worker (`start`) and receives the chunks of all its requests there
(batches, one per engine step) over one connection per worker, instead of a Ray call per start
and a Ray streaming item per batch. On this 2-core machine a Ray actor call took 1.4 ms round
trip (p50) against 0.04 ms for a loopback socket, and a request's first token crossed two such
hops (docs/DECISIONS.md, 2026-12-06). Ray stays for everything else (control, load, KV moves).

The worker listens on its KV host (loopback, or its node's address in a multi-node cluster) and
gives its address and a random token only through a Ray call (`Worker.feed_address`): a peer
must send the token first, so only those who can call the actor (who can already run code on it)
can connect. Frames are a 4-byte length and a pickle (`TokenChunk`, `SamplingParams`, errors:
the same objects Ray would pickle).

The link also carries the worker's prefix-cache changes to the router's index (`CacheEvents`: a
full snapshot first, then what changed), so the router never polls workers for them; a router
whose index lost its entries asks for a fresh snapshot (`Resync`).

Torch-free: the router imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import pickle
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A start frame carries a prompt (~5 bytes a token), a batch one step's chunks: far below this.
MAX_FRAME_BYTES = 256 << 20
_HEADER = 4


class LinkClosed(ConnectionError):
    """The link to a worker ended (the worker died or closed it, or the router is stopping)."""


@dataclass(frozen=True)
class FeedAddress:
    """Where a worker's feed link listens, and the token a router must open with."""

    host: str
    port: int
    token: bytes


@dataclass(frozen=True)
class StartCall:
    """A router's request to start one request on the worker (`Worker.generate`)."""

    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # engine.SamplingParams (pickled; this module stays torch-free)


@dataclass(frozen=True)
class Reply:
    """The worker's answer to a `StartCall`: `value` (a `Started`) or `error`."""

    call_id: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Batch:
    """Chunks the worker's engine made for this router since the last batch."""

    chunks: list


@dataclass(frozen=True)
class CacheEvents:
    """The worker's prefix-cache changes since the last `CacheEvents` on this link, or a snapshot
    (a `roles.cache_events.CacheEventBatch`, pickled: this module stays torch-free)."""

    batch: Any


@dataclass(frozen=True)
class Resync:
    """A router's request for a full snapshot of the worker's prefix cache (its index lost entries)."""


async def write_frame(writer: asyncio.StreamWriter, *objs: object) -> None:
    """Sends each of `objs` as a frame, all in one write (one system call for a step's batch and
    its cache events)."""
    parts = []
    for obj in objs:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        parts += (len(data).to_bytes(_HEADER, "big"), data)
    writer.write(b"".join(parts))
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> object:
    """The next frame's object; `LinkClosed` at the end of the stream."""
    try:
        size = int.from_bytes(await reader.readexactly(_HEADER), "big")
        if size > MAX_FRAME_BYTES:
            raise LinkClosed(f"a feed frame of {size} bytes is over the limit of {MAX_FRAME_BYTES}")
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        if isinstance(e, LinkClosed):
            raise
        raise LinkClosed("the feed link closed") from e


def _sendable(frame: Batch | CacheEvents | Reply) -> Batch | CacheEvents | Reply:
    if isinstance(frame, Reply) and frame.error is not None:
        return Reply(frame.call_id, error=_picklable(frame.error))
    return frame


def _picklable(error: BaseException) -> BaseException:
    """`error` if it survives a round trip through pickle, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------- worker side


Serve = Callable[[str, "WorkerLink"], Awaitable[None]]


class WorkerLink:
    """The worker's end of one router's link: the router's start calls, and a way to answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def calls(self) -> AsyncIterator[StartCall | Resync]:
        """The router's start calls and resync requests, until it closes the link."""
        while True:
            call = await read_frame(self._reader)
            if not isinstance(call, (StartCall, Resync)):
                raise LinkClosed(f"unexpected frame {type(call).__name__} on a feed link")
            yield call

    async def send(self, *frames: Batch | CacheEvents | Reply) -> None:
        """Sends the frames in order, in one write."""
        await write_frame(self._writer, *(_sendable(frame) for frame in frames))


class FeedServer:
    """A worker's listener for routers' links; `serve(subscriber, link)` runs each one."""

    def __init__(self, host: str, serve: Serve) -> None:
        self._host, self._serve = host, serve
        self._token = secrets.token_bytes(16)
        self._server: asyncio.Server | None = None
        self.address: FeedAddress | None = None

    async def start(self) -> FeedAddress:
        if self.address is None:
            self._server = await asyncio.start_server(self._connected, self._host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self.address = FeedAddress(self._host, port, self._token)
        return self.address

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _no_delay(writer)
        try:
            hello = await read_frame(reader)
            if not (isinstance(hello, tuple) and len(hello) == 2 and isinstance(hello[0], bytes)
                    and hmac.compare_digest(hello[0], self._token)):  # fmt: skip
                log.warning("feed link from %s refused: wrong token", writer.get_extra_info("peername"))
                return
            await self._serve(str(hello[1]), WorkerLink(reader, writer))
        except LinkClosed:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


# ---------------------------------------------------------------------------- router side


class RouterLink:
    """The router's end of one worker's link: `start` requests, `batches` of their chunks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()

    async def start(self, request_id: str, prompt_token_ids: list[int], params: Any) -> Any:
        """Starts the request on the worker; its `Started` (or the worker's error, raised)."""
        call_id = next(self._ids)
        future = self._pending[call_id] = asyncio.get_running_loop().create_future()
        try:
            await write_frame(self._writer, StartCall(call_id, request_id, prompt_token_ids, params))
            return await future
        finally:
            self._pending.pop(call_id, None)

    async def resync(self) -> None:
        """Asks the worker for a full snapshot of its prefix cache (it comes as `CacheEvents`)."""
        await write_frame(self._writer, Resync())

    async def batches(self) -> AsyncIterator[list | CacheEvents]:
        """The worker's batches and cache events (answering start calls on the way) until the
        link ends."""
        try:
            while True:
                frame = await read_frame(self._reader)
                if isinstance(frame, Batch):
                    yield frame.chunks
                elif isinstance(frame, CacheEvents):
                    yield frame
                elif isinstance(frame, Reply):
                    future = self._pending.get(frame.call_id)
                    if future is not None and not future.done():
                        if frame.error is not None:
                            future.set_exception(frame.error)
                        else:
                            future.set_result(frame.value)
        except BaseException as e:
            error = e if isinstance(e, LinkClosed) else LinkClosed(f"the feed link ended: {e!r}")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            raise

    def close(self) -> None:
        self._writer.close()


async def connect(address: FeedAddress, subscriber: str) -> RouterLink:
    """Opens a link to the worker at `address` as `subscriber`."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    _no_delay(writer)
    await write_frame(writer, (address.token, subscriber))
    return RouterLink(reader, writer)


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # Small frames, latency-bound: never wait for Nagle's coalescing.
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
