"""The workers' metrics for /metrics (and the dashboard's overview), fetched once per interval
however many scrape.

Each fetch makes the router ask every worker for its exposition; 30 concurrent scrapers made chat
4.5x slower when every scrape fanned out. Scrapes within `ttl_s` of a fetch reuse its text, and
scrapes that arrive while a fetch runs wait for that one instead of starting their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedFetch(Generic[T]):
    """The latest value (text) `fetch` gave, reused for `ttl_s`; concurrent callers share one fetch.

    A failed fetch is not kept: its callers get its error, and the next call fetches again.
    """

    def __init__(self, fetch: Callable[[], Awaitable[T]], ttl_s: float) -> None:
        self._fetch, self.ttl_s = fetch, ttl_s
        self._text: T | None = None
        self._fetched_at = 0.0
        self._pending: asyncio.Task[T] | None = None

    async def get(self) -> T:
        """The text, fetched now only if the last one is older than `ttl_s` and none is under way."""
        loop = asyncio.get_running_loop()
        if self._text is not None and loop.time() - self._fetched_at < self.ttl_s:
            return self._text
        if self._pending is None:
            self._pending = loop.create_task(self._refresh())
            # Its error is read here too, in case every caller has hung up (asyncio would log it).
            self._pending.add_done_callback(lambda task: task.cancelled() or task.exception())
        # Shielded: a scraper that hangs up does not cancel the fetch the others wait for.
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> T:
        try:
            text = await self._fetch()
            self._text, self._fetched_at = text, asyncio.get_running_loop().time()
            return text
        finally:
            self._pending = None
