"""The router's Prometheus metrics (its own registry; the gateway and `--metrics-port` expose it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Placement should take well under a millisecond; the tail shows index (Redis) round trips.
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
ADMISSION_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
        self.context_cache_hit_tokens = Counter(
            "pdserve_router_context_cache_hit_tokens",
            "Prompt tokens beyond the chosen worker's own prefix found in the Redis context cache",
            registry=r,
        )
        self.index_blocks = Gauge(
            "pdserve_prefix_index_blocks", "(worker, block) entries in the index", registry=r
        )
        self.in_flight = Gauge("pdserve_router_requests_in_flight", "Requests being served", registry=r)
        self.local_prefills = Counter(
            "pdserve_router_local_prefills",
            "Requests a decode worker computed whole, its uncached prompt being short (no KV transfer)",
            registry=r,
        )
        self.admission_wait_seconds = Histogram(
            "pdserve_router_admission_wait_seconds",
            "Time a disaggregated request waited for a decode worker with room for its prompt "
            "(before its prefill starts, so part of its TTFT)",
            buckets=ADMISSION_BUCKETS,
            registry=r,
        )
        self.live_migrations = Counter(
            "pdserve_live_migrations",
            "Requests a decode worker moved off (role switch), by outcome: moved to another decode "
            "worker with their KV, or no_room (then recomputed elsewhere)",
            ["outcome"],
            registry=r,
        )
        self.feed_batches = Counter(
            "pdserve_router_feed_batches", "Batches received on the workers' chunk feeds (one per worker step)",
            registry=r,
        )  # fmt: skip
        self.feed_chunks = Counter(
            "pdserve_router_feed_chunks",
            "Chunks in those batches (chunks / batches: requests per step)",
            registry=r,
        )
        self.feeds_open = Gauge(
            "pdserve_router_feeds_open", "Chunk feeds open, one per worker actor", registry=r
        )
        self.metrics_fanouts = Counter(
            "pdserve_router_metrics_fanouts", "Metrics calls (each asks every live worker)", registry=r
        )

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class _Families:
    """A collector that serves metric families read from other processes' expositions."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_expositions(texts: list[str]) -> str:
    """Several text expositions as one, each family's samples together under one HELP/TYPE.

    Concatenating the workers' texts would repeat every family's HELP/TYPE lines, which
    Prometheus rejects; their samples differ by the `worker` label, so they merge cleanly.
    """
    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name in families:
                families[family.name].samples.extend(family.samples)
            else:
                families[family.name] = family
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry).decode()
