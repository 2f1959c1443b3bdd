"""How pressed the prefill and the decode side are, from one snapshot of the cluster's load.

A pressure is a ratio to the side's latency target: 1.0 means the side is just meeting it.

- Prefill: the expected queueing delay of the prompt tokens queued on prefill workers, at the
  measured prefill rate (tokens/s per worker), against `ttft_target`.
- Decode, the largest of:
  - step: the mean step time of busy decode workers against `itl_target` (a step is one token
    for every running request);
  - kv: the KV that decoding requests hold, plus what the requests the router holds for decode
    room would take, against `KV_HIGH_WATER` of the pools;
  - slots: requests waiting in an engine for a batch slot, as demand over what runs;
  - itl: the router's observed ITL p50 against `itl_target`.

A request reserves its decode blocks before its prompt is computed. So blocks reserved for KV
that has not arrived are the prefill side's backlog, not decode load: when prefill is short they
fill the decode pools and requests wait in the router for room while the decode workers idle.
The kv term leaves them out, and counts the router's waiting requests only in the share of the
used decode KV that decoding requests hold, each at the mean size of a decoding request. When
decode is short the queue forms in the router too, where no heartbeat sees it, while step times
still look fine: that is why the router's count is an input.

Each term is summed over the workers that hold the side's load now (including one that is
switching away: its queue or running requests move to the others) and divided by the workers
that will carry it once switches in flight land (serving now, plus those switching in), so a
switch already under way is counted and the planner does not pile on. Restarting workers hold
nothing and carry nothing. Step time is taken to scale with 1/workers, which overstates how much
an added decode worker helps (a step has a fixed part) and how much a removed one hurts; both
errors make switches rarer.

The router's TTFT does not drive the prefill pressure: it mixes prefill queueing with waits for
decode room, so it cannot say which side is short. It travels with every decision as an input.

Plain data and arithmetic only (no Ray, no clock), so the planner and the simulator share it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Decode KV use at which the KV term reaches 1: past ~90% a reservation for a new prompt starts to
# fail and requests wait in the router for room (TTFT grows while the step time still looks fine).
KV_HIGH_WATER = 0.9
PLANNED_ROLES = ("prefill", "decode")  # the roles the planner moves workers between; `both` stays


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker's load at one heartbeat, as the planner reads it."""

    worker_id: str
    role: str  # the role it serves (while switching: the role it is leaving)
    running: int
    waiting: int
    queued_prefill_tokens: int  # prompt tokens queued or partly computed
    kv_blocks_free: int  # free, evictable cached blocks included
    kv_blocks_total: int
    last_step_s: float
    kv_blocks_reserved: int = 0  # set aside for KV on its way here (prompts not computed yet)
    kv_blocks_cached: int = 0  # blocks the prefix cache holds (reusable prompt prefixes)
    switching_to: str | None = None  # set while a switch is under way
    restarting: bool = False
    drained: bool = False  # an operator drained it: it finishes what it holds and takes nothing new
    since_switch_s: float | None = None  # None: never switched

    @property
    def serving(self) -> bool:
        """Whether it serves its role now (not switching, not restarting, not drained)."""
        return self.switching_to is None and not self.restarting and not self.drained

    @property
    def kv_blocks_decoding(self) -> int:
        """Blocks that requests decoding here hold (in use, less those reserved for arrivals)."""
        return max(0, self.kv_blocks_total - self.kv_blocks_free - self.kv_blocks_reserved)


@dataclass(frozen=True)
class RouterSignals:
    """What the router measured over the last interval; None where it has no sample yet."""

    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    prefill_tokens_per_s: float | None = None  # one prefill worker's measured rate
    waiting_for_decode: int = 0  # requests the router holds until a decode worker has room
    switch_cost_s: float | None = None  # the measured duration of recent switches


@dataclass(frozen=True)
class PlannerSnapshot:
    """Everything the planner reads at one interval; `now` is the caller's clock, in seconds."""

    now: float
    workers: tuple[WorkerSnapshot, ...]
    signals: RouterSignals = RouterSignals()


