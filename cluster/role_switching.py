"""Role switches, by hand or by the planner: who may switch, carrying it out, what it did.

The controller owns one `RoleSwitcher`. Every switch, whether an operator asked (`pdserve role`,
the router's `SetRole`, the gateway's admin endpoint) or the planner decided, goes through
`switch`: the same refusals (an unknown worker or role, a worker already switching or
restarting, the last worker of its role), the same in-place switch on the worker (roles/worker.py:
prompts handed back, decoding requests moved live), the same record and metrics. `run` is the
planner's loop: every `interval_s` it builds a `PlannerSnapshot` from the heartbeats' loads and
the router's latest signals, asks `RolePlanner.plan`, and starts the switch it decides on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram

from pdserve.cluster.load_pressure import PLANNED_ROLES, PlannerSnapshot, RouterSignals, WorkerSnapshot
from pdserve.cluster.operator_actions import ActionRefused, check_not_last
from pdserve.cluster.planner import Decision, DecisionRecord, RolePlanner, RolePlannerConfig
from pdserve.cluster.planner_metrics import RolePlannerMetrics
from pdserve.roles.messages import ROLES

if TYPE_CHECKING:
    from pdserve.cluster.controller import WorkerInfo

log = logging.getLogger(__name__)

# A switch that has not drained in this long fails (the worker keeps its old role).
DRAIN_TIMEOUT_S = 120.0
# How many switches and planner decisions `pdserve status` can show.
HISTORY = 50
SWITCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class SwitchRefused(ActionRefused):
    """A switch that may not happen (the message says why and what to do)."""


@dataclass
class SwitchRecord:
    """One switch as `pdserve status` shows it (plain data: it crosses to the router)."""

    worker_id: str
    from_role: str
    to_role: str
    reason: str  # "manual", or the planner's ("prefill_queue", "decode_kv", ...)
    at: float  # wall-clock start
    seconds: float | None = None  # None while under way
    moved: int = 0  # decoding requests moved live to other workers
    handed_back: int = 0  # prompts given back to the router
    error: str | None = None
    requested_by: str = ""  # the operator who asked (manual switches)

    def line(self) -> str:
        took = "under way" if self.seconds is None else f"{self.seconds:.2f} s"
        outcome = (
            f"failed: {self.error}" if self.error else f"{self.moved} moved, {self.handed_back} handed back"
        )
        when = time.strftime("%H:%M:%S", time.localtime(self.at))
        return f"{when} {self.worker_id} {self.from_role}->{self.to_role} ({self.reason}) {took}, {outcome}"


@dataclass
class PlannerState:
    """The planner's settings, whether it runs, and its recent decisions (for `pdserve status`)."""

    config: dict[str, object]
    running: bool
    switches: list[SwitchRecord]
    decisions: list[dict[str, object]]


