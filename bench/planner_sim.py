"""A discrete-event simulation of a disaggregated cluster, for `pdserve bench planner --simulate`.

No engine runs: a `CostModel` says how long each piece of work takes on one worker (measured on
the demo model, see `DEMO_COST`), and `Simulation` plays a seeded workload through workers that
behave like pdserve's, with the roles fixed (a static split) or moved by the real `RolePlanner`:

- The router reserves a request's decode blocks (prompt + answer) on the decode worker with the
  most room, or holds the request until one has room; then queues its prompt on the prefill
  worker with the fewest queued tokens.
- A prefill worker computes one prompt at a time (`prefill_s`); its end is the first token (TTFT),
  and the KV reaches the decode worker `handoff_s` later.
- A decode worker steps its whole batch (`step_s(batch)`), one token per request per step.
- decode -> prefill: the worker finishes its step, then live-migrates its running requests one
  after another (`handoff_s` each, to decode workers with room, else back through the router to
  be prefilled again with what they generated), then flips (`flip_s`). prefill -> decode: its
  queued prompts go back to the router, the prompt in progress finishes, then it flips.

Every interval the planner gets the snapshot a controller would build (per-worker load, the
router's TTFT/ITL percentiles over the interval, the measured prefill rate and switch time).
ITL samples are decode steps weighted by their batch, plus each migrated request's pause.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field

from pdserve.cluster.load_pressure import PlannerSnapshot, RouterSignals, WorkerSnapshot
from pdserve.cluster.planner import Decision, RolePlanner


@dataclass(frozen=True)
class CostModel:
    """Seconds one worker (one CPU core) takes; `DEMO_COST` holds the demo model's numbers."""

    prefill_base_s: float = 0.003  # per prompt
    prefill_token_s: float = 0.000125  # per prompt token (~8,000 tok/s)
    step_base_s: float = 0.0024  # per decode step
    step_request_s: float = 0.00033  # per request in the step
    handoff_s: float = 0.02  # one request's KV from worker to worker, calls included
    flip_s: float = 0.25  # a role flip once the worker is empty (the router sees it next refresh)
    kv_tokens: int = 32_768  # a worker's KV pool (demo default: 2,048 blocks of 16)
    block_size: int = 16
    max_num_seqs: int = 256

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_base_s + tokens * self.prefill_token_s

    def step_s(self, batch: int) -> float:
        return self.step_base_s + batch * self.step_request_s


# Measured on the demo model, one core of an AMD EPYC, fp32 (docs/DECISIONS.md, 2026-12-05).
DEMO_COST = CostModel()


@dataclass(frozen=True)
class Phase:
    """A stretch of the workload: prompt and answer lengths drawn uniformly from these ranges."""

    name: str
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_tokens) / 2

    @property
    def mean_output(self) -> float:
        return sum(self.output_tokens) / 2


SHIFTING = (
    Phase("long prompts, short answers", (1024, 1536), (8, 32)),
    Phase("short prompts, long answers", (32, 128), (256, 512)),
    Phase("mixed", (128, 1024), (32, 256)),
)


def best_split_rate(cost: CostModel, phase: Phase, workers: int, itl_target_s: float) -> float:
    """Requests/s the best static split of `workers` sustains on `phase` (the cost model's
    estimate: prefill one prompt at a time; decode batches as big as KV, max_num_seqs and the
    ITL target allow)."""
    per_prefill = 1 / cost.prefill_s(int(phase.mean_prompt))
    batch = min(
        cost.max_num_seqs,
        cost.kv_tokens // int(phase.mean_prompt + phase.mean_output),
        int((itl_target_s - cost.step_base_s) / cost.step_request_s),
    )
    per_decode = batch / cost.step_s(batch) / max(phase.mean_output - 1, 1)
    return max(min(p * per_prefill, (workers - p) * per_decode) for p in range(1, workers))


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request's way through the simulation."""

    id: int
    phase: int
    arrival: float
    prompt: int
    output: int
    remaining: int = 0  # answer tokens still to decode
    first_token_at: float | None = None
    finished_at: float | None = None
    decode: SimWorker | None = None  # where its decode blocks are reserved
    finish_step: int = 0
    recompute: int = 0  # tokens generated before a failed move: prefilled again with the prompt

    @property
    def kv_tokens(self) -> int:
        return self.prompt + self.output


