"""What a worker process holds of the machine: resident memory, open file descriptors, threads.

Read from /proc on each heartbeat (a few microseconds), so `pdserve status`, the metrics and the
reliability tests can see a worker's footprint and notice leaks (descriptors and threads that
grow with cancelled requests). Zeros where /proc is missing (not Linux).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pdserve.engine.process_memory import resident_bytes
from pdserve.engine.stats import RankLoad


@dataclass(frozen=True)
class ProcessUsage:
    """One process's footprint at one moment."""

    rss_bytes: int = 0
    open_fds: int = 0
    threads: int = 0
    pid: int = 0  # what an operator (or `bench chaos`) signals to stop this very worker

    @classmethod
    def of_this_process(cls) -> ProcessUsage:
        """This process's usage, from /proc/self (zeros where /proc is missing)."""
        try:
            open_fds = len(os.listdir("/proc/self/fd"))
            threads = len(os.listdir("/proc/self/task"))
        except OSError:
            return cls()
        return cls(resident_bytes(), open_fds, threads, os.getpid())

    def with_ranks(self, ranks: Sequence[RankLoad]) -> ProcessUsage:
        """This worker's footprint with its expert-parallel ranks' memory added: the ranks are its
        child processes and hold most of the model (the pid stays the worker's own)."""
        return replace(self, rss_bytes=self.rss_bytes + sum(r.rss_bytes for r in ranks))
