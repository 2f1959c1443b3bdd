"""The role planner: once per interval, decides whether to move one worker between prefill and
decode, from the load the heartbeats bring and what the router measured.

Pure: no Ray, no asyncio, no clock. The caller (the controller, or `bench/planner_sim.py`) passes
a `PlannerSnapshot` with the time in it and carries out what `plan` returns: a `Decision` (switch
worker X from A to B, with the reason and the inputs) or a `Hold` (why not).

The pressures come from `cluster/load_pressure.py`. A switch happens only when every rule holds:

1. At most one switch per interval.
2. One side is above its target (pressure > 1), and moving one worker to it leaves it still at
   least `IMBALANCE_MARGIN` times as pressed as the side that gives the worker: so, under the
   same load, the next interval never wants the reverse switch (no flapping from the switch itself).
3. That imbalance has held for `hysteresis` consecutive intervals (short spikes pass).
4. The giving side keeps `min_prefill` / `min_decode` serving workers.
5. Some worker of the giving side is serving (not switching, not restarting) and outside its
   `cooldown_s`.
6. The expected gain beats the cost. The gain is the time the moved worker will serve the
   pressed side: how long the load is expected to keep wanting this direction, less the switch
   itself. The cost is the measured switch time twice (there, and back when the load turns), plus,
   when the load is expected to turn within the worker's `cooldown_s`, the rest of that cooldown,
   which it would spend on the side that needs it less. How long the load keeps one direction is
   read from its last `LoadRegimes` (a regime lasts from the first imbalance one way to the first
   the other way): the mean of what those that lived at least as long as the current one had left
   at its age. With no such history (none yet, or the current one has outlived them all) it is
   taken to last as long again as it already has; for prefill, at least as long as the queued
   prompts take to drain. So an oscillating load teaches the planner that it turns within a
   cooldown, and it stops switching for it, while a load that shifts for good outlives that
   history and is followed.

Of the workers that may go, it picks the cheapest to move: fewest requests to hand over (running
requests migrated off a decode worker, prompts handed back by a prefill worker), then the most
useful prefix cache for the new role (a decode worker's cache holds the prompts it imported,
reusable as prefill prefixes; a prefill worker's cache is lost to prefill, so the smallest goes),
then the lightest. `both` workers are never moved.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field

from pdserve.cluster.load_pressure import (
    PLANNED_ROLES,
    NoPrefillRate,
    PlannerSnapshot,
    SidePressure,
    WorkerSnapshot,
    decode_pressure,
    prefill_pressure,
)

# Rule 2: after a switch the receiving side must stay this much more pressed than the giver.
# 1.25 leaves room for one interval's measurement noise without blocking a switch that a 2x
# imbalance clearly calls for.
IMBALANCE_MARGIN = 1.25
# Until a switch has been measured it is taken to cost this: on the demo model a flip takes
# ~0.25 s (the router sees the new role within its 0.1 s refresh) plus ~20 ms per live-migrated
# request, so ~1.5 s for a decode worker with 60 running requests (docs/DECISIONS.md, 2026-12-05).
DEFAULT_SWITCH_COST_S = 1.5
# How many past load regimes' lifetimes rule 6 remembers: enough to see a period, few enough to
# forget an old pattern after a few turns of the load.
LIFETIME_MEMORY = 8
# Calls closer than this share of an interval after a switch are extra calls, not a new interval.
SAME_INTERVAL_SHARE = 0.5

# Hold reasons (the `reason` label of pdserve_role_planner_holds_total).
BALANCED = "balanced"  # no side above its target: nothing to do
SAME_INTERVAL = "one_switch_per_interval"
NO_PREFILL_RATE = "no_prefill_rate"
NO_SERVING_WORKER = "no_serving_worker"
WOULD_INVERT = "would_invert"
HYSTERESIS = "hysteresis"
AT_MINIMUM = "at_minimum"
COOLDOWN = "cooldown"
GAIN_BELOW_COST = "gain_below_cost"
HOLD_REASONS = (
    BALANCED, SAME_INTERVAL, NO_PREFILL_RATE, NO_SERVING_WORKER, WOULD_INVERT, HYSTERESIS, AT_MINIMUM,
    COOLDOWN, GAIN_BELOW_COST,
)  # fmt: skip


@dataclass(frozen=True)
class RolePlannerConfig:
    """The `role_planner` settings (YAML `role_planner:`, `PDSERVE_ROLE_PLANNER`, `--role-planner`).

    The defaults suit the demo model (one CPU core per worker; docs/DECISIONS.md, 2026-12-05):
    `ttft_target_ms` 500 is ~4,000 queued prompt tokens per prefill worker at its ~8,000 tok/s;
    `itl_target_ms` 50 is a decode step at batch ~140 (2.4 ms + 0.33 ms per request);
    `interval_s` 1 is one controller heartbeat (every decision reads fresh loads; with one switch
    per interval, 64 workers rebalance in about a minute, 2 s took two); `hysteresis` 3 ignores
    imbalances shorter than 3 s (a fresh one with the default switch cost waits 5 s for rule 6);
    `cooldown_s` 30 keeps a moved worker in its new role for many intervals and sets which swings
    are too short to follow; one worker of each role at least keeps both paths alive.
    """

    enabled: bool = True
    interval_s: float = 1.0
    ttft_target_ms: float = 500.0
    itl_target_ms: float = 50.0
    min_prefill: int = 1
    min_decode: int = 1
    cooldown_s: float = 30.0
    hysteresis: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be true or false, got {self.enabled!r}")
        for name in ("interval_s", "ttft_target_ms", "itl_target_ms", "cooldown_s"):
            value = getattr(self, name)
            zero_ok = name == "cooldown_s"
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if value < 0 or (value == 0 and not zero_ok):
                raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")
            object.__setattr__(self, name, float(value))  # frozen: normalised once, while validating
        for name in ("min_prefill", "min_decode", "hysteresis"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Decision:
    """Switch `worker_id` from `from_role` to `to_role`; `reason` names the pressure that asked."""

    worker_id: str
    from_role: str
    to_role: str
    reason: str  # "<side>_<driver>", e.g. "prefill_queue", "decode_kv"
    detail: str
    prefill: SidePressure
    decode: SidePressure
    expected_gain_s: float
    switch_cost_s: float


@dataclass(frozen=True)
class Hold:
    """No switch this interval, and why (one of HOLD_REASONS)."""

    reason: str
    detail: str
    prefill: SidePressure | None = None
    decode: SidePressure | None = None

    @property
    def pressure_high(self) -> bool:
        """Whether a side was above its target: such holds are logged, the others are routine."""
        return any(p is not None and p.value > 1 for p in (self.prefill, self.decode))


@dataclass
class _Streak:
    """How many consecutive intervals one imbalance (a direction: giver -> receiver) has held."""

    direction: tuple[str, str] | None = None
    intervals: int = 0


@dataclass
class LoadRegimes:
    """Since when every imbalance has pointed the same way (balanced intervals in between do not
    end a regime, the opposite imbalance does), and how long the last regimes lasted.

    Rule 6 asks how long the load will keep wanting the current direction. A regime, not an
    imbalance, is the measure: an imbalance also ends when a switch fixes it, so its length says
    more about the planner than about the load, while a regime ends only when the load turns.
    """

    direction: tuple[str, str] | None = None
    started_at: float = 0.0
    lifetimes: deque[float] = field(default_factory=lambda: deque(maxlen=LIFETIME_MEMORY))

    def observe(self, direction: tuple[str, str] | None, now: float, interval_s: float) -> None:
        """Notes this interval's imbalance (None: balanced, or nothing a switch would help)."""
        if direction is None or direction == self.direction:
            return
        start = now - interval_s  # the interval that saw it counts whole
        if self.direction is not None:
            self.lifetimes.append(start - self.started_at)
        self.direction, self.started_at = direction, start

    def expected_remaining_s(self, age_s: float) -> tuple[float, bool]:
        """How much longer a regime of age `age_s` should last, and whether that was learned from
        past regimes (the mean of what those that lived at least as long had left at that age);
        with none, as long again as it has lasted (False)."""
        left = [lifetime - age_s for lifetime in self.lifetimes if lifetime >= age_s]
        return (sum(left) / len(left), True) if left else (age_s, False)


