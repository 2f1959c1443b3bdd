"""The `Controller` Ray actor: the worker pool, its health, and what the router asks about it.

It starts the configured workers, polls each one's load every `heartbeat_interval_s` (the poll
is the heartbeat), declares a worker dead when it errors or misses `heartbeat_timeout_s`, kills
what is left of it, has the live workers close their KV channels with it, and starts a
replacement under a new worker id, so KV channels and prefix index entries of the old
incarnation are never mistaken for the new one's. A replacement loads in the background: the
dead worker leaves `workers()` at once, nobody (the heartbeat, a router reporting a failure)
waits for the replacement, and it joins `workers()` with its first load report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field, replace

from prometheus_client import CollectorRegistry, generate_latest

from pdserve.cluster.expert_parallel_workers import ExpertParallelWorkers
from pdserve.cluster.load_pressure import RouterSignals
from pdserve.cluster.operator_actions import (
    ActionRefused,
    ClusterEvent,
    ClusterOverview,
    EventLog,
    WorkerStatus,
    check_not_last,
    slot_state,
)
from pdserve.cluster.planner import DecisionRecord, RolePlannerConfig
from pdserve.cluster.role_switching import PlannerState, RoleSwitcher, SwitchRecord, SwitchRefused
from pdserve.engine import EngineConfig
from pdserve.engine.expert_parallel.config import ExpertParallelConfig
from pdserve.engine.served_model import ServedModel
from pdserve.roles.handoff import WorkerRef
from pdserve.roles.kv_transfer import Endpoint
from pdserve.roles.messages import ROLES, WorkerLoad
from pdserve.roles.worker import start_worker

log = logging.getLogger(__name__)

CONTROLLER_NAME = "pdserve-controller"
# How long startup_phases waits for one worker's answer before calling it "starting".
STARTUP_PHASE_WAIT_S = 0.3
# How often a router's waiting `workers_changed` call looks for a change (in memory, no calls).
WATCH_EVERY_S = 0.05


@dataclass
class ControllerConfig:
    """What to run: the engine every worker hosts and how many workers of each role."""

    engine: EngineConfig
    prefill: int = 1
    decode: int = 1
    both: int = 0
    kv_backend: str | None = None  # None: nccl on GPUs, gloo otherwise
    worker_num_cpus: float = 1
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0  # a step of a big batch must not look like death
    restart_dead: bool = True
    # Where workers' KV transports listen: loopback for a cluster on one machine, None (each
    # worker's node address) when `up` joins a Ray cluster that may span machines.
    kv_host: str | None = "127.0.0.1"
    # The role planner's settings (cluster/planner.py); the controller runs it (role_switching.py).
    role_planner: RolePlannerConfig = field(default_factory=RolePlannerConfig)
    # The roles whose slots run `engine.expert_parallel` as groups; the others' workers are plain
    # engines. A slot keeps its kind through role switches and restarts (expert_parallel_workers.py).
    expert_parallel_roles: tuple[str, ...] = ROLES
    # Cores of their own for some slots (core_plan.py, set by `pdserve up`); the others run where
    # the OS puts them. A slot keeps its cores through role switches and restarts.
    slot_cores: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role in ROLES:
            if getattr(self, role) < 0:
                raise ValueError(f"{role} must be >= 0 workers, got {getattr(self, role)}")
        if self.prefill + self.decode + self.both == 0:
            raise ValueError("start at least one worker (--prefill, --decode or --both)")
        if (self.prefill == 0) != (self.decode == 0):
            raise ValueError("prefill and decode workers come together; use --both N for colocated serving")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("need 0 < heartbeat_interval_s < heartbeat_timeout_s")
        # Checks the roles (a typo named); frozen, so a YAML list reads as a tuple.
        self.expert_parallel_roles = self.slot_kinds().roles

    def slots(self) -> list[tuple[str, str]]:
        """(slot name, role it starts in) for every worker, in start order: "prefill-0", ..."""
        return [(f"{role}-{i}", role) for role in ROLES for i in range(getattr(self, role))]

    def slot_kinds(self) -> ExpertParallelWorkers:
        """Which slots run `engine.expert_parallel` as a group."""
        return ExpertParallelWorkers(self.engine.expert_parallel, self.expert_parallel_roles)

    def slot_engine(self, slot_role: str) -> EngineConfig:
        """The engine of a slot started in `slot_role`: the group's, or a plain one."""
        if self.slot_kinds().runs_group(slot_role):
            return self.engine
        return replace(self.engine, expert_parallel=ExpertParallelConfig())


