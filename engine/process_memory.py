"""This process's resident memory, read from /proc: what a worker and an expert-parallel rank
report of their footprint (a few microseconds, so it is read on each report). 0 where /proc is
missing (not Linux). Torch-free."""

from __future__ import annotations

import resource


def resident_bytes() -> int:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0