class RoleSwitcher:
    """Carries out role switches and runs the planner over the controller's workers.

    `workers()` lists the controller's `WorkerInfo`s (dead ones included: a restarting slot holds
    no load). Metrics go on `registry` (the controller's).
    """

    def __init__(
        self, workers: Callable[[], list[WorkerInfo]], config: RolePlannerConfig, registry: CollectorRegistry
    ) -> None:
        self._workers = workers
        self.config = config
        self.planner = RolePlanner(config)
        self.metrics = RolePlannerMetrics(registry)
        self.switches = Counter(
            "pdserve_role_switches",
            "Role switches completed, by direction and reason (manual or the planner's)",
            ["from", "to", "reason"],
            registry=registry,
        )
        self.switch_seconds = Histogram(
            "pdserve_role_switch_seconds",
            "How long role switches took",
            buckets=SWITCH_BUCKETS,
            registry=registry,
        )
        self.running = config.enabled
        self.signals = RouterSignals()
        self._switching: dict[str, str] = {}  # worker id -> the role it is switching to
        self._last_switch: dict[str, float] = {}  # slot -> monotonic end of its last switch
        self._history: deque[SwitchRecord] = deque(maxlen=HISTORY)
        self._decisions: deque[DecisionRecord] = deque(maxlen=HISTORY)
        self._rates: dict[str, tuple[int, float]] = {}  # worker id -> (prompt tokens, step seconds)
        self._prefill_rate: float | None = None
        self._switch_cost: float | None = None

    # ------------------------------------------------------------------ switching

    async def switch(
        self, worker_id: str, role: str, reason: str = "manual", requested_by: str = ""
    ) -> SwitchRecord:
        """Switches `worker_id` to `role` in place; SwitchRefused when it may not."""
        info = self._check(worker_id, role)
        record = SwitchRecord(worker_id, info.role, role, reason, time.time(), requested_by=requested_by)
        self._history.append(record)
        self._switching[worker_id] = role
        start = time.monotonic()
        try:
            done = await info.handle.set_role.remote(role, DRAIN_TIMEOUT_S)
        except Exception as e:
            record.error = str(getattr(e, "cause", e)).splitlines()[0][:200]
            log.warning("role switch of %s to %s failed: %s", worker_id, role, record.error)
            raise
        finally:
            record.seconds = time.monotonic() - start
            del self._switching[worker_id]
            self._last_switch[info.slot] = time.monotonic()
        info.role = role
        if info.load is not None:  # placement reads the new role before the next heartbeat
            info.load = replace(info.load, role=role, draining=False)
        record.moved, record.handed_back = done.moved, done.handed_back
        self.switches.labels(record.from_role, role, reason).inc()
        self.switch_seconds.observe(record.seconds)
        self._switch_cost = (
            record.seconds if self._switch_cost is None else 0.5 * (self._switch_cost + record.seconds)
        )
        log.info("role switch: %s", record.line())
        return record

    def _check(self, worker_id: str, role: str) -> WorkerInfo:
        if role not in ROLES:
            raise SwitchRefused(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        workers = self._workers()
        info = next((w for w in workers if w.worker_id == worker_id), None)
        if info is None:
            known = ", ".join(sorted(w.worker_id for w in workers if w.alive)) or "none"
            raise SwitchRefused(f"no worker {worker_id!r}; the workers are {known} (see `pdserve status`)")
        if not info.alive:
            raise SwitchRefused(f"worker {worker_id} is restarting; try again once it is back")
        if worker_id in self._switching:
            raise SwitchRefused(f"worker {worker_id} is already switching to {self._switching[worker_id]}")
        if info.role == role:
            raise SwitchRefused(f"worker {worker_id} already has role {role}")
        try:
            check_not_last(worker_id, info.role, self.serving(info.role), "switching")
        except ActionRefused as e:
            raise SwitchRefused(str(e)) from None
        return info

    def serving(self, role: str) -> list[str]:
        """The ids of the live workers of `role` that take new work (not switching, not drained)."""
        return [
            w.worker_id
            for w in self._workers()
            if w.alive and w.role == role and w.worker_id not in self._switching
            and not (w.load is not None and w.load.drained)
        ]  # fmt: skip

    def switching_to(self, worker_id: str) -> str | None:
        """The role `worker_id` is switching to, if it is switching."""
        return self._switching.get(worker_id)

    # ------------------------------------------------------------------ the planner

    def state(self) -> PlannerState:
        return PlannerState(
            asdict(self.config), self.running, list(self._history), [d.as_dict() for d in self._decisions]
        )

    async def run(self) -> None:
        """The planner's loop (a task of the controller); paused or not, it keeps its rates fresh."""
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.plan_once(time.monotonic())
            except Exception:  # one bad interval must not end the planner
                log.exception("role planner: an interval failed")

    def plan_once(self, now: float) -> Decision | None:
        """One interval: the snapshot, the planner's outcome, and the switch it decides (started)."""
        snapshot = self.snapshot(now)
        if not self.running:
            return None
        outcome = self.planner.plan(snapshot)
        self.metrics.observe(outcome)
        record = DecisionRecord.of(outcome, time.time())
        if isinstance(outcome, Decision) or outcome.pressure_high:
            self._decisions.append(record)
            log.info("%s", record.line())
        if isinstance(outcome, Decision):
            asyncio.get_running_loop().create_task(self._planned(outcome))
            return outcome
        return None

    async def _planned(self, decision: Decision) -> None:
        try:
            await self.switch(decision.worker_id, decision.to_role, decision.reason)
        except SwitchRefused as e:  # the cluster changed since the snapshot
            log.info("role planner: switch of %s refused: %s", decision.worker_id, e)
        except Exception:
            pass  # logged by switch

    def snapshot(self, now: float) -> PlannerSnapshot:
        """The planner's view of the workers now (and the measured prefill rate, updated here)."""
        workers = self._workers()
        self._measure_prefill_rate(workers)
        shots = tuple(self._worker_snapshot(w, now) for w in workers if w.role in PLANNED_ROLES)
        signals = replace(
            self.signals, prefill_tokens_per_s=self._prefill_rate, switch_cost_s=self._switch_cost
        )
        return PlannerSnapshot(now, shots, signals)

    def _worker_snapshot(self, w: WorkerInfo, now: float) -> WorkerSnapshot:
        load = w.load
        last = self._last_switch.get(w.slot)
        return WorkerSnapshot(
            worker_id=w.worker_id,
            role=w.role,
            running=load.num_running if load else 0,
            waiting=load.num_waiting if load else 0,
            queued_prefill_tokens=load.waiting_prefill_tokens if load else 0,
            kv_blocks_free=load.kv_blocks_free if load else 0,
            kv_blocks_total=load.kv_blocks_total if load else 0,
            last_step_s=load.last_step_seconds if load else 0.0,
            kv_blocks_reserved=load.kv_blocks_reserved if load else 0,
            kv_blocks_cached=load.kv_blocks_cached if load else 0,
            switching_to=self._switching.get(w.worker_id),
            restarting=not w.alive or load is None,
            drained=bool(load and load.drained),
            since_switch_s=None if last is None else now - last,
        )

    def _measure_prefill_rate(self, workers: list[WorkerInfo]) -> None:
        """Prompt tokens computed per second of step time on prefill workers, smoothed."""
        for w in workers:
            if w.load is None or w.role != "prefill":
                continue
            tokens, seconds = w.load.prompt_tokens_computed, w.load.step_seconds_total
            before = self._rates.get(w.worker_id)
            self._rates[w.worker_id] = (tokens, seconds)
            if before is None or seconds - before[1] < 0.05 or tokens - before[0] < 64:
                continue  # too little work since the last look to measure
            rate = (tokens - before[0]) / (seconds - before[1])
            self._prefill_rate = rate if self._prefill_rate is None else 0.7 * self._prefill_rate + 0.3 * rate
