"""`RouterConfig`: how the router runs. Its defaults are the schema's (`pdserve.config` reads them).

Torch-, Ray- and gRPC-free, so the command line's schema can take its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.cluster.planner import RolePlannerConfig
from pdserve.router.policies import DEFAULT_POLICY, make_policy

if TYPE_CHECKING:
    from pdserve.router.request_runner import RunnerConfig


@dataclass
class RouterConfig:
    """How the router runs (the same names as `pdserve router` flags)."""

    host: str = "127.0.0.1"
    port: int = 50051
    policy: str = DEFAULT_POLICY
    redis_url: str | None = None
    # The cluster this router serves: its Redis keys live under `pdserve:<cluster>:`, so clusters
    # sharing one Redis never see each other's prefix entries (the launcher sets the cluster's name).
    cluster: str = "pdserve"
    index_ttl_s: int = 30  # Redis index entries outlive a dead router this long at most
    max_in_flight: int = 1024
    # The longest the cluster view waits for news of the workers (it hears of changes at once;
    # this paces the latencies it reports to the role planner).
    view_interval_s: float = 0.5
    metrics_timeout_s: float = 2.0  # per worker in `Metrics`: a stuck worker must not stall a scrape
    # When set, every call but the health service's must carry `authorization: Bearer KEY` (router/auth.py).
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)  # SetRole and Planner pause/resume need it
    # Conditional disaggregation: a decode worker computes a prompt itself, with no prefill
    # worker and no KV transfer, when at most this many of its tokens are not in its prefix cache
    # (0: every prompt goes to a prefill worker). Measured in DECISIONS.md (2026-12-05).
    local_prefill_tokens: int = 64
    runner: RunnerConfig | None = None
    # Goodput's SLO on the dashboard: the role planner's latency targets (the launcher passes them).
    slo_ttft_ms: float = RolePlannerConfig.ttft_target_ms
    slo_itl_ms: float = RolePlannerConfig.itl_target_ms

    def __post_init__(self) -> None:
        make_policy(self.policy)  # ValueError naming the allowed policies
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.index_ttl_s < 1:
            raise ValueError(f"index_ttl_s must be >= 1, got {self.index_ttl_s}")
        if self.local_prefill_tokens < 0:
            raise ValueError(f"local_prefill_tokens must be >= 0, got {self.local_prefill_tokens}")
        if not self.metrics_timeout_s > 0:
            raise ValueError(f"metrics_timeout_s must be > 0, got {self.metrics_timeout_s}")
