"""The role planner's Prometheus metrics, on a registry its owner passes in (the controller's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from pdserve.cluster.load_pressure import PLANNED_ROLES
from pdserve.cluster.planner import Decision, Hold


class RolePlannerMetrics:
    """Switches by direction and reason, holds by reason, and each side's pressure."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "pdserve_role_planner_decisions",
            "Switches the planner decided, by direction and reason (pdserve_role_switches_total counts "
            "those carried out, manual ones included)",
            ["from", "to", "reason"],
            registry=registry,
        )
        self.holds = Counter(
            "pdserve_role_planner_holds",
            "Planner intervals that switched nothing, by reason ('balanced' when no side is above target)",
            ["reason"],
            registry=registry,
        )
        self.pressure = Gauge(
            "pdserve_role_planner_pressure",
            "Each side's pressure against its latency target (1 = at target)",
            ["side"],
            registry=registry,
        )

    def observe(self, outcome: Decision | Hold) -> None:
        """Counts one `RolePlanner.plan` outcome and sets the pressures it read."""
        for side in PLANNED_ROLES:
            pressure = getattr(outcome, side)
            if pressure is not None:
                self.pressure.labels(side).set(pressure.value)
        if isinstance(outcome, Decision):
            self.decisions.labels(outcome.from_role, outcome.to_role, outcome.reason).inc()
        else:
            self.holds.labels(outcome.reason).inc()
