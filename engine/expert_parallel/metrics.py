"""`ExpertParallelMetrics`: Prometheus families of one expert-parallel group.

Tokens are counted per logical expert per MoE layer (`expert` label: 64 experts x 28 layers is
~1.8k series for 21B-A3B, few enough to keep, and what rebalancing reads), and per rank per layer
as the rows each rank's experts computed (the load that balancing evens out). Dispatch/combine
and expert-compute seconds, rows moved and rounds are per rank; rebalances and the imbalance
(max/mean tokens per rank, over the tokens counted since the last rebalance, under the current
placement) are per group. Its own registry, as `roles.metrics.WorkerMetrics` has: no global state.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

# Per-rank totals in `ExpertParallelGroup.rank_stats()` -> counter name suffix and help.
RANK_COUNTERS = {
    "dispatch_seconds": ("dispatch_seconds", "Seconds in dispatch/combine collectives (waits included)"),
    "expert_compute_seconds": (
        "expert_compute_seconds",
        "Seconds running experts for any rank's rows (and looking up embedding rows for any rank)",
    ),
    "rows_sent": ("rows_sent", "Token rows sent to other ranks' experts"),
    "rows_received": ("rows_received", "Token rows received from other ranks for this rank's experts"),
    "rounds": (
        "rounds",
        "All-to-all rounds (one per MoE layer pass, split product and embedding lookup, plus closing rounds)",
    ),
    "split_compute_seconds": (
        "split_compute_seconds",
        "Seconds computing this rank's columns of split products (LM head, dense MLPs) for any rank",
    ),
    "split_rounds": (
        "split_rounds",
        "Rounds in which this rank gathered a split product's columns from the group",
    ),
    "lookup_rounds": (
        "lookup_rounds",
        "Rounds in which this rank gathered embedding rows from the ranks holding its tokens' ids",
    ),
}


class ExpertParallelMetrics:
    """The metric families an `ExpertParallelGroup` updates, labelled by `group` (its name)."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.registry = CollectorRegistry()
        r = self.registry
        self.expert_tokens = Counter(
            "pdserve_ep_expert_tokens",
            "Token slots routed to a logical expert of a MoE layer (tokens x top_k over the experts)",
            ["group", "layer", "expert"],
            registry=r,
        )
        self.rank_tokens = Counter(
            "pdserve_ep_rank_tokens",
            "Token slots a rank's experts computed in a MoE layer (its own and other ranks' rows)",
            ["group", "rank", "layer"],
            registry=r,
        )
        self.rank_counters = {
            key: Counter(f"pdserve_ep_{name}", text, ["group", "rank"], registry=r)
            for key, (name, text) in RANK_COUNTERS.items()
        }
        self._rank_seen: dict[tuple[int, str], float] = {}
        self._rank_tokens_seen: dict[tuple[int, int], int] = {}
        self.rebalances = Counter(
            "pdserve_ep_rebalances",
            "Run-time re-placements of the spare expert copies",
            ["group"],
            registry=r,
        )
        self.imbalance = Gauge(
            "pdserve_ep_imbalance",
            "max/mean token slots per rank over the MoE layers, for tokens since the last rebalance",
            ["group"],
            registry=r,
        )
        self.placement_version = Gauge(
            "pdserve_ep_placement_version", "Version of the routing table in use", ["group"], registry=r
        )
        self.ranks = Gauge("pdserve_ep_ranks", "Ranks in the group", ["group"], registry=r)
        self.rebalances.labels(group)  # a zero shows before the first rebalance

    def add_expert_tokens(self, counts: dict[int, list[int]]) -> None:
        """Adds token slots per logical expert per layer counted since the previous call."""
        for layer, per_expert in counts.items():
            for e, n in enumerate(per_expert):
                if n:
                    self.expert_tokens.labels(self.group, str(layer), str(e)).inc(n)

    def rank_stats(self, stats: list[dict[str, Any]]) -> None:
        """Moves the per-rank counters up to the totals the ranks report (`rank_stats()`)."""
        for s in stats:
            rank = s["rank"]
            for key, counter in self.rank_counters.items():
                seen = self._rank_seen.get((rank, key), 0)
                if s.get(key, 0) > seen:  # a total a rank does not report stays at zero
                    counter.labels(self.group, str(rank)).inc(s[key] - seen)
                    self._rank_seen[(rank, key)] = s[key]
            for layer, n in s["layer_rows"].items():
                seen = self._rank_tokens_seen.get((rank, layer), 0)
                if n > seen:
                    self.rank_tokens.labels(self.group, str(rank), str(layer)).inc(n - seen)
                    self._rank_tokens_seen[(rank, layer)] = n

    def text(self) -> str:
        """The Prometheus text exposition."""
        return generate_latest(self.registry).decode()