class RolePlanner:
    """Decides one role switch at most per call to `plan`; call it once every `interval_s`."""

    def __init__(self, config: RolePlannerConfig | None = None) -> None:
        self.config = config or RolePlannerConfig()
        self._streak = _Streak()
        self.regimes = LoadRegimes()
        self._last_switch_at: float | None = None

    def plan(self, snapshot: PlannerSnapshot) -> Decision | Hold:
        """The decision for this interval (see the module doc for the rules)."""
        c = self.config
        since = None if self._last_switch_at is None else snapshot.now - self._last_switch_at
        if since is not None and since < SAME_INTERVAL_SHARE * c.interval_s:
            return Hold(SAME_INTERVAL, f"a switch was decided {since:.2f} s ago")
        decode = decode_pressure(snapshot, c.itl_target_ms / 1e3)
        try:
            prefill = prefill_pressure(snapshot, c.ttft_target_ms / 1e3)
        except NoPrefillRate as e:
            self._count(None)
            return Hold(NO_PREFILL_RATE, str(e), decode=decode)
        outcome = self._judge(snapshot, prefill, decode)
        if isinstance(outcome, Decision):
            self._last_switch_at = snapshot.now
        return outcome

    def _judge(
        self, snapshot: PlannerSnapshot, prefill: SidePressure, decode: SidePressure
    ) -> Decision | Hold:
        receiver, giver = (prefill, decode) if prefill.value >= decode.value else (decode, prefill)
        not_wanted = _not_wanted(receiver, giver)
        direction = None if not_wanted else (giver.side, receiver.side)
        self._count(direction)
        self.regimes.observe(direction, snapshot.now, self.config.interval_s)
        minimum = self.config.min_prefill if giver.side == "prefill" else self.config.min_decode
        hold = not_wanted or _cannot_give(receiver, giver, minimum)
        if hold is not None:
            return Hold(*hold, prefill, decode)
        if self._streak.intervals < self.config.hysteresis:
            why = (
                f"{receiver.side} pressure {receiver.value:.2f} has held {self._streak.intervals} of "
                f"{self.config.hysteresis} intervals"
            )
            return Hold(HYSTERESIS, why, prefill, decode)
        candidate = self._candidate(snapshot, giver.side)
        if isinstance(candidate, tuple):
            return Hold(*candidate, prefill, decode)
        return self._weigh(candidate, receiver, giver, snapshot, prefill, decode)

    def _count(self, direction: tuple[str, str] | None) -> None:
        """Extends the current imbalance's streak, or starts another."""
        if direction != self._streak.direction:
            self._streak = _Streak(direction)
        if direction is not None:
            self._streak.intervals += 1

    def _candidate(self, snapshot: PlannerSnapshot, role: str) -> WorkerSnapshot | tuple[str, str]:
        """The cheapest worker of `role` that may switch, or (hold reason, detail)."""
        serving = [w for w in snapshot.workers if w.role == role and w.serving]
        cooldown = self.config.cooldown_s
        free = [w for w in serving if w.since_switch_s is None or w.since_switch_s >= cooldown]
        if not free:
            soonest = cooldown - max(w.since_switch_s or 0.0 for w in serving)
            why = (
                f"every serving {role} worker switched within {cooldown:g} s (one is free in {soonest:.1f} s)"
            )
            return COOLDOWN, why
        return min(free, key=_switch_cost_key)

    def _weigh(
        self,
        worker: WorkerSnapshot,
        receiver: SidePressure,
        giver: SidePressure,
        snapshot: PlannerSnapshot,
        prefill: SidePressure,
        decode: SidePressure,
    ) -> Decision | Hold:
        """Rule 6: switch only when the moved worker's useful time beats the switch's whole cost."""
        switch_s = snapshot.signals.switch_cost_s or DEFAULT_SWITCH_COST_S
        held_s = snapshot.now - self.regimes.started_at
        remaining, learned = self.regimes.expected_remaining_s(held_s)
        if receiver.side == "prefill":  # the queued prompts need the worker at least this long
            remaining = max(remaining, receiver.value * self.config.ttft_target_ms / 1e3)
        gain = remaining - switch_s
        stranded = max(0.0, self.config.cooldown_s - remaining) if learned else 0.0
        cost = 2 * switch_s + stranded
        if gain <= cost:
            why = (
                f"expected gain {gain:.1f} s (held {held_s:g} s, {remaining:.1f} s expected left) does not "
                f"beat the cost {cost:.1f} s (switch {switch_s:.1f} s there and back"
                + (f", {stranded:.1f} s of cooldown on the wrong side)" if stranded else ")")
            )
            return Hold(GAIN_BELOW_COST, why, prefill, decode)
        detail = (
            f"{receiver.side} pressure {receiver.value:.2f} ({receiver.driver}) vs {giver.side} "
            f"{giver.value:.2f}, held {held_s:g} s; after the switch {receiver.after(+1):.2f} vs "
            f"{giver.after(-1):.2f}; {worker.running} running, {worker.waiting} waiting to move"
        )
        return Decision(
            worker.worker_id, giver.side, receiver.side, f"{receiver.side}_{receiver.driver}", detail,
            prefill, decode, round(gain, 3), switch_s,
        )  # fmt: skip


