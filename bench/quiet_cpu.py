"""Waiting for the machine's CPUs to go quiet before a measured level of a side-by-side bench.

Servers taking turns on one machine leave work behind them: vLLM's CPU engine spins a core for
about a second after its last request (measured: 0.99 s of CPU in the first second after a burst,
then ~1% a second), so whichever server runs next would start its level with a core taken. Each
level therefore starts once the machine's CPU use over a short window falls below a threshold,
or after a bound, and says how long it waited. Linux only (`/proc/stat`); elsewhere it does not wait.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

_STAT = Path("/proc/stat")

# Busy share of all cores below which the machine counts as quiet: an idle pdserve cluster uses
# ~6% of one core, a spinning engine thread a whole one (50% of this machine's two).
QUIET_BELOW = 0.25
WINDOW_S = 0.2
MAX_WAIT_S = 5.0


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot; None where /proc/stat cannot be read."""
    try:
        # user nice system idle iowait irq softirq steal; guest time is counted in user and nice
        # already, so the fields after steal are left out.
        fields = [int(v) for v in _STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def busy_share(window_s: float = WINDOW_S) -> float | None:
    """The machine's busy share of all its cores over the next `window_s` (None: unknown)."""
    before = _cpu_times()
    await asyncio.sleep(window_s)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


async def wait_until_quiet(
    quiet_below: float = QUIET_BELOW, window_s: float = WINDOW_S, max_wait_s: float = MAX_WAIT_S
) -> float:
    """Waits until the machine is quiet (or `max_wait_s` passed); returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        share = await busy_share(window_s)
        if share is None or share < quiet_below:
            break
    return round(time.perf_counter() - start, 2)
