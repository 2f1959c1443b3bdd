"""The router's recent time to first token and inter-token gaps, for the role planner.

Samples older than `window_s` fall out, so the percentiles say how the cluster does now, not
since start (Prometheus histograms keep the long view).
"""

from __future__ import annotations

import time
from collections import deque

from pdserve.cluster.load_pressure import RouterSignals

# Enough samples for a steady p99, few enough that the percentiles cost nothing to compute.
MAX_SAMPLES = 2048


class RecentLatencies:
    """TTFT and inter-token gaps of the last `window_s` seconds, as `RouterSignals`."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._itl: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)

    def first_token(self, seconds: float) -> None:
        self._ttft.append((time.monotonic(), seconds))

    def gap(self, seconds: float) -> None:
        self._itl.append((time.monotonic(), seconds))

    def signals(self, waiting_for_decode: int) -> RouterSignals:
        """The planner's view of the router: p50/p99 in ms (None without samples) and the requests
        waiting for decode room."""
        ttft, itl = self._recent(self._ttft), self._recent(self._itl)
        return RouterSignals(
            ttft_p50_ms=_pick(ttft, 0.5), ttft_p99_ms=_pick(ttft, 0.99),
            itl_p50_ms=_pick(itl, 0.5), itl_p99_ms=_pick(itl, 0.99),
            waiting_for_decode=waiting_for_decode,
        )  # fmt: skip

    def _recent(self, samples: deque[tuple[float, float]]) -> list[float]:
        cutoff = time.monotonic() - self.window_s
        while samples and samples[0][0] < cutoff:
            samples.popleft()
        return sorted(s for _, s in samples)


def _pick(sorted_s: list[float], q: float) -> float | None:
    if not sorted_s:
        return None
    return sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] * 1e3
