"""The chunk feed: how a worker's tokens reach a router, one message per engine step.

A router opens one link per worker (`roles.feed_link`: a TCP connection, not Ray calls) and
keeps it open. It starts its requests on the worker over the link (`ChunkFeed.start` ->
`Worker.generate`, which returns once the request runs); decode requests that arrive with KV
start by a Ray call (`Worker.decode`) naming the feed. The worker collects every chunk its engine
step made for that router's requests into one batch (a `ChunkOutbox`), and the link carries
batches; the router deals each batch out to per-request queues (`ChunkFeed`).

Why: a Ray streaming item per token per request cost more CPU than the engine's step on the
demo model (docs/DECISIONS.md, 2026-12-05); a batch per step costs one message for all requests,
and the link's message costs a fraction of a Ray call's latency (2026-12-06).

Torch-free: the router imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from pdserve.engine.outputs import RequestDelta
from pdserve.roles import feed_link
from pdserve.roles.messages import Started, TokenChunk

log = logging.getLogger(__name__)


class FeedClosed(ConnectionError):
    """The worker's feed ended (the worker died, or the router is stopping): its requests fail."""


# ---------------------------------------------------------------------------- worker side


class ChunkOutbox:
    """One subscriber's chunks on a worker, waiting for its feed to take them as one batch."""

    def __init__(self) -> None:
        self._pending: list[TokenChunk] = []
        self._ready = asyncio.Event()
        self.requests: set[str] = set()  # requests whose chunks go here and have not ended

    def sink(self, request_id: str, on_end: Callable[[str], None]) -> RequestSink:
        """Where the engine loop puts one request's deltas (and the worker its markers)."""
        self.requests.add(request_id)
        return RequestSink(self, request_id, on_end)

    def put(self, chunk: TokenChunk) -> None:
        self._pending.append(chunk)
        self._ready.set()

    async def take(self, timeout_s: float | None = None) -> list[TokenChunk]:
        """Every chunk put since the last take (waits for at least one, or `timeout_s`: then [])."""
        # A timer that sets the event, not `wait_for`: that would make a task per engine step.
        timer = (
            None if timeout_s is None else asyncio.get_running_loop().call_later(timeout_s, self._ready.set)
        )
        try:
            await self._ready.wait()
        finally:
            if timer is not None:
                timer.cancel()
        self._ready.clear()
        batch, self._pending = self._pending, []
        return batch


class RequestSink:
    """One request's way into its subscriber's outbox; quacks like the queue the engine loop fills.

    The request's last chunk (finished, or `moved` on) detaches it (`on_end`)."""

    def __init__(self, outbox: ChunkOutbox, request_id: str, on_end: Callable[[str], None]) -> None:
        self._outbox, self._request_id, self._on_end = outbox, request_id, on_end

    def put_nowait(self, item: RequestDelta | TokenChunk) -> None:
        chunk = item if isinstance(item, TokenChunk) else TokenChunk.from_delta(item)
        self._outbox.put(chunk)
        if chunk.finished or chunk.moved is not None:
            self.detach()

    def detach(self) -> None:
        self._outbox.requests.discard(self._request_id)
        self._on_end(self._request_id)


# ---------------------------------------------------------------------------- router side


class ChunkFeed:
    """The router's end of one worker's feed: one link (`roles.feed_link`) that starts the
    router's requests there and brings their chunks, a batch per engine step, dealt out per request."""

    def __init__(
        self, handle: object, subscriber: str, on_close: Callable[[ChunkFeed], None],
        on_batch: Callable[[int], None] | None = None, open_link: OpenLink | None = None,
        on_cache_events: Callable[[object], None] | None = None,
    ) -> None:  # fmt: skip
        self.subscriber = subscriber
        self._on_batch = on_batch  # told each batch's size (the router's metrics)
        self._on_cache_events = on_cache_events  # told the worker's prefix-cache changes (the index)
        self._queues: dict[str, asyncio.Queue[TokenChunk | BaseException]] = {}
        self._on_close = on_close
        self.error: BaseException | None = None  # set once the feed ended
        self.loop = asyncio.get_running_loop()
        self._link: asyncio.Future[Link] = self.loop.create_future()
        self._task = self.loop.create_task(self._run(handle, open_link or open_worker_link))

    @property
    def closed(self) -> bool:
        return self.error is not None

    def open(self, request_id: str) -> None:
        """Starts keeping `request_id`'s chunks; call before the worker can produce them."""
        self._queues[request_id] = asyncio.Queue()
        if self.error is not None:
            self._queues[request_id].put_nowait(self.error)

    def close(self, request_id: str) -> None:
        """Stops keeping the request's chunks (later ones are dropped)."""
        self._queues.pop(request_id, None)

    async def chunks(self, request_id: str) -> AsyncIterator[TokenChunk]:
        """The request's chunks until its last (finished, or moved on); the feed's error if it ends.

        Chunks that queued up while the reader was busy come as one (`TokenChunk.then`): a reader
        slower than the engine gets fewer, bigger chunks, never the same tokens twice."""
        queue = self._queues[request_id]
        held: TokenChunk | BaseException | None = None
        while True:
            item = held if held is not None else await queue.get()
            held = None
            while not _last(item) and not queue.empty():
                later = queue.get_nowait()
                if isinstance(later, BaseException) or later.moved is not None:
                    held = later  # never merged: the tokens before it go out first
                    break
                item = item.then(later)  # type: ignore[union-attr]
            if isinstance(item, BaseException):
                raise item
            yield item
            if _last(item):
                return

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    async def start(self, request_id: str, prompt_token_ids: list[int], params: object) -> Started:
        """Starts the request on the worker (`Worker.generate`), its chunks coming on this feed;
        `open` it first. Raises what the worker raised (a `RoleError`: it is switching role)."""
        link = await asyncio.shield(self._link)
        return await link.start(request_id, prompt_token_ids, params)

    async def resync(self) -> None:
        """Asks the worker for a full snapshot of its prefix cache (the router's index lost it)."""
        link = await asyncio.shield(self._link)
        await link.resync()

    async def _run(self, handle: object, open_link: OpenLink) -> None:
        error: BaseException = FeedClosed(f"the chunk feed {self.subscriber} ended")
        link: Link | None = None
        try:
            link = await open_link(handle, self.subscriber)
            self._link.set_result(link)
            async for batch in link.batches():
                if isinstance(batch, feed_link.CacheEvents):
                    if self._on_cache_events is not None:
                        self._on_cache_events(batch.batch)
                    continue
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                for chunk in batch:
                    queue = self._queues.get(chunk.request_id)
                    if queue is not None:
                        queue.put_nowait(chunk)
        except asyncio.CancelledError:
            error = FeedClosed(f"the chunk feed {self.subscriber} was closed")
            raise
        except Exception as e:  # the worker died: each request's reader sees why
            error = e
        finally:
            self.error = error
            if link is not None:
                link.close()
            if not self._link.done():
                self._link.set_exception(error)
                self._link.exception()  # retrieved: nobody may be waiting for it
            for queue in self._queues.values():
                queue.put_nowait(error)
            self._on_close(self)


