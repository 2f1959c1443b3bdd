"""The role planner on synthetic load traces: a toy cluster whose loads follow a trace and whose
roles follow the planner's decisions, one interval at a time; no Ray, no clock.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from prometheus_client import CollectorRegistry

from pdserve.cluster import planner as rp
from pdserve.cluster.load_pressure import PlannerSnapshot, RouterSignals, WorkerSnapshot, decode_pressure
from pdserve.cluster.planner import Decision, DecisionRecord, Hold, RolePlanner, RolePlannerConfig
from pdserve.cluster.planner_metrics import RolePlannerMetrics

RATE = 8000.0  # prefill tokens/s per worker (the demo model on one core)
CONFIG = RolePlannerConfig()  # interval 2 s, TTFT 500 ms, ITL 50 ms, hysteresis 3, cooldown 30 s
BLOCKS = 2048
S = CONFIG.interval_s
# The first interval (from 0) at which the defaults switch for a fresh, lasting imbalance: once it
# has held `hysteresis` intervals and (rule 6, no history yet) held > 3x the default switch cost.
FIRST = max(CONFIG.hysteresis, math.floor(3 * rp.DEFAULT_SWITCH_COST_S / S) + 1) - 1


def intervals(seconds: float) -> int:
    return round(seconds / S)


def step_s(running: int) -> float:
    """The demo model's decode step on one core: 2.4 ms + 0.33 ms per running request."""
    return 0.0024 + 0.00033 * running if running else 0.0


@dataclass
class Load:
    """The cluster's demand at one interval: prompt tokens queued, requests decoding."""

    queued: int
    running: int


def prefill_heavy(pressure: float = 3.0, prefill_workers: int = 2) -> Load:
    """Queued tokens that put `prefill_workers` at `pressure`, and a light decode load."""
    return Load(int(pressure * CONFIG.ttft_target_ms / 1e3 * RATE * prefill_workers), 20)


