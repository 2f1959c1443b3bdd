"""What a worker process holds of the machine: resident memory, open file descriptors, threads.

Read from /proc on each heartbeat (a few microseconds), so `pdserve status`, the metrics and the
reliability tests can see a worker's footprint and notice leaks (descriptors and threads that
grow with cancelled requests). Zeros where /proc is missing (not Linux).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass


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
            with open("/proc/self/statm") as f:
                rss_pages = int(f.read().split()[1])
            open_fds = len(os.listdir("/proc/self/fd"))
            threads = len(os.listdir("/proc/self/task"))
        except OSError:
            return cls()
        return cls(rss_pages * resource.getpagesize(), open_fds, threads, os.getpid())