def _not_wanted(receiver: SidePressure, giver: SidePressure) -> tuple[str, str] | None:
    """(reason, detail) when the load does not call for a switch from `giver` to `receiver` (rule 2)."""
    if receiver.value <= 1:
        return BALANCED, f"prefill/decode pressures are at or below target (highest {receiver.value:.2f})"
    if giver.carriers >= 2 and giver.after(-1) * IMBALANCE_MARGIN > receiver.after(+1):
        return WOULD_INVERT, (
            f"moving a {giver.side} worker would leave {giver.side} at {giver.after(-1):.2f} against "
            f"{receiver.side} at {receiver.after(+1):.2f}"
        )
    return None


def _cannot_give(receiver: SidePressure, giver: SidePressure, minimum: int) -> tuple[str, str] | None:
    """(reason, detail) when the load calls for a switch but the workers cannot make it (rule 4)."""
    for side in (receiver, giver):
        if side.carriers == 0:
            return NO_SERVING_WORKER, f"no {side.side} worker is serving (restarting?)"
    if giver.serving - 1 < minimum:
        return AT_MINIMUM, f"{giver.side} has {giver.serving} serving worker(s) and keeps at least {minimum}"
    return None


def _switch_cost_key(w: WorkerSnapshot) -> tuple:
    """Cheapest first: fewest requests to hand over, then the most useful prefix cache, then the lightest."""
    if w.role == "decode":  # to prefill: its cached prompts are prefixes a prefill worker reuses
        return (w.running + w.waiting, -w.kv_blocks_cached, w.kv_blocks_decoding, w.worker_id)
    return (w.running + w.waiting, w.queued_prefill_tokens, w.kv_blocks_cached, w.worker_id)