class ChunkFeeds:
    """A router's feeds, one per live worker actor, opened on first use.

    `on_batch(n)` hears of each batch of n chunks, `on_count(k)` of the number of open feeds;
    `open_link` opens a worker's link (default: its `feed_address` over Ray, then TCP; tests
    script it). `on_cache_events(batch)`, when set (the router's `ClusterView`), hears every
    worker's prefix-cache changes (`roles.cache_events.CacheEventBatch`, a snapshot first)."""

    def __init__(
        self, on_batch: Callable[[int], None] | None = None, on_count: Callable[[int], None] | None = None,
        open_link: OpenLink | None = None,
    ) -> None:  # fmt: skip
        self._on_batch, self._on_count, self._open_link = on_batch, on_count, open_link
        self.on_cache_events: Callable[[object], None] | None = None
        self._feeds: dict[tuple[str, str], ChunkFeed] = {}
        self._router = uuid.uuid4().hex[:8]
        self._counter = itertools.count()

    def of(self, worker_id: str, handle: object) -> ChunkFeed:
        """The open feed of this worker actor (a restarted worker is another actor: another feed)."""
        key = (worker_id, _actor_key(handle))
        feed = self._feeds.get(key)
        # A feed serves the event loop that opened it (tests run one loop after another).
        if feed is None or feed.closed or feed.loop is not asyncio.get_running_loop():
            # A fresh subscriber name per feed: the worker's cleanup of an ended feed (aborting
            # what nobody reads any more) never meets the next feed's requests.
            subscriber = f"router-{self._router}-{next(self._counter)}"
            feed = self._feeds[key] = ChunkFeed(
                handle,
                subscriber,
                lambda f, k=key: self._forget(k, f),
                self._on_batch,
                self._open_link,
                self.on_cache_events,
            )
            self._counted()
        return feed

    def _forget(self, key: tuple[str, str], feed: ChunkFeed) -> None:
        if self._feeds.get(key) is feed:
            del self._feeds[key]
            self._counted()

    def _counted(self) -> None:
        if self._on_count is not None:
            self._on_count(len(self._feeds))

    def open_feeds(self) -> list[ChunkFeed]:
        """The feeds open now."""
        return [feed for feed in self._feeds.values() if not feed.closed]

    async def stop(self) -> None:
        """Closes every feed (the router is stopping)."""
        for feed in list(self._feeds.values()):
            await feed.stop()


class Link(Protocol):
    """A router's connection to one worker (`roles.feed_link.RouterLink`, or a test's script)."""

    async def start(self, request_id: str, prompt_token_ids: list[int], params: object) -> Started: ...

    def batches(self) -> AsyncIterator[list[TokenChunk] | feed_link.CacheEvents]: ...

    async def resync(self) -> None: ...

    def close(self) -> None: ...


OpenLink = Callable[[object, str], Awaitable[Link]]


async def open_worker_link(handle: object, subscriber: str) -> Link:
    """The link to the worker actor `handle` as `subscriber` (its address asked over Ray)."""
    address = await handle.feed_address.remote()  # type: ignore[attr-defined]
    return await feed_link.connect(address, subscriber)


def _actor_key(handle: object) -> str:
    actor_id = getattr(handle, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else str(id(handle))


def _last(item: TokenChunk | BaseException) -> bool:
    """Whether nothing follows `item` on the request's queue (an error, its end, its move)."""
    return isinstance(item, BaseException) or item.finished or item.moved is not None