def workload(phases: tuple[Phase, ...], rates: list[float], phase_s: float, seed: int) -> list[SimRequest]:
    """Poisson arrivals at `rates[i]` requests/s during phase i, lengths uniform in its ranges."""
    rng = random.Random(seed)
    requests: list[SimRequest] = []
    for i, (phase, rate) in enumerate(zip(phases, rates, strict=True)):
        t = i * phase_s + rng.expovariate(rate)
        while t < (i + 1) * phase_s:
            prompt, output = rng.randint(*phase.prompt_tokens), rng.randint(*phase.output_tokens)
            requests.append(SimRequest(len(requests), i, t, prompt, output, remaining=output - 1))
            t += rng.expovariate(rate)
    return requests


@dataclass(eq=False)
class SimWorker:
    """One worker: a prompt queue when prefilling, a batch and a KV pool when decoding."""

    id: str
    role: str
    switching_to: str | None = None
    switch_started: float = 0.0
    switched_at: float | None = None
    queue: deque[SimRequest] = field(default_factory=deque)
    queued_tokens: int = 0  # prompt tokens queued or in progress
    current: SimRequest | None = None
    busy_until: float = 0.0  # when the prompt in progress is done
    last_step_s: float = 0.0
    kv_used: int = 0
    # Requests holding blocks here, and of those the ones not decoding yet; dicts, not sets, so
    # that iterating them follows arrival order and a seeded run repeats exactly.
    reserved: dict[SimRequest, None] = field(default_factory=dict)
    arriving: dict[SimRequest, None] = field(default_factory=dict)
    running: list[tuple[int, int, SimRequest]] = field(default_factory=list)  # heap by finish step
    pending: list[SimRequest] = field(default_factory=list)  # arrived, join the next step
    steps: int = 0
    stepping: bool = False
    switch_log: dict[str, object] | None = None  # the recorder's entry of its switch under way

    @property
    def serving_role(self) -> str | None:
        """The role it takes work for now (None while switching)."""
        return None if self.switching_to else self.role

    @property
    def decoding(self) -> int:
        return len(self.running) + len(self.pending)