@dataclass
class ToyCluster:
    """Workers whose loads follow the trace evenly (the first ones take the remainder) and whose
    roles follow the planner: a decided switch is under way for one interval, then lands."""

    roles: dict[str, str]
    since_switch: dict[str, float] = field(default_factory=dict)
    switching: dict[str, str] = field(default_factory=dict)
    switches: list[tuple[int, Decision]] = field(default_factory=list)
    outcomes: list[Decision | Hold] = field(default_factory=list)

    @classmethod
    def of(cls, prefill: int, decode: int) -> ToyCluster:
        roles = {f"prefill-{i}": "prefill" for i in range(prefill)}
        return cls({**roles, **{f"decode-{i}": "decode" for i in range(decode)}})

    def count(self, role: str) -> int:
        return sum(r == role and w not in self.switching for w, r in self.roles.items())

    def snapshot(self, now: float, load: Load, **overrides) -> PlannerSnapshot:
        shares = {role: self._shares(role, load) for role in ("prefill", "decode")} | {"both": {}}
        workers = []
        for wid, role in self.roles.items():
            share = shares[role].get(wid, 0)
            running = share if role == "decode" else 0
            workers.append(
                WorkerSnapshot(
                    worker_id=wid, role=role, running=running, waiting=0,
                    queued_prefill_tokens=share if role == "prefill" else 0,
                    kv_blocks_free=BLOCKS - 4 * running, kv_blocks_total=BLOCKS, last_step_s=step_s(running),
                    switching_to=self.switching.get(wid), since_switch_s=self.since_switch.get(wid),
                    **overrides.get(wid, {}),
                )
            )  # fmt: skip
        return PlannerSnapshot(now, tuple(workers), RouterSignals(prefill_tokens_per_s=RATE))

    def _shares(self, role: str, load: Load) -> dict[str, int]:
        # Workers switching away keep their load until it moves; those switching in have none yet.
        holders = [w for w, r in self.roles.items() if r == role]
        total = load.queued if role == "prefill" else load.running
        return {w: total // len(holders) + (i < total % len(holders)) for i, w in enumerate(holders)}

    def run(self, planner: RolePlanner, trace: list[Load]) -> None:
        """One `plan` per interval over the trace, carrying out every decision."""
        for i, load in enumerate(trace):
            for wid, role in self.switching.items():  # last interval's switch lands
                self.roles[wid], self.since_switch[wid] = role, 0.0
            self.switching.clear()
            outcome = planner.plan(self.snapshot(i * planner.config.interval_s, load))
            self.outcomes.append(outcome)
            if isinstance(outcome, Decision):
                assert outcome.from_role == self.roles[outcome.worker_id]
                self.switching[outcome.worker_id] = outcome.to_role
                self.switches.append((i, outcome))
            self.since_switch = {w: s + planner.config.interval_s for w, s in self.since_switch.items()}

    def holds(self) -> Counter:
        return Counter(o.reason for o in self.outcomes if isinstance(o, Hold))


def test_sustained_prefill_load_moves_the_cheapest_decode_worker_to_prefill():
    cluster = ToyCluster.of(2, 2)
    cluster.run(RolePlanner(), [prefill_heavy(3.0)] * 20)
    [(i, d)] = cluster.switches
    # Decided as soon as the rules allow; decode-0 holds 10 running, so does decode-1, and the tie
    # goes to the lower id (fewest running requests first).
    assert i == FIRST
    assert (d.worker_id, d.from_role, d.to_role, d.reason) == (
        "decode-0",
        "decode",
        "prefill",
        "prefill_queue",
    )
    assert d.prefill.value == pytest.approx(3.0, rel=1e-3) and d.decode.value < 1
    assert d.expected_gain_s > 2 * d.switch_cost_s
    assert cluster.count("prefill") == 3 and cluster.count("decode") == 1
    # Then the last decode worker must stay: high pressure, held at the minimum, and said so.
    later = cluster.outcomes[i + 1 :]
    assert all(isinstance(o, Hold) and o.pressure_high for o in later)
    assert {o.reason for o in later[1:]} == {rp.AT_MINIMUM}


def test_sustained_decode_load_moves_a_prefill_worker_to_decode():
    cluster = ToyCluster.of(2, 2)
    cluster.run(RolePlanner(), [Load(queued=2000, running=600)] * 20)  # steps of 101 ms at 300 each
    [(i, d)] = cluster.switches
    assert i == FIRST
    assert (d.from_role, d.to_role, d.reason) == ("prefill", "decode", "decode_step")
    assert d.decode.value == pytest.approx(step_s(300) / 0.05, rel=1e-3)
    assert cluster.count("decode") == 3


def test_a_big_shift_moves_one_worker_per_interval_until_the_split_fits():
    cluster = ToyCluster.of(8, 8)
    cluster.run(RolePlanner(), [prefill_heavy(4.0, prefill_workers=8)] * 40)
    steps = [i for i, _ in cluster.switches]
    assert len(steps) == len(set(steps)) >= 4  # never two in one interval
    assert {(d.from_role, d.to_role) for _, d in cluster.switches} == {("decode", "prefill")}
    # It stops where one more switch would leave decode the more pressed side, or at the minimum.
    assert cluster.outcomes[-1].reason in (rp.WOULD_INVERT, rp.AT_MINIMUM)
    assert cluster.count("decode") >= CONFIG.min_decode


def test_steady_balanced_load_never_switches():
    rng = random.Random(0)
    cluster = ToyCluster.of(4, 4)
    # Pressures wander between ~0.3 and ~0.9 on both sides.
    trace = [Load(rng.randint(5_000, 14_000), rng.randint(100, 500)) for _ in range(500)]
    cluster.run(RolePlanner(), trace)
    assert cluster.switches == [] and cluster.holds() == Counter({rp.BALANCED: 500})


def test_load_above_target_on_both_sides_never_switches():
    cluster = ToyCluster.of(2, 2)
    cluster.run(RolePlanner(), [Load(queued=24_000, running=800)] * 50)  # prefill 3.0, decode 2.7
    assert cluster.switches == [] and set(cluster.holds()) == {rp.WOULD_INVERT}


def test_spikes_shorter_than_hysteresis_never_switch():
    calm, spike = Load(4_000, 100), prefill_heavy(5.0)
    trace = [spike if i % 10 < CONFIG.hysteresis - 1 else calm for i in range(300)]
    cluster = ToyCluster.of(2, 2)
    cluster.run(RolePlanner(), trace)
    assert cluster.switches == []
    assert cluster.holds()[rp.HYSTERESIS] == 60  # every spike interval is a "no", with its reason


PROMPTS = prefill_heavy(3.0, prefill_workers=4)
ANSWERS = Load(queued=2_000, running=1_200)  # 300 running per decode worker of 4: pressure 2.0


def oscillating(half: int, intervals: int, first: Load = PROMPTS, then: Load = ANSWERS) -> list[Load]:
    return [first if (i // half) % 2 == 0 else then for i in range(intervals)]


@pytest.mark.parametrize("swing_s", [4, 8, 10, 14, 20])
def test_an_oscillating_load_does_not_flap(swing_s):
    """Load swings between prompt-heavy and decode-heavy every `swing_s` for 20 minutes: each
    swing from 8 s on passes hysteresis and the first gain test, none lasts a cooldown (30 s)."""
    half = intervals(swing_s)
    cluster = ToyCluster.of(4, 4)
    cluster.run(RolePlanner(), oscillating(half, intervals(1200)))
    # Before it has seen the load turn it follows the first swing, as it would a lasting shift;
    # from then on it knows the load turns within a cooldown and holds, saying why.
    assert all(i < half for i, _ in cluster.switches), cluster.switches
    assert cluster.holds()[rp.GAIN_BELOW_COST] > 100


def test_swings_longer_than_a_cooldown_are_followed():
    half = intervals(50)
    cluster = ToyCluster.of(4, 4)
    cluster.run(RolePlanner(), oscillating(half, 12 * half))
    directions = [(i // half, d.to_role) for i, d in cluster.switches]
    # Every swing after the first is answered, in its direction, within its first 10 s.
    for swing in range(1, 12):
        wanted = "prefill" if swing % 2 == 0 else "decode"
        answered = [i for i, d in cluster.switches if i // half == swing]
        assert answered and min(answered) - swing * half < intervals(10), (swing, directions)
        assert all(d.to_role == wanted for i, d in cluster.switches if i // half == swing)


def test_after_oscillating_a_lasting_shift_is_still_followed():
    half = intervals(10)
    shift = 19 * half  # after 19 swings of 10 s, the last decode-heavy, prompts for good
    trace = oscillating(half, shift, first=ANSWERS, then=PROMPTS) + [PROMPTS] * intervals(60)
    cluster = ToyCluster.of(4, 4)
    cluster.run(RolePlanner(), trace)
    late = [(i, d) for i, d in cluster.switches if i >= shift]
    assert late and all(d.to_role == "prefill" for _, d in late)
    # As soon as the shift has outlived the swings it remembers (10 s), not before.
    assert late[0][0] == shift + half


def test_minimums_are_kept():
    cluster = ToyCluster.of(3, 3)
    config = replace(CONFIG, min_decode=2)
    cluster.run(RolePlanner(config), [prefill_heavy(10.0, prefill_workers=3)] * 30)
    assert cluster.count("decode") == 2 and len(cluster.switches) == 1
    assert cluster.outcomes[-1].reason == rp.AT_MINIMUM
    assert "keeps at least 2" in cluster.outcomes[-1].detail


def test_a_worker_inside_its_cooldown_is_not_moved():
    cluster = ToyCluster.of(2, 3)
    cluster.since_switch = {"decode-0": 0.0, "decode-1": 0.0, "decode-2": 0.0}  # all just switched
    cluster.run(RolePlanner(), [prefill_heavy(4.0)] * intervals(CONFIG.cooldown_s + 10))
    first = cluster.switches[0][0]
    # No decode worker may go before the cooldown has passed.
    assert first * CONFIG.interval_s >= CONFIG.cooldown_s
    assert {o.reason for o in cluster.outcomes[CONFIG.hysteresis - 1 : first]} == {rp.COOLDOWN}
    # 20 running over three: decode-0 and decode-1 have 7, decode-2 has 6 and is the cheapest,
    # unless it is inside its cooldown.
    for since, chosen in ((None, "decode-2"), (CONFIG.cooldown_s - 10, "decode-0")):
        cluster = ToyCluster.of(2, 3)
        cluster.since_switch = {} if since is None else {"decode-2": since}
        cluster.run(RolePlanner(), [Load(prefill_heavy(4.0).queued, 20)] * (FIRST + 1))
        assert [d.worker_id for _, d in cluster.switches] == [chosen]


def test_one_switch_per_interval_even_if_called_again():
    planner = RolePlanner()
    cluster = ToyCluster.of(4, 4)
    load = prefill_heavy(4.0, prefill_workers=4)
    outcomes = [planner.plan(cluster.snapshot(t * S, load)) for t in range(FIRST + 1)]
    assert isinstance(outcomes[-1], Decision)
    again = planner.plan(cluster.snapshot((FIRST + 0.2) * S, load))  # an extra call inside the interval
    assert isinstance(again, Hold) and again.reason == rp.SAME_INTERVAL
    assert isinstance(planner.plan(cluster.snapshot((FIRST + 1) * S, load)), Decision)  # the next may


def test_never_picks_a_switching_or_restarting_worker_and_picks_the_cheapest():
    cluster = ToyCluster.of(2, 4)
    load = prefill_heavy(5.0)
    base = dict(
        waiting=0, queued_prefill_tokens=0, kv_blocks_free=BLOCKS, kv_blocks_total=BLOCKS, last_step_s=0.004
    )
    overrides = {
        "decode-0": {"running": 0, "switching_to": "prefill"},  # already moving
        "decode-1": {"running": 0, "restarting": True},  # idle but restarting
        "decode-2": {"running": 5, "kv_blocks_cached": 10},
        "decode-3": {"running": 5, "kv_blocks_cached": 300},  # same work to move, more useful cache
    }
    planner = RolePlanner()
    decision = None
    for t in range(FIRST + 1):
        snap = cluster.snapshot(t * S, load)
        workers = tuple(
            replace(w, **base, **overrides.get(w.worker_id, {})) if w.role == "decode" else w
            for w in snap.workers
        )
        decision = planner.plan(replace(snap, workers=workers))
    assert isinstance(decision, Decision) and decision.worker_id == "decode-3"
    # With fewer running requests a worker wins over cache.
    overrides["decode-2"]["running"] = 4
    planner = RolePlanner()
    for t in range(FIRST + 1):
        snap = cluster.snapshot(t * S, load)
        workers = tuple(
            replace(w, **base, **overrides.get(w.worker_id, {})) if w.role == "decode" else w
            for w in snap.workers
        )
        decision = planner.plan(replace(snap, workers=workers))
    assert isinstance(decision, Decision) and decision.worker_id == "decode-2"


def test_a_drained_worker_is_left_to_the_operator():
    cluster = ToyCluster.of(2, 4)
    load = prefill_heavy(5.0)
    base = dict(
        waiting=0, queued_prefill_tokens=0, kv_blocks_free=BLOCKS, kv_blocks_total=BLOCKS, last_step_s=0.004
    )
    overrides = {
        "decode-0": {"running": 6},
        "decode-1": {"running": 6},
        "decode-2": {"running": 0, "drained": True},  # the cheapest to move, but an operator holds it
        "decode-3": {"running": 5},
    }
    planner, decision = RolePlanner(), None
    for t in range(FIRST + 1):
        snap = cluster.snapshot(t * S, load)
        workers = tuple(
            replace(w, **base, **overrides.get(w.worker_id, {})) if w.role == "decode" else w
            for w in snap.workers
        )
        decision = planner.plan(replace(snap, workers=workers))
    assert isinstance(decision, Decision) and decision.worker_id == "decode-3"


def test_a_switch_in_flight_counts_for_its_new_side():
    # 2 prefill + 2 decode, one decode already on its way to prefill: the prefill pressure is
    # shared by three, and the one decode left is at the minimum.
    cluster = ToyCluster.of(2, 2)
    cluster.switching = {"decode-1": "prefill"}
    snap = cluster.snapshot(0.0, prefill_heavy(3.0))
    planner = RolePlanner()
    hold = planner.plan(snap)
    assert (
        isinstance(hold, Hold)
        and hold.prefill.carriers == 3
        and hold.prefill.value == pytest.approx(2.0, 1e-3)
    )
    assert hold.decode.carriers == 1 and hold.decode.serving == 1


def test_an_expensive_switch_waits_until_the_imbalance_has_lasted():
    cluster = ToyCluster.of(2, 2)
    planner = RolePlanner()
    load = Load(queued=2000, running=600)  # decode-heavy, no prefill backlog to speak of
    outcomes = []
    for t in range(intervals(60)):
        snap = cluster.snapshot(t * S, load)
        outcomes.append(planner.plan(replace(snap, signals=replace(snap.signals, switch_cost_s=5.0))))
        if isinstance(outcomes[-1], Decision):
            break
    # It pays once (held - 5 s) > 2 x 5 s: held > 15 s.
    paid = math.floor(15 / S) + 1
    assert {o.reason for o in outcomes[CONFIG.hysteresis : paid - 1]} == {rp.GAIN_BELOW_COST}
    assert isinstance(outcomes[-1], Decision) and len(outcomes) == paid


def _decode_workers(snap: PlannerSnapshot, **fields) -> PlannerSnapshot:
    """`snap` with every decode worker's snapshot changed by `fields`."""
    workers = tuple(replace(w, **fields) if w.role == "decode" else w for w in snap.workers)
    return replace(snap, workers=workers)


def test_blocks_reserved_for_prompts_not_computed_are_the_prefill_backlog():
    # Prefill is short: the decode pools are full of reservations for queued prompts, the router
    # holds 500 more requests for room, and the decode workers have almost nothing to decode.
    cluster = ToyCluster.of(2, 2)
    snap = cluster.snapshot(0.0, prefill_heavy(3.0))
    snap = _decode_workers(snap, running=2, kv_blocks_free=40, kv_blocks_reserved=1900, last_step_s=0.003)
    snap = replace(snap, signals=replace(snap.signals, waiting_for_decode=500))
    decode = decode_pressure(snap, CONFIG.itl_target_ms / 1e3)
    assert decode.value < 0.5, decode  # 0.45: the decoding share (5%) of the waiting requests
    # With the reservations counted as decode load, the same snapshot would read as decode-short.
    assert decode_pressure(_decode_workers(snap, kv_blocks_reserved=0), CONFIG.itl_target_ms / 1e3).value > 3
    planner = RolePlanner()
    outcomes = [planner.plan(replace(snap, now=t * S)) for t in range(FIRST + 1)]
    assert isinstance(outcomes[-1], Decision) and outcomes[-1].to_role == "prefill"


def test_requests_waiting_in_the_router_for_decode_room_press_decode():
    # Decode is short: its pools are full of decoding requests (fast steps, no reservations), and
    # the router holds requests for room, which no worker heartbeat shows.
    cluster = ToyCluster.of(2, 2)
    snap = cluster.snapshot(0.0, Load(queued=1000, running=100))
    snap = _decode_workers(snap, running=50, kv_blocks_free=50, last_step_s=0.02)
    target = CONFIG.itl_target_ms / 1e3
    alone = decode_pressure(snap, target)
    assert alone.driver == "kv" and 1.0 < alone.value < 1.1
    waiting = replace(snap, signals=replace(snap.signals, waiting_for_decode=100))
    pressed = decode_pressure(waiting, target)
    # 100 waiting requests at a decoding request's mean size (~40 blocks) over two 2048-block pools.
    assert pressed.driver == "kv" and pressed.value == pytest.approx(alone.value * 2, rel=0.05)
    planner = RolePlanner()
    outcomes = [planner.plan(replace(waiting, now=t * S)) for t in range(FIRST + 1)]
    assert isinstance(outcomes[-1], Decision) and outcomes[-1].reason == "decode_kv"


def test_requests_waiting_for_a_batch_slot_press_decode():
    cluster = ToyCluster.of(2, 2)
    snap = _decode_workers(cluster.snapshot(0.0, Load(1000, 200)), running=100, waiting=50)
    pressure = decode_pressure(snap, CONFIG.itl_target_ms / 1e3)
    assert (pressure.driver, pressure.value) == ("slots", pytest.approx(1.5))


def test_queued_prompts_without_a_measured_rate_hold():
    cluster = ToyCluster.of(2, 2)
    snap = cluster.snapshot(0.0, prefill_heavy())
    hold = RolePlanner().plan(replace(snap, signals=RouterSignals()))
    assert isinstance(hold, Hold) and hold.reason == rp.NO_PREFILL_RATE and "no prefill rate" in hold.detail


def test_both_workers_are_never_moved_nor_counted():
    cluster = ToyCluster.of(2, 2)
    cluster.roles["both-0"] = "both"
    cluster.run(RolePlanner(), [prefill_heavy(3.0)] * 10)
    assert [d.worker_id for _, d in cluster.switches] == ["decode-0"] and cluster.roles["both-0"] == "both"


def test_metrics_and_the_decision_log_record_every_outcome():
    registry = CollectorRegistry()
    metrics = RolePlannerMetrics(registry)
    cluster = ToyCluster.of(2, 2)
    cluster.run(RolePlanner(), [prefill_heavy(3.0)] * (FIRST + 4))
    for outcome in cluster.outcomes:
        metrics.observe(outcome)
    value = registry.get_sample_value
    assert (
        value(
            "pdserve_role_planner_decisions_total",
            {"from": "decode", "to": "prefill", "reason": "prefill_queue"},
        )
        == 1
    )
    assert value("pdserve_role_planner_holds_total", {"reason": rp.HYSTERESIS}) == CONFIG.hysteresis - 1
    gains = FIRST - CONFIG.hysteresis + 1
    assert (value("pdserve_role_planner_holds_total", {"reason": rp.GAIN_BELOW_COST}) or 0) == gains
    assert value("pdserve_role_planner_holds_total", {"reason": rp.AT_MINIMUM}) == 3
    assert value("pdserve_role_planner_pressure", {"side": "prefill"}) == pytest.approx(2.0, rel=1e-3)

    (_, decision) = cluster.switches[0]
    record = DecisionRecord.of(decision, at=1_700_000_000.0)
    assert (record.kind, record.worker_id, record.from_role, record.to_role) == (
        "switch",
        "decode-0",
        "decode",
        "prefill",
    )
    assert record.as_dict()["prefill"]["driver"] == "queue" and record.duration_s is None
    assert record.line().startswith(
        "role planner: switch decode-0 decode->prefill (prefill_queue): prefill 3.00"
    )
    hold = DecisionRecord.of(cluster.outcomes[-1], at=1_700_000_010.0)
    assert hold.kind == "hold" and hold.reason == rp.AT_MINIMUM and "keeps at least 1" in hold.line()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"interval_s": 0}, "interval_s must be > 0, got 0"),
        ({"ttft_target_ms": -1.0}, "ttft_target_ms must be > 0"),
        ({"itl_target_ms": "50"}, "itl_target_ms must be a number, got '50'"),
        ({"cooldown_s": -5}, "cooldown_s must be >= 0"),
        ({"hysteresis": 0}, "hysteresis must be an integer >= 1, got 0"),
        ({"min_prefill": 1.5}, "min_prefill must be an integer >= 1"),
        ({"enabled": "yes"}, "enabled must be true or false"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        RolePlannerConfig(**changes)
    assert RolePlannerConfig(cooldown_s=0, interval_s=1).interval_s == 1.0  # ints are read as seconds
