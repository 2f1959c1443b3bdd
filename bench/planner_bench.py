"""`pdserve bench planner --simulate`: the role planner against static prefill/decode splits on the
shifting workload (long prompts with short answers; short prompts with long answers; mixed), in
the simulator of `bench/planner_sim.py`, for each cluster size asked (default 64 and 4 workers).

Every system gets the same seeded requests: static splits of a quarter, a half and three
quarters prefill workers, and the planner starting from half and half. Each phase's arrival rate
is `load` times what the best static split of that size sustains on it (the cost model's
estimate), so every static split is overloaded in some phase. Reported per phase and overall:
goodput (requests/s meeting both SLOs: TTFT, and mean inter-token time), TTFT and ITL p50/p99,
switches and their durations. Requests are counted in the phase they arrived in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pdserve.bench.planner_sim import (
    DEMO_COST,
    SHIFTING,
    CostModel,
    Phase,
    Recorder,
    SimRequest,
    Simulation,
    best_split_rate,
    weighted_percentile,
    workload,
)
from pdserve.bench.report_file import write_report
from pdserve.cluster.planner import RolePlanner, RolePlannerConfig


@dataclass
class PlannerBenchArgs:
    """What to simulate; the SLOs default to the planner's targets."""

    workers: tuple[int, ...] = (64, 4)
    phase_s: float = 120.0
    load: float = 0.75  # of the best static split's capacity, per phase
    seed: int = 0
    planner: RolePlannerConfig = field(default_factory=RolePlannerConfig)
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    drain_s: float = 300.0  # after the last phase, for requests still queued
    cost: CostModel = DEMO_COST
    phases: tuple[Phase, ...] = SHIFTING

    def __post_init__(self) -> None:
        if not self.workers or min(self.workers) < 2:
            raise ValueError(f"workers: every cluster needs at least 2 workers, got {self.workers}")
        if not self.phase_s > 0 or not 0 < self.load <= 2:
            raise ValueError(f"need phase_s > 0 and 0 < load <= 2, got {self.phase_s}, {self.load}")
        self.slo_ttft_ms = self.slo_ttft_ms or self.planner.ttft_target_ms
        self.slo_itl_ms = self.slo_itl_ms or self.planner.itl_target_ms


def static_splits(workers: int) -> list[tuple[int, int]]:
    """(prefill, decode) with a quarter, a half and three quarters prefill workers (at least 1 each)."""
    splits = []
    for share in (0.25, 0.5, 0.75):
        p = min(max(1, round(workers * share)), workers - 1)
        if (p, workers - p) not in splits:
            splits.append((p, workers - p))
    return splits


def _percentiles_ms(values: list[float]) -> dict[str, float | None]:
    s = sorted(values)
    pick = lambda q: round(s[min(len(s) - 1, int(q * len(s)))] * 1e3, 1) if s else None  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99)}


def _summary(
    requests: list[SimRequest], itl: dict[int, float], seconds: float, end: float, args: PlannerBenchArgs
) -> dict[str, Any]:
    """Goodput and latencies of `requests` (a TTFT not reached by `end` counts as `end - arrival`)."""
    ttft, good = [], 0
    for r in requests:
        first = r.first_token_at if r.first_token_at is not None else end
        ttft.append(first - r.arrival)
        tpot = (r.finished_at - first) / (r.output - 1) if r.finished_at is not None and r.output > 1 else 0.0
        good += (
            r.finished_at is not None and ttft[-1] * 1e3 <= args.slo_ttft_ms and tpot * 1e3 <= args.slo_itl_ms
        )
    return {
        "requests": len(requests),
        "unfinished": sum(r.finished_at is None for r in requests),
        "good": good,
        "goodput_rps": round(good / seconds, 3),
        "ttft_ms": _percentiles_ms(ttft),
        "itl_ms": {"p50": weighted_percentile(itl, 0.5), "p99": weighted_percentile(itl, 0.99)},
    }


