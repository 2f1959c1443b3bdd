"""A worker's log of prefix-cache changes, read by routers to keep their prefix index current.

Each change gets a sequence number; a router asks for everything after the last number it
saw. The log keeps a bounded tail: a router that fell further behind (or a new one) gets a
full snapshot of the cached block hashes instead, so the index converges either way.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

from pdserve.engine import KVCacheEvent


@dataclass
class CacheEventBatch:
    """Changes after a sequence number, or (when `snapshot` is set) the whole cache at `seq`."""

    worker_id: str
    seq: int  # the last change included
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    snapshot: list[int] | None = None


class CacheEventLog:
    """Thread-safe: the engine thread records, the actor's event loop reads."""

    def __init__(self, worker_id: str, capacity: int = 4096) -> None:
        self.worker_id = worker_id
        self._events: deque[tuple[int, KVCacheEvent]] = deque(maxlen=capacity)
        self._seq = 0
        self._lock = threading.Lock()

    def record(self, event: KVCacheEvent) -> None:
        with self._lock:
            self._seq += 1
            self._events.append((self._seq, event))

    @property
    def seq(self) -> int:
        with self._lock:
            return self._seq

    def since(self, after: int) -> CacheEventBatch | None:
        """Changes after `after` in order (stored/removed folded), or None when they are no longer kept."""
        with self._lock:
            if after > self._seq or (
                after < self._seq and (not self._events or self._events[0][0] > after + 1)
            ):
                return None
            stored: dict[int, None] = {}
            removed: dict[int, None] = {}
            # The log's sequence numbers are consecutive, so the changes after `after` are its
            # newest `seq - after`: read from the right end (a full log holds 4096, and a worker
            # asks after every engine step).
            newer = list(itertools.islice(reversed(self._events), self._seq - after))
            for _, event in reversed(newer):
                # Later changes win: a block stored then evicted ends up removed, and back again.
                for h in event.stored:
                    removed.pop(h, None)
                    stored[h] = None
                for h in event.removed:
                    stored.pop(h, None)
                    removed[h] = None
            return CacheEventBatch(self.worker_id, self._seq, list(stored), list(removed))
