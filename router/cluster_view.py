"""The router's view of the cluster: live workers from the controller, and the prefix index
kept current from the workers' prefix-cache changes.

Nothing here polls on a timer. The worker list comes from the controller's `workers_changed`, a
call that returns when the list changes (or every `interval_s`, when the router's signals go to
the role planner). The cache changes come on each worker's feed link (`roles.feed_link`), which
the view opens to every live worker: a snapshot first, then what changed, pushed by the worker.
Placement reads plain memory, never waiting on the controller or the workers.

When the index backend (Redis) is down the view says so (`index_available`) and placement falls
back to load only; once a probe finds it back, every worker is asked for a fresh snapshot
(`Resync`): the index is rebuilt and nothing is lost but cache hits in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from pdserve.cluster.load_pressure import RouterSignals
from pdserve.cluster.operator_actions import EventLog
from pdserve.roles.chunk_feed import ChunkFeeds
from pdserve.router.prefix_index import IndexUnavailable, PrefixIndex

log = logging.getLogger(__name__)

# How often the router tells the controller's role planner its latencies (the planner's interval
# is 1 s by default).
SIGNALS_EVERY_S = 0.5


class ClusterView:
    """Live workers (`WorkerInfo` from the controller) and the prefix index they feed."""

    def __init__(self, controller, index: PrefixIndex, interval_s: float = SIGNALS_EVERY_S) -> None:
        self.controller = controller
        self.index = index
        self.interval_s = interval_s  # the longest a round waits for news of the workers
        self.workers: list = []
        self.index_available = True
        self.events = EventLog()  # the index's outages and returns, for the operator dashboard
        self._version = -1  # of the controller's worker list
        self._live: set[str] = set()  # worker ids in the list last seen
        self._feeds: ChunkFeeds | None = None
        # The index's work in arrival order, one task applying it: ("events", batch) or ("drop", id).
        self._changes: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        # What the router measured, sent to the controller's role planner every SIGNALS_EVERY_S.
        self.signals: Callable[[], RouterSignals] | None = None
        self._signalled = 0.0
        self._last_signals: RouterSignals | None = None

    async def start(self) -> None:
        await self.refresh()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()), loop.create_task(self._apply_changes())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def watch_cache(self, feeds: ChunkFeeds) -> None:
        """Keeps the index current from the cache changes on `feeds` (the request runner's), with a
        feed open to every live worker from now on."""
        self._feeds = feeds
        feeds.on_cache_events = lambda batch: self._changes.put_nowait(("events", batch))
        self._open_feeds()

    async def refresh(self) -> None:
        """One round now: the worker list, dead workers out of the index, feeds to new ones."""
        self._workers_seen(await self.controller.workers.remote())

    def _workers_seen(self, workers: list) -> None:
        self.workers = workers
        live = {w.worker_id for w in workers}
        for gone in self._live - live:
            self._changes.put_nowait(("drop", gone))
        self._live = live
        self._open_feeds()

    def _open_feeds(self) -> None:
        if self._feeds is not None:
            for w in self.workers:
                self._feeds.of(w.worker_id, w.handle)  # opened once; the worker sends a snapshot

    async def _run(self) -> None:
        from ray.exceptions import RayActorError

        controller_gone = False
        while True:
            try:
                listing = await self.controller.workers_changed.remote(self._version, self.interval_s)
                self._version = listing.version
                self._workers_seen(listing.workers)
                if not self.index_available:
                    await self._probe_index()
                await self._send_signals()
                controller_gone = False
            except RayActorError as e:  # said once, not a stack a second until it is back
                if not controller_gone:
                    log.error("the controller is gone (%s); the workers listed last stay until it is back",
                              str(e).splitlines()[0])  # fmt: skip
                controller_gone = True
                await asyncio.sleep(self.interval_s)
            except Exception:
                log.exception("refreshing the cluster view failed; retrying")
                await asyncio.sleep(self.interval_s)

    async def _apply_changes(self) -> None:
        while True:
            kind, item = await self._changes.get()
            try:
                if kind == "drop":
                    await self.index.drop_worker(item)  # type: ignore[arg-type]
                elif self.index_available and item.worker_id in self._live:  # type: ignore[attr-defined]
                    await self._apply(item)
            except IndexUnavailable as e:
                if self.index_available:
                    log.warning("prefix index unavailable (%s); placing by load only until it is back", e)
                    self.events.add("index", "", f"prefix index unavailable ({e}); placing by load only")
                self.index_available = False
            except Exception:
                log.exception("applying the workers' cache changes to the prefix index failed")

    async def _apply(self, batch) -> None:
        if batch.snapshot is not None:
            await self.index.replace_worker(batch.worker_id, batch.snapshot)
        elif batch.stored or batch.removed:
            await self.index.apply(batch.worker_id, batch.stored, batch.removed)

    async def _probe_index(self) -> None:
        """While the index is down: once it answers, rebuild it from fresh snapshots."""
        try:
            await self.index.num_entries()
        except IndexUnavailable:
            return
        self.index_available = True
        log.info("prefix index back; rebuilding it from the workers' snapshots")
        self.events.add("index", "", "prefix index back; rebuilt from the workers' snapshots")
        for feed in self._feeds.open_feeds() if self._feeds is not None else []:
            with contextlib.suppress(ConnectionError):
                await feed.resync()

    async def _send_signals(self) -> None:
        now = time.monotonic()
        if self.signals is None or now - self._signalled < SIGNALS_EVERY_S:
            return
        self._signalled = now
        signals = self.signals()
        # The planner keeps the last report: an unchanged one (an idle router's) is not sent again.
        if signals != self._last_signals:
            await self.controller.report_router_signals.remote(signals)
            self._last_signals = signals