@dataclass
class WorkerList:
    """The live workers (`Controller.workers`) as of `version`, which changes with any of them."""

    version: int
    workers: list[WorkerInfo]


@dataclass
class WorkerInfo:
    """One worker as the controller sees it."""

    worker_id: str
    slot: str  # stable name of the position in the pool ("decode-0"); ids change on restart
    role: str
    handle: object
    endpoint: Endpoint
    load: WorkerLoad | None = None
    alive: bool = True
    restarts: int = 0
    last_heartbeat: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)  # wall clock, when it was ready

    def ref(self) -> WorkerRef:
        """What the request path needs to call this worker and open KV channels to it."""
        return WorkerRef(self.worker_id, self.handle, self.endpoint)


class Controller:
    """Owns the workers; wrap with `ray.remote` (see `start_controller`)."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self._workers: dict[str, WorkerInfo] = {}  # by slot
        self._heartbeat: asyncio.Task | None = None
        self._started = False
        self._served_model: ServedModel | None = None  # what the first ready worker reported
        self._starting: dict[str, object] = {}  # worker id -> handle, until the worker is ready
        self._restarting: dict[str, asyncio.Task] = {}  # slot -> handling its death (see _after_death)
        self.registry = CollectorRegistry()  # the controller's own metrics (the role switches')
        self.switcher = RoleSwitcher(lambda: list(self._workers.values()), config.role_planner, self.registry)
        self._planner: asyncio.Task | None = None
        self.events = EventLog()  # deaths, restarts, drains, operator actions (operator_actions.py)
        self._version, self._fingerprint = 0, ()  # of the live workers, for `workers_changed`
        self._slot_engines: dict[str, EngineConfig] = {}  # what each slot's worker hosts (see start)

    async def start(self) -> list[WorkerInfo]:
        """Starts every worker and waits until each has loaded its model."""
        if not self._started:
            slots = self.config.slots()
            # By the role a slot starts in, kept through switches and restarts.
            self._slot_engines = {slot: self.config.slot_engine(role) for slot, role in slots}
            infos = await asyncio.gather(*(self._launch(slot, role, 0) for slot, role in slots))
            self._workers = {info.slot: info for info in infos}
            self._started = True
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
            self._planner = asyncio.get_running_loop().create_task(self.switcher.run())
        return await self.workers()

    async def workers(self, role: str | None = None) -> list[WorkerInfo]:
        """Live workers (optionally of one role) with their latest load (never None)."""
        return [w for w in self._workers.values() if w.alive and (role is None or w.role == role)]

    async def workers_changed(self, version: int, wait_s: float) -> WorkerList:
        """The live workers once they differ from `version` (a worker came, went, changed role
        or reported a load), or after `wait_s` if nothing changed: a router waits here instead
        of polling the controller (docs/DECISIONS.md, 2026-12-06)."""
        deadline = time.monotonic() + wait_s
        while self._current_version() == version and time.monotonic() < deadline:
            await asyncio.sleep(WATCH_EVERY_S)
        return WorkerList(self._current_version(), await self.workers())

    def _current_version(self) -> int:
        # The fields `workers()` callers read; each load report is a new object (compared by value).
        fingerprint = tuple((w.slot, w.worker_id, w.role, w.alive, w.load) for w in self._workers.values())
        if fingerprint != self._fingerprint:
            self._version, self._fingerprint = self._version + 1, fingerprint
        return self._version

    async def served_model(self) -> ServedModel:
        """The served model's limits as the workers' engines computed them (after `start`)."""
        if self._served_model is None:
            raise RuntimeError("no worker is ready yet; call start() first")
        return self._served_model

    async def startup_phases(self) -> dict[str, str]:
        """What each worker that is not ready yet is doing, by worker id (for a progress line).

        A worker whose process Ray has not started yet (or that is busy importing) cannot answer
        in time and reads "starting".
        """
        starting = list(self._starting.items())

        async def phase(handle) -> str:
            try:
                return await asyncio.wait_for(handle.startup_phase.remote(), STARTUP_PHASE_WAIT_S)
            except Exception:  # not scheduled yet, still importing, or gone: the launch reports why
                return "starting"

        phases = await asyncio.gather(*(phase(handle) for _, handle in starting))
        return {worker_id: p for (worker_id, _), p in zip(starting, phases, strict=True)}

    async def set_role(
        self, worker_id: str, role: str, reason: str = "manual", requested_by: str = ""
    ) -> SwitchRecord:
        """Switches a worker's role in place (see `RoleSwitcher.switch`); SwitchRefused says why not."""
        return await self.switcher.switch(worker_id, role, reason, requested_by)

    async def planner(self, action: str = "status", requested_by: str = "") -> PlannerState:
        """Pauses ("pause") or resumes ("resume") the role planner; its state either way."""
        if action not in ("pause", "resume", "status"):
            raise SwitchRefused(f"planner action must be pause, resume or status, got {action!r}")
        if action != "status":
            self.switcher.running = action == "resume"
            log.info("role planner %s by %s", "resumed" if self.switcher.running else "paused", requested_by)
            self.events.add("planner", "", f"role planner {action}d", requested_by)
        return self.switcher.state()

    async def drain(self, worker_id: str, drained: bool = True, requested_by: str = "") -> str:
        """Drains a worker (it takes no new work and finishes what it holds) or undrains it; one
        line saying what happened. ActionRefused for an unknown worker, or the last of its role."""
        info = self._operable(worker_id)
        if drained:
            check_not_last(worker_id, info.role, self.switcher.serving(info.role), "draining")
        was = await info.handle.drain.remote(drained)
        if info.load is not None:  # placement sees it before the next heartbeat
            info.load = replace(info.load, drained=drained)
        action = "drain" if drained else "undrain"
        text = f"{worker_id} {'was already' if was == drained else 'is now'} {'drained' if drained else 'serving'}"
        self.events.add(action, worker_id, text, requested_by)
        log.info("%s (by %s)", text, requested_by)
        return text

    async def restart(self, worker_id: str, requested_by: str = "") -> str:
        """Kills a worker and starts a replacement in its slot (the path a death takes); its requests
        continue on other workers. ActionRefused for an unknown worker, or the last of its role."""
        info = self._operable(worker_id)
        check_not_last(worker_id, info.role, self.switcher.serving(info.role), "restarting")
        info.alive = False
        text = f"{worker_id} restarting on an operator's request; its replacement loads in the background"
        self.events.add("restart", worker_id, text, requested_by)
        log.warning("%s (by %s)", text, requested_by)
        self._in_background(info.slot, self._after_death(info))
        return text

    async def overview(self) -> ClusterOverview:
        """Every slot with its state, the event log (switches and planner decisions included) and
        the settings, for the operator dashboard."""
        now = time.time()
        workers = [
            WorkerStatus(
                w.worker_id, w.slot, w.role,
                slot_state(w.alive, self.config.restart_dead, self.switcher.switching_to(w.worker_id), w.role,
                           w.load),
                w.alive, w.restarts, now - w.started_at if w.alive else 0.0, w.load if w.alive else None,
            )
            for w in self._workers.values()
        ]  # fmt: skip
        state = self.switcher.state()
        events = self.events.events() + [_switch_event(s) for s in state.switches]
        events += [_decision_event(d) for d in state.decisions]
        return ClusterOverview(sorted(workers, key=lambda w: w.slot), sorted(events, key=lambda e: e.at),
                               state.running, self._settings())  # fmt: skip

    def _settings(self) -> dict[str, object]:
        """The served model as the engines computed it, and how the pool runs (JSON-ready)."""
        served = asdict(self._served_model) if self._served_model is not None else {}
        served.pop("tokenizer_path", None)  # a path on the server's disk, not an operator's concern
        return {
            "model": served,
            "device": self.config.engine.device,
            "workers": {role: getattr(self.config, role) for role in ROLES},
            "expert_parallel": self.config.slot_kinds().as_mapping(),
            "role_planner": asdict(self.config.role_planner),
            "restart_dead": self.config.restart_dead,
        }

    async def report_router_signals(self, signals: RouterSignals) -> None:
        """The router's recent latencies and requests waiting for decode room (the planner reads them)."""
        self.switcher.signals = signals

    async def metrics_text(self) -> str:
        """The controller's Prometheus metrics (role switches and the planner), text exposition."""
        return generate_latest(self.registry).decode()

    async def report_failure(self, worker_id: str) -> bool:
        """The router saw a call to this worker fail: check it now instead of at the next beat.

        Returns whether it is alive, once that is known; it never waits for a replacement.
        """
        info = next((w for w in self._workers.values() if w.worker_id == worker_id), None)
        if info is not None and info.alive:
            await self._check(info)
        return info is not None and info.alive

    async def shutdown(self) -> None:
        """Stops the heartbeat and kills every worker."""
        import ray

        for task in (self._heartbeat, self._planner):
            if task is not None:
                task.cancel()
        for task in list(self._restarting.values()):
            task.cancel()
        for handle in list(self._starting.values()):  # replacements still loading
            ray.kill(handle)
        for info in self._workers.values():
            ray.kill(info.handle)
            info.alive = False

    # ------------------------------------------------------------------ internals

    def _by_id(self, worker_id: str) -> WorkerInfo:
        for info in self._workers.values():
            if info.worker_id == worker_id and info.alive:
                return info
        raise KeyError(f"no live worker {worker_id!r}")

    def _operable(self, worker_id: str) -> WorkerInfo:
        """The live worker an operator names, not in the middle of a switch; ActionRefused if none."""
        try:
            info = self._by_id(worker_id)
        except KeyError:
            known = ", ".join(sorted(w.worker_id for w in self._workers.values() if w.alive)) or "none"
            raise ActionRefused(f"no live worker {worker_id!r}; the workers are {known}") from None
        if self.switcher.switching_to(worker_id) is not None:
            raise ActionRefused(f"worker {worker_id} is switching role; try again once it is done")
        return info

    async def _launch(self, slot: str, role: str, restarts: int) -> WorkerInfo:
        worker_id = slot if restarts == 0 else f"{slot}.r{restarts}"
        handle = start_worker(
            worker_id, self._slot_engines[slot], role, self.config.kv_backend, num_cpus=self.config.worker_num_cpus,
            host=self.config.kv_host, cores=self.config.slot_cores.get(slot),
        )  # fmt: skip
        self._starting[worker_id] = handle
        try:
            endpoint = await handle.ready.remote()
            served = await handle.served_model.remote()
            load = await handle.load.remote()  # listed with a load, so placement can weigh it at once
        finally:
            del self._starting[worker_id]
        if self._served_model is None:
            self._served_model = served
        elif served != self._served_model:  # every worker hosts the same engine config
            raise RuntimeError(f"worker {worker_id} serves {served}, unlike the others' {self._served_model}")
        log.info("worker %s up as %s", worker_id, role)
        return WorkerInfo(worker_id, slot, role, handle, endpoint, load=load, restarts=restarts)

    async def _heartbeat_loop(self) -> None:
        while True:
            workers = list(self._workers.values())
            await asyncio.gather(*(self._check(w) for w in workers if w.alive))
            for dead in workers:  # a replacement whose launch failed is tried again
                if not dead.alive and self.config.restart_dead and dead.slot not in self._restarting:
                    self._in_background(dead.slot, self._replace(dead))
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def _check(self, info: WorkerInfo) -> None:
        try:
            info.load = await asyncio.wait_for(info.handle.load.remote(), self.config.heartbeat_timeout_s)
            info.last_heartbeat = time.monotonic()
            return
        except asyncio.TimeoutError:
            why = f"no heartbeat for {self.config.heartbeat_timeout_s} s"
        except Exception as e:  # RayActorError and friends: the process is gone
            # A worker whose engine stopped (an expert-parallel group lost a rank) raises from
            # `load`; Ray's wrapper starts with the call's name, its cause says what happened.
            cause = getattr(e, "cause", None) or e
            why = f"{type(cause).__name__}: {cause}".splitlines()[0]
        if not info.alive:
            return
        info.alive = False
        log.warning("worker %s is dead (%s)", info.worker_id, why)
        self.events.add("death", info.worker_id, f"{info.worker_id} is dead ({why})")
        self._in_background(info.slot, self._after_death(info))

    def _in_background(self, slot: str, work: Coroutine[object, object, None]) -> None:
        """Runs a dead slot's handling without anyone (heartbeat, a router's report) waiting on it."""
        task = asyncio.get_running_loop().create_task(work)
        self._restarting[slot] = task
        task.add_done_callback(lambda _: self._restarting.pop(slot, None))

    async def _after_death(self, dead: WorkerInfo) -> None:
        """Kills what is left of a dead worker, closes the live ones' KV channels with it, replaces it."""
        import ray

        ray.kill(dead.handle)  # a hung worker must not come back half-alive
        live = [w for w in self._workers.values() if w.alive]
        await asyncio.gather(
            *(w.handle.close_peer.remote(dead.worker_id) for w in live), return_exceptions=True
        )
        if self.config.restart_dead:
            await self._replace(dead)

    async def _replace(self, dead: WorkerInfo) -> None:
        try:
            fresh = await self._launch(dead.slot, dead.role, dead.restarts + 1)
        except Exception as e:
            log.exception("restarting %s failed; will retry at the next heartbeat", dead.slot)
            self.events.add(
                "restart", dead.worker_id, f"restarting {dead.slot} failed: {str(e).splitlines()[0][:200]}"
            )
            self._workers[dead.slot] = replace(dead, alive=False, restarts=dead.restarts + 1)
            return
        self._workers[dead.slot] = fresh
        self.events.add(
            "restart", fresh.worker_id, f"{fresh.worker_id} replaced {dead.worker_id} in {dead.slot}"
        )


def _switch_event(s: SwitchRecord) -> ClusterEvent:
    kind = "switch" if s.error is None else "switch_failed"
    return ClusterEvent(s.at, kind, s.worker_id, s.line(), s.requested_by)


def _decision_event(d: dict[str, object]) -> ClusterEvent:
    record = DecisionRecord(**d)  # type: ignore[arg-type]
    return ClusterEvent(record.at, "planner", record.worker_id or "", record.line())


def start_controller(config: ControllerConfig, name: str = CONTROLLER_NAME, detached: bool = False):
    """Starts the controller actor (named, so the router and `pdserve status` can find it)."""
    import ray

    options = {"name": name, "max_concurrency": 1000, "num_cpus": 0}
    if detached:
        options["lifetime"] = "detached"
    return ray.remote(Controller).options(**options).remote(config)