@dataclass
class Recorder:
    """What one run measured over time, by phase (steps by when they ended), and its switches."""

    phases: int
    phase_s: float
    itl: list[dict[int, float]] = field(default_factory=list)  # 0.1 ms bucket -> tokens
    switches: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.itl = [{} for _ in range(self.phases)]

    def phase_at(self, t: float) -> int:
        return min(int(t // self.phase_s), self.phases - 1)

    def itl_sample(self, t: float, seconds: float, tokens: int) -> None:
        add_sample(self.itl[self.phase_at(t)], seconds, tokens)


def add_sample(buckets: dict[int, float], seconds: float, weight: float) -> None:
    """Counts `weight` samples of `seconds` into a 0.1 ms histogram."""
    key = int(seconds * 1e4)
    buckets[key] = buckets.get(key, 0.0) + weight


class Simulation:
    """One run: `prefill` + `decode` workers, roles static or moved by `planner`."""

    def __init__(
        self,
        cost: CostModel,
        requests: list[SimRequest],
        recorder: Recorder,
        prefill: int,
        decode: int,
        planner: RolePlanner | None = None,
    ) -> None:
        self.cost, self.requests, self.rec, self.planner = cost, requests, recorder, planner
        self.finished = 0
        roles = ["prefill"] * prefill + ["decode"] * decode
        self.workers = [SimWorker(f"w{i}", role) for i, role in enumerate(roles)]
        self.now = 0.0
        self._events: list[tuple[float, int, object, tuple]] = []
        self._seq = itertools.count()
        self.admission: deque[SimRequest] = deque()  # waiting in the router for decode room
        self.unplaced: deque[SimRequest] = deque()  # reserved, waiting for a prefill worker
        self._window_ttft: list[float] = []  # seconds, since the last planner interval
        self._window_itl: dict[int, float] = {}
        self._window_prefill = [0, 0.0]  # tokens, busy seconds
        self._prefill_rate: float | None = None
        self._switch_s: deque[float] = deque(maxlen=5)

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, until: float) -> None:
        """Plays every arrival, then drains until every request finished or `until` passes."""
        for req in self.requests:
            self.at(req.arrival, self._arrive, req)
        if self.planner is not None:
            self.at(self.planner.config.interval_s, self._tick)
        while self._events and self.finished < len(self.requests):
            self.now, _, fn, args = heapq.heappop(self._events)
            if self.now > until:
                break
            fn(*args)

    # ------------------------------------------------------------------ the router

    def _arrive(self, req: SimRequest) -> None:
        self.admission.append(req)
        self._admit()

    def _admit(self) -> None:
        """Reserves decode room for waiting requests, first come first served."""
        while self.admission:
            target = self._decode_room(self.admission[0])
            if target is None:
                return
            req = self.admission.popleft()
            self._reserve(target, req)
            self._place_prefill(req)

    def _decode_room(self, req: SimRequest) -> SimWorker | None:
        room = [
            w
            for w in self.workers
            if w.serving_role == "decode"
            and w.kv_used + req.kv_tokens <= self.cost.kv_tokens
            and len(w.reserved) < self.cost.max_num_seqs
        ]
        return min(room, key=lambda w: w.kv_used) if room else None

    def _reserve(self, w: SimWorker, req: SimRequest) -> None:
        w.kv_used += req.kv_tokens
        w.reserved[req] = None
        w.arriving[req] = None
        req.decode = w

    def _release(self, req: SimRequest) -> None:
        w = req.decode
        if w is not None and req in w.reserved:
            del w.reserved[req]
            w.arriving.pop(req, None)
            w.kv_used -= req.kv_tokens
        req.decode = None

    def _place_prefill(self, req: SimRequest) -> None:
        ready = [w for w in self.workers if w.serving_role == "prefill"]
        if not ready:
            self.unplaced.append(req)
            return
        w = min(ready, key=lambda w: w.queued_tokens)
        w.queue.append(req)
        w.queued_tokens += req.prompt + req.recompute
        if w.current is None:
            self._next_prompt(w)

    # ------------------------------------------------------------------ prefill

    def _next_prompt(self, w: SimWorker) -> None:
        if not w.queue:
            return
        req = w.current = w.queue.popleft()
        w.busy_until = self.now + self.cost.prefill_s(req.prompt + req.recompute)
        self.at(w.busy_until, self._prefill_done, w, req)

    def _prefill_done(self, w: SimWorker, req: SimRequest) -> None:
        tokens = req.prompt + req.recompute
        seconds = self.cost.prefill_s(tokens)
        w.current, w.last_step_s = None, seconds
        w.queued_tokens -= tokens
        self._window_prefill[0] += tokens
        self._window_prefill[1] += seconds
        if req.first_token_at is None:
            req.first_token_at = self.now
            self._window_ttft.append(self.now - req.arrival)
        if req.remaining <= 0:
            self._finish(req)
        else:
            self.at(self.now + self.cost.handoff_s, self._join, req)
        if w.switching_to is None:
            self._next_prompt(w)

    # ------------------------------------------------------------------ decode

    def _join(self, req: SimRequest) -> None:
        w = req.decode
        if w is None:  # no decode worker had room for its KV: prefill it again with what it generated
            req.recompute = req.output - req.remaining
            self.admission.appendleft(req)
            self._admit()
            return
        w.arriving.pop(req, None)
        w.pending.append(req)
        if not w.stepping:
            self._start_step(w)

    def _start_step(self, w: SimWorker) -> None:
        for req in w.pending:
            req.finish_step = w.steps + req.remaining
            heapq.heappush(w.running, (req.finish_step, req.id, req))
        w.pending.clear()
        w.stepping = bool(w.running)
        if w.stepping:
            w.last_step_s = self.cost.step_s(len(w.running))
            self.at(self.now + w.last_step_s, self._step_done, w)

    def _step_done(self, w: SimWorker) -> None:
        w.steps += 1
        self.rec.itl_sample(self.now, w.last_step_s, len(w.running))
        add_sample(self._window_itl, w.last_step_s, len(w.running))
        while w.running and w.running[0][0] <= w.steps:
            self._finish(heapq.heappop(w.running)[2])
        if w.switching_to is not None:
            w.stepping = False
            self._migrate_all(w)
        else:
            self._start_step(w)

    def _finish(self, req: SimRequest) -> None:
        req.finished_at = self.now
        self.finished += 1
        self._release(req)
        self._admit()

    # ------------------------------------------------------------------ switching

    def switch(self, w: SimWorker, to_role: str, log: dict[str, object]) -> None:
        """Starts moving `w` to `to_role`; its duration goes into `log` when it is done."""
        w.switching_to, w.switch_started, w.switch_log = to_role, self.now, log
        if to_role == "prefill":
            self._leave_decode(w)
        else:
            self._leave_prefill(w)

    def _leave_decode(self, w: SimWorker) -> None:
        # Requests reserved here whose KV has not arrived yet get room elsewhere (nothing to move).
        for req in list(w.arriving):
            self._release(req)
            target = self._decode_room(req)
            if target is not None:
                self._reserve(target, req)
        if not w.stepping:
            self._migrate_all(w)

    def _migrate_all(self, w: SimWorker) -> None:
        """Live-migrates every request decoding on `w`, one after another, then flips it."""
        running = [entry[2] for entry in sorted(w.running)]
        for req in running:
            req.remaining = req.finish_step - w.steps
        moving = running + w.pending
        for req in moving:
            self._release(req)
        w.running.clear()
        w.pending.clear()
        for i, req in enumerate(moving):
            pause = (i + 1) * self.cost.handoff_s
            target = self._decode_room(req)
            if target is not None:
                self._reserve(target, req)
                self.rec.itl_sample(self.now, pause, 1)
            self.at(self.now + pause, self._join, req)  # no room: _join sends it to be recomputed
        self.at(self.now + len(moving) * self.cost.handoff_s + self.cost.flip_s, self._switch_done, w)

    def _leave_prefill(self, w: SimWorker) -> None:
        returned = list(w.queue)
        w.queue.clear()
        w.queued_tokens -= sum(req.prompt + req.recompute for req in returned)
        for req in returned:
            self._place_prefill(req)
        busy_until = w.busy_until if w.current is not None else self.now
        self.at(busy_until + self.cost.flip_s, self._switch_done, w)

    def _switch_done(self, w: SimWorker) -> None:
        duration = self.now - w.switch_started
        self._switch_s.append(duration)
        if w.switch_log is not None:
            w.switch_log["duration_s"] = round(duration, 3)
        w.role, w.switching_to, w.switched_at, w.switch_log = w.switching_to, None, self.now, None
        if w.role == "prefill":
            while self.unplaced:
                self._place_prefill(self.unplaced.popleft())
        else:
            self._admit()

    # ------------------------------------------------------------------ the planner

    def _tick(self) -> None:
        outcome = self.planner.plan(self.snapshot())
        if isinstance(outcome, Decision):
            w = next(w for w in self.workers if w.id == outcome.worker_id)
            log = {
                "at_s": round(self.now, 1),
                "worker": w.id,
                "from": outcome.from_role,
                "to": outcome.to_role,
                "reason": outcome.reason,
                "moved": w.decoding if w.role == "decode" else len(w.queue),  # migrated / handed back
                "duration_s": None,
            }
            self.rec.switches.append(log)
            self.switch(w, outcome.to_role, log)
        self._window_ttft, self._window_itl, self._window_prefill = [], {}, [0, 0.0]
        self.at(self.now + self.planner.config.interval_s, self._tick)

    def snapshot(self) -> PlannerSnapshot:
        """What a controller would hand the planner now."""
        workers = tuple(self._worker_snapshot(w) for w in self.workers)
        return PlannerSnapshot(self.now, workers, self._signals())

    def _worker_snapshot(self, w: SimWorker) -> WorkerSnapshot:
        per_block = self.cost.block_size
        blocks = self.cost.kv_tokens // per_block
        return WorkerSnapshot(
            worker_id=w.id,
            role=w.role,
            running=w.decoding if w.role == "decode" else int(w.current is not None),
            waiting=len(w.queue),
            queued_prefill_tokens=w.queued_tokens,
            kv_blocks_free=blocks - w.kv_used // per_block,
            kv_blocks_total=blocks,
            kv_blocks_reserved=sum(r.kv_tokens for r in w.arriving) // per_block,
            last_step_s=w.last_step_s,
            switching_to=w.switching_to,
            since_switch_s=None if w.switched_at is None else self.now - w.switched_at,
        )

    def _signals(self) -> RouterSignals:
        tokens, busy = self._window_prefill
        if busy > 0:
            self._prefill_rate = tokens / busy
        ttft = sorted(self._window_ttft)
        return RouterSignals(
            ttft_p50_ms=_pick(ttft, 0.5) * 1e3 if ttft else None,
            ttft_p99_ms=_pick(ttft, 0.99) * 1e3 if ttft else None,
            itl_p50_ms=weighted_percentile(self._window_itl, 0.5),
            itl_p99_ms=weighted_percentile(self._window_itl, 0.99),
            prefill_tokens_per_s=self._prefill_rate,
            switch_cost_s=sum(self._switch_s) / len(self._switch_s) if self._switch_s else None,
            waiting_for_decode=len(self.admission),
        )


def _pick(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def weighted_percentile(buckets: dict[int, float], q: float) -> float | None:
    """The q-quantile in milliseconds of a 0.1 ms histogram (bucket -> weight); None if empty."""
    total = sum(buckets.values())
    if not total:
        return None
    seen = 0.0
    for key in sorted(buckets):
        seen += buckets[key]
        if seen >= q * total:
            return key / 10
    return max(buckets) / 10
