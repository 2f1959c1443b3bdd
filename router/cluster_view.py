"""The router's view of the cluster: live workers from the controller, and the prefix index
kept current from the workers' cache event logs.

One background task refreshes both every `interval_s`: placement then reads plain memory,
never waiting on the controller or the workers. When the index backend (Redis) is down the
view says so (`index_available`), placement falls back to load only, and once it is back
every worker's log is read from the start, which returns full snapshots: the index is rebuilt
and nothing is lost but cache hits in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from pdserve.cluster.load_pressure import RouterSignals
from pdserve.cluster.operator_actions import EventLog
from pdserve.router.prefix_index import IndexUnavailable, PrefixIndex

log = logging.getLogger(__name__)

# How often the router tells the controller's role planner its latencies (the planner's interval
# is 1 s by default).
SIGNALS_EVERY_S = 0.5


class ClusterView:
    """Live workers (`WorkerInfo` from the controller) and the prefix index they feed."""

    def __init__(self, controller, index: PrefixIndex, interval_s: float = 0.1) -> None:
        self.controller = controller
        self.index = index
        self.interval_s = interval_s
        self.workers: list = []
        self.index_available = True
        self.events = EventLog()  # the index's outages and returns, for the operator dashboard
        self._seen: dict[str, int] = {}  # worker id -> last cache event applied
        self._task: asyncio.Task | None = None
        # What the router measured, sent to the controller's role planner every SIGNALS_EVERY_S.
        self.signals: Callable[[], RouterSignals] | None = None
        self._signalled = 0.0

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        """One round: worker list, dead workers out of the index, new cache events in."""
        self.workers = await self.controller.workers.remote()
        live = {w.worker_id for w in self.workers}
        try:
            for gone in [w for w in self._seen if w not in live]:
                await self.index.drop_worker(gone)
                del self._seen[gone]
            batches = await asyncio.gather(
                *(w.handle.cache_events.remote(self._seen.get(w.worker_id, -1)) for w in self.workers),
                return_exceptions=True,
            )
            for batch in batches:
                if isinstance(batch, BaseException):
                    continue  # a dying worker; the controller will tell us next round
                if batch.snapshot is not None:
                    await self.index.replace_worker(batch.worker_id, batch.snapshot)
                elif batch.stored or batch.removed:
                    await self.index.apply(batch.worker_id, batch.stored, batch.removed)
                self._seen[batch.worker_id] = batch.seq
        except IndexUnavailable as e:
            if self.index_available:
                log.warning("prefix index unavailable (%s); placing by load only until it is back", e)
                self.events.add("index", "", f"prefix index unavailable ({e}); placing by load only")
            self.index_available = False
            self._seen.clear()  # when it is back, rebuild from snapshots
            return
        if not self.index_available:
            log.info("prefix index back; rebuilt from worker snapshots")
            self.events.add("index", "", "prefix index back; rebuilt from the workers' snapshots")
        self.index_available = True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
                await self._send_signals()
            except Exception:
                log.exception("refreshing the cluster view failed; retrying")

    async def _send_signals(self) -> None:
        now = time.monotonic()
        if self.signals is None or now - self._signalled < SIGNALS_EVERY_S:
            return
        self._signalled = now
        await self.controller.report_router_signals.remote(self.signals())
