"""What operators see and do beyond role switches: the cluster's event log, a worker slot's
state, and the overview the controller gives the router (plain data: it crosses to the router).

The controller records an event for each death, restart, drain and operator action; role
switches and the planner's decisions keep their own records (`SwitchRecord`, `DecisionRecord`)
and join the log as events when the controller builds the overview.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.cluster.load_pressure import PLANNED_ROLES
from pdserve.roles.messages import WorkerLoad

# How many events the overview can show.
EVENTS_KEPT = 200
# A worker slot's states, as the dashboard and `pdserve status` name them.
STATES = ("serving", "draining", "switching", "migrating", "restarting", "dead")


class ActionRefused(ValueError):
    """An operator action that may not happen now (the message says why and what to do)."""


@dataclass
class ClusterEvent:
    """Something that happened to the cluster, for the operator's event log."""

    at: float  # wall clock
    kind: str  # switch, planner, death, restart, drain, undrain, policy, index, ...
    worker_id: str
    text: str
    requested_by: str = ""  # who asked, for operator actions


class EventLog:
    """The latest `EVENTS_KEPT` events, oldest first."""

    def __init__(self) -> None:
        self._events: deque[ClusterEvent] = deque(maxlen=EVENTS_KEPT)

    def add(self, kind: str, worker_id: str, text: str, requested_by: str = "") -> ClusterEvent:
        event = ClusterEvent(time.time(), kind, worker_id, text, requested_by)
        self._events.append(event)
        return event

    def events(self) -> list[ClusterEvent]:
        return list(self._events)


@dataclass
class WorkerStatus:
    """One slot of the pool as the overview shows it."""

    worker_id: str
    slot: str
    role: str
    state: str  # one of STATES
    alive: bool
    restarts: int
    uptime_s: float
    load: WorkerLoad | None  # its last report (None while it restarts)


@dataclass
class ClusterOverview:
    """The controller's part of the operator dashboard."""

    workers: list[WorkerStatus]
    events: list[ClusterEvent]  # oldest first: the controller's, switches and planner decisions
    planner_running: bool
    settings: dict[str, object] = field(default_factory=dict)


def slot_state(alive: bool, restart_dead: bool, switching_to: str | None, role: str, load) -> str:
    """A slot's state: a dead worker is restarting (or dead, without restarts), a switching decode
    worker migrates its requests, a drained one drains."""
    if not alive:
        return "restarting" if restart_dead else "dead"
    if switching_to is not None:
        return "migrating" if role == "decode" else "switching"
    if load is not None and load.drained:
        return "draining"
    return "serving"


def check_not_last(worker_id: str, role: str, serving_of_role: list[str], action: str) -> None:
    """ActionRefused when `worker_id` is the last serving worker of a planned role (prefill or
    decode): `action` would leave that role with none."""
    if role in PLANNED_ROLES and [w for w in serving_of_role if w != worker_id] == []:
        raise ActionRefused(
            f"worker {worker_id} is the last {role} worker in service; {action} it would leave none "
            f"(add one first, or switch another worker to {role})"
        )
