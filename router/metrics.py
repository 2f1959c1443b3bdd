"""The router's Prometheus metrics (its own registry; the gateway and `--metrics-port` expose it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Placement should take well under a millisecond; the tail shows index (Redis) round trips.
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class RouterMetrics:
    """Requests by policy and outcome, decision time, prefix index hits and size."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdserve_router_requests", "Requests by outcome", ["policy", "outcome"], registry=r
        )
        self.decision_seconds = Histogram(
            "pdserve_router_decision_seconds", "Time to choose workers", buckets=DECISION_BUCKETS, registry=r
        )
        self.index_hit_tokens = Counter(
            "pdserve_prefix_index_hit_tokens", "Prompt tokens the chosen worker already held", registry=r
        )
        self.index_blocks = Gauge(
            "pdserve_prefix_index_blocks", "(worker, block) entries in the index", registry=r
        )
        self.in_flight = Gauge("pdserve_router_requests_in_flight", "Requests being served", registry=r)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