def simulate_system(
    args: PlannerBenchArgs, workers: int, prefill: int, use_planner: bool, rates: list[float]
) -> dict[str, Any]:
    """One system (a static split, or the planner from `prefill` prefill workers) on the workload."""
    requests = workload(args.phases, rates, args.phase_s, args.seed)
    recorder = Recorder(len(args.phases), args.phase_s)
    planner = RolePlanner(args.planner) if use_planner else None
    sim = Simulation(args.cost, requests, recorder, prefill, workers - prefill, planner)
    end = len(args.phases) * args.phase_s + args.drain_s
    sim.run(until=end)
    end = min(end, sim.now)
    phases = []
    for i, phase in enumerate(args.phases):
        row = _summary([r for r in requests if r.phase == i], recorder.itl[i], args.phase_s, end, args)
        moves = [s for s in recorder.switches if recorder.phase_at(s["at_s"]) == i]
        row.update(name=phase.name, switches=len(moves), **_switch_stats(moves))
        phases.append(row)
    merged: dict[int, float] = {}
    for buckets in recorder.itl:
        for key, weight in buckets.items():
            merged[key] = merged.get(key, 0.0) + weight
    overall = _summary(requests, merged, len(args.phases) * args.phase_s, end, args)
    overall.update(switches=len(recorder.switches), **_switch_stats(recorder.switches))
    name = "planner" if use_planner else f"{prefill}P+{workers - prefill}D"
    return {"system": name, "start": [prefill, workers - prefill], "phases": phases, "overall": overall,
            "switch_log": recorder.switches}  # fmt: skip


def _switch_stats(moves: list[dict[str, Any]]) -> dict[str, Any]:
    durations = sorted(m["duration_s"] for m in moves if m["duration_s"] is not None)
    return {
        "to_prefill": sum(m["to"] == "prefill" for m in moves),
        "to_decode": sum(m["to"] == "decode" for m in moves),
        "moved_requests": sum(m["moved"] for m in moves),
        "switch_s": {
            "p50": durations[len(durations) // 2] if durations else None,
            "max": durations[-1] if durations else None,
        },
    }


def run_size(args: PlannerBenchArgs, workers: int, progress: tqdm | None = None) -> dict[str, Any]:
    """Every static split and the planner on one cluster size."""
    itl_s = args.planner.itl_target_ms / 1e3
    rates = [args.load * best_split_rate(args.cost, p, workers, itl_s) for p in args.phases]
    systems = []
    for prefill, _ in static_splits(workers):
        systems.append(simulate_system(args, workers, prefill, False, rates))
        if progress is not None:
            progress.update()
    systems.append(simulate_system(args, workers, workers // 2, True, rates))
    if progress is not None:
        progress.update()
    return {"workers": workers, "rates_rps": [round(r, 2) for r in rates], "systems": systems}


def _print(doc: dict[str, Any]) -> None:
    a = doc["args"]
    for run in doc["runs"]:
        print(
            f"\n{run['workers']} workers (simulated, demo cost model), {a['phase_s']:g} s per phase at "
            f"{a['load']:.0%} of the best static split; "
            f"SLO TTFT {a['slo_ttft_ms']:g} ms, ITL {a['slo_itl_ms']:g} ms"
        )
        header = f"{'phase':<28} {'system':<10} {'goodput':>8} {'good':>6} {'TTFT p50/p99 ms':>17} "
        print(header + f"{'ITL p50/p99 ms':>15} {'switches':>9} {'switch s p50/max':>17}")
        names = [p["name"] for p in run["systems"][0]["phases"]] + ["overall"]
        for i, name in enumerate(names):
            for system in run["systems"]:
                row = system["overall"] if name == "overall" else system["phases"][i]
                print(_row(name, system["system"], row))
        planner = run["systems"][-1]["overall"]
        print(
            f"planner: {planner['switches']} switches ({planner['to_prefill']} to prefill, "
            f"{planner['to_decode']} to decode), {planner['moved_requests']} requests moved"
        )


def _row(phase: str, system: str, row: dict[str, Any]) -> str:
    pair = lambda a, b: "/".join("-" if v is None else f"{v:g}" for v in (a, b))  # noqa: E731
    share = f"{row['good'] / row['requests']:.0%}" if row["requests"] else "-"
    ttft, itl, took = row["ttft_ms"], row["itl_ms"], row["switch_s"]
    return (
        f"{phase[:28]:<28} {system:<10} {row['goodput_rps']:>8.2f} {share:>6} "
        f"{pair(ttft['p50'], ttft['p99']):>17} {pair(itl['p50'], itl['p99']):>15} {row['switches']:>9} "
        f"{pair(took['p50'], took['max']) if row['switches'] else '-':>17}"
    )


def run_planner_bench(args: PlannerBenchArgs, output: Path | None = None) -> dict[str, Any]:
    """Simulates every size, prints a table per size and writes the JSON to `output`."""
    total = sum(len(static_splits(n)) + 1 for n in args.workers)
    with tqdm(total=total, desc="bench planner: simulating") as progress:
        runs = [run_size(args, n, progress) for n in args.workers]
    doc = {"benchmark": "planner", "mode": "simulate", "args": asdict(args), "runs": runs}
    _print(doc)
    write_report(doc, output)
    return doc