@dataclass(frozen=True)
class SidePressure:
    """One side's pressure (1.0 = at its target), the term that set it, and its workers."""

    side: str
    value: float
    driver: str  # "queue" (prefill), or "step", "kv", "slots", "itl" (decode)
    carriers: int  # workers that will carry the load: serving now plus switching in
    serving: int  # workers serving this role now

    def after(self, delta: int) -> float:
        """The pressure once `delta` workers join (+1) or leave (-1) the side."""
        n = self.carriers + delta
        return self.value * self.carriers / n if n > 0 else float("inf")

    def as_dict(self) -> dict[str, object]:
        return {"value": round(self.value, 4), "driver": self.driver, "carriers": self.carriers}


class NoPrefillRate(ValueError):
    """Prompts are queued but no prefill rate has been measured yet, so their delay is unknown."""


def _counts(snapshot: PlannerSnapshot, role: str) -> tuple[list[WorkerSnapshot], int, int]:
    """(workers holding the role's load, workers serving it, carriers once switches land)."""
    holding = [w for w in snapshot.workers if w.role == role and not w.restarting]
    serving = sum(w.serving for w in holding)
    incoming = sum(w.switching_to == role and not w.restarting for w in snapshot.workers)
    return holding, serving, serving + incoming


def _spread(total: float, carriers: int) -> float:
    if total <= 0:
        return 0.0
    return total / carriers if carriers > 0 else float("inf")


def prefill_pressure(snapshot: PlannerSnapshot, ttft_target_s: float) -> SidePressure:
    """Queued prompt tokens' expected wait at the measured rate, against the TTFT target."""
    holding, serving, carriers = _counts(snapshot, "prefill")
    queued = sum(w.queued_prefill_tokens for w in holding)
    rate = snapshot.signals.prefill_tokens_per_s
    if queued > 0 and not rate:
        raise NoPrefillRate(f"{queued} prompt tokens are queued and no prefill rate is measured yet")
    delay_s = _spread(queued / rate, carriers) if queued > 0 else 0.0
    return SidePressure("prefill", delay_s / ttft_target_s, "queue", carriers, serving)


def _router_waiting_blocks(holding: list[WorkerSnapshot], waiting: int) -> float:
    """The blocks the router's waiting requests would take, in the share decode itself is short
    for (the used KV that decoding requests hold), at a decoding request's mean size."""
    decoding = sum(w.kv_blocks_decoding for w in holding)
    used = sum(w.kv_blocks_total - w.kv_blocks_free for w in holding)
    running = sum(w.running for w in holding)
    if not (waiting and used and running):
        return 0.0
    return waiting * (decoding / used) * (decoding / running)


def decode_pressure(snapshot: PlannerSnapshot, itl_target_s: float) -> SidePressure:
    """The largest of the step, kv, slots and itl terms (see the module doc)."""
    holding, serving, carriers = _counts(snapshot, "decode")
    running = sum(w.running for w in holding)
    kv_blocks = sum(w.kv_blocks_decoding for w in holding)
    kv_blocks += _router_waiting_blocks(holding, snapshot.signals.waiting_for_decode)
    pool = sum(w.kv_blocks_total for w in holding) / len(holding) if holding else 0
    slots_waiting = sum(w.waiting for w in holding)
    slots = (running + slots_waiting) / max(running, 1) * len(holding) if slots_waiting else 0.0
    itl_ms = snapshot.signals.itl_p50_ms
    terms = {
        "step": _spread(sum(w.last_step_s for w in holding if w.running > 0) / itl_target_s, carriers),
        "kv": _spread(kv_blocks / (pool * KV_HIGH_WATER) if pool else 0.0, carriers),
        "slots": _spread(slots, carriers),
        "itl": itl_ms / 1e3 / itl_target_s if itl_ms is not None else 0.0,
    }
    driver = max(terms, key=lambda k: terms[k])
    return SidePressure("decode", terms[driver], driver, carriers, serving)
