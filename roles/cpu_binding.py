"""Pinning a process, every thread of it, to a set of CPU cores (Linux `sched_setaffinity`).

A decode worker's engine step is one busy thread; on a machine with few cores it loses a share of
its core to every other runnable thread (the gateway, the load, Ray's agents) each time the
scheduler moves it. Giving it cores of its own, and everything else the others, is what vLLM's CPU
build does for its OpenMP threads (docs/DECISIONS.md 2026-12-06). Linux applies an affinity to one
thread; threads started later inherit their creator's, so binding each existing thread binds the
process for good (and its child processes, such as expert-parallel ranks).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

_TASKS = "/proc/self/task"


def can_bind() -> bool:
    """Whether this platform lets a process choose its cores."""
    return hasattr(os, "sched_setaffinity") and os.path.isdir(_TASKS)


def bind_this_process(cores: Iterable[int]) -> tuple[int, ...]:
    """Pins every thread of this process to `cores`; returns them sorted.

    ValueError names a core this process may not use (outside its cgroup's cpuset)."""
    wanted = tuple(sorted(set(cores)))
    if not wanted:
        raise ValueError("bind_this_process needs at least one core")
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, wanted)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as e:
            raise ValueError(f"cannot bind to cores {list(wanted)}: {e.strerror}") from None
    return wanted


def cores_of_this_process() -> tuple[int, ...]:
    """The cores this process's threads may run on (their union), sorted."""
    cores: set[int] = set()
    for tid in _thread_ids():
        try:
            cores |= os.sched_getaffinity(tid)
        except ProcessLookupError:
            continue
    return tuple(sorted(cores))


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir(_TASKS)]
    except OSError:  # no /proc: the calling thread only
        return [0]