@dataclass(frozen=True)
class DecisionRecord:
    """One entry of the planner's decision log (a switch, or a hold while a side was above target),
    as `pdserve status` shows it; `duration_s` is filled in when the switch finishes."""

    at: float  # seconds since the epoch
    kind: str  # "switch" | "hold"
    reason: str
    detail: str
    prefill: dict[str, object] | None
    decode: dict[str, object] | None
    worker_id: str | None = None
    from_role: str | None = None
    to_role: str | None = None
    switch_cost_s: float | None = None
    duration_s: float | None = None

    @classmethod
    def of(cls, outcome: Decision | Hold, at: float) -> DecisionRecord:
        """The log entry of one `plan` outcome at wall-clock time `at`."""
        sides = {s: getattr(outcome, s).as_dict() if getattr(outcome, s) else None for s in PLANNED_ROLES}
        if isinstance(outcome, Hold):
            return cls(at, "hold", outcome.reason, outcome.detail, **sides)
        return cls(
            at, "switch", outcome.reason, outcome.detail, **sides, worker_id=outcome.worker_id,
            from_role=outcome.from_role, to_role=outcome.to_role, switch_cost_s=outcome.switch_cost_s,
        )  # fmt: skip

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        """One log line with the inputs."""
        p = f"prefill {self.prefill['value']:.2f}" if self.prefill else "prefill ?"
        d = f"decode {self.decode['value']:.2f}" if self.decode else "decode ?"
        head = (
            f"switch {self.worker_id} {self.from_role}->{self.to_role}" if self.kind == "switch" else "hold"
        )
        return f"role planner: {head} ({self.reason}): {p}, {d}: {self.detail}"
