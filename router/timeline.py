"""The router's traffic second by second, for the operator dashboard: requests in, tokens out,
live migrations, latency percentiles, goodput against the SLO, and KV flows between workers.

The router counts as requests pass (`arrived`, `emitted`, `finished`); `sample` turns the totals
into per-second rates once a second and keeps the last `keep` samples, so every reader of the
overview sees the same numbers. KV flows come from the workers' own counts of bytes sent to each
peer (`WorkerLoad.kv_sent_bytes`, cumulative since the sender started).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from pdserve.cluster.load_pressure import RouterSignals

# Ten minutes of one-second samples.
SAMPLES_KEPT = 600


@dataclass
class TimelineSample:
    """One second of traffic (rates over the second before `at`)."""

    at: float  # wall clock
    requests_per_s: float
    tokens_per_s: float
    migrations_per_s: float
    in_flight: int
    latencies: RouterSignals  # TTFT / ITL p50 / p99 over the router's recent window
    slo_met: float | None  # share of the window's finished requests within the SLO (None: none)
    goodput_per_s: float  # requests finished within the SLO per second, over the window


@dataclass
class KVFlow:
    """KV bytes moving from `sender` to `receiver`: the rate over the last sample, and the total."""

    sender: str
    receiver: str
    bytes_per_s: float
    bytes_total: int


@dataclass(frozen=True)
class SLO:
    """The latency targets a request must meet to count as goodput (the role planner's)."""

    ttft_ms: float
    itl_ms: float

    def met(self, ttft_s: float, mean_itl_s: float | None) -> bool:
        return ttft_s * 1e3 <= self.ttft_ms and (mean_itl_s is None or mean_itl_s * 1e3 <= self.itl_ms)


class Timeline:
    """Counters the request path adds to, and their per-second samples."""

    def __init__(self, slo: SLO, window_s: float = 10.0, keep: int = SAMPLES_KEPT) -> None:
        self.slo = slo
        self.window_s = window_s
        self.requests = self.tokens = 0
        self._finished: deque[tuple[float, bool]] = deque()  # (monotonic end, met the SLO)
        self._samples: deque[TimelineSample] = deque(maxlen=keep)
        # (monotonic, requests, tokens, migrations) at the last sample: the first covers from here.
        self._last: tuple[float, int, int, float] = (time.monotonic(), 0, 0, 0.0)
        self._sent: dict[tuple[str, str], int] = {}  # (sender, receiver) -> bytes at the last sample
        self.flows: list[KVFlow] = []

    def arrived(self) -> None:
        self.requests += 1

    def emitted(self, tokens: int) -> None:
        self.tokens += tokens

    def finished(self, ttft_s: float | None, mean_itl_s: float | None) -> None:
        """A request that completed: within the SLO when its first token and mean gap were."""
        met = ttft_s is not None and self.slo.met(ttft_s, mean_itl_s)
        self._finished.append((time.monotonic(), met))

    def sample(
        self, migrations: float, in_flight: int, latencies: RouterSignals, sent: dict[tuple[str, str], int]
    ) -> TimelineSample | None:
        """Takes this second's sample, counting from the last one (or from the start); None when
        no time has passed.

        `migrations`: live migrations since the router started; `sent`: each (sender, receiver)
        pair's KV bytes since the sender started.
        """
        now = time.monotonic()
        if now <= self._last[0]:
            return None
        self._sample_flows(now, sent)
        last, self._last = self._last, (now, self.requests, self.tokens, migrations)
        dt = now - last[0]
        while self._finished and self._finished[0][0] < now - self.window_s:
            self._finished.popleft()
        good = sum(met for _, met in self._finished)
        sample = TimelineSample(
            at=time.time(),
            requests_per_s=(self.requests - last[1]) / dt,
            tokens_per_s=(self.tokens - last[2]) / dt,
            migrations_per_s=max(0.0, migrations - last[3]) / dt,
            in_flight=in_flight,
            latencies=latencies,
            slo_met=good / len(self._finished) if self._finished else None,
            goodput_per_s=good / self.window_s,
        )
        self._samples.append(sample)
        return sample

    def _sample_flows(self, now: float, sent: dict[tuple[str, str], int]) -> None:
        dt = now - self._last[0]
        flows = []
        for pair, total in sorted(sent.items()):
            before = self._sent.get(pair, 0)
            # A sender that restarted counts from zero again: its first total is all new.
            delta = total - before if total >= before else total
            flows.append(KVFlow(pair[0], pair[1], delta / dt, total))
        self._sent = dict(sent)
        self.flows = flows

    def samples(self, last: int = 0) -> list[TimelineSample]:
        """The latest `last` samples (all kept when 0), oldest first."""
        kept = list(self._samples)
        return kept[-last:] if last > 0 else kept
