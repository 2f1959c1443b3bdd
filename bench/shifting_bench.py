"""`pdserve bench serve --workload shifting`: a load whose prefill:decode mix moves, against static
splits of the same workers and against the role planner.

The load is open-loop (seeded Poisson arrivals, the same schedule for every layout) in three
phases: long prompts with short answers (prefill-heavy), short prompts with long answers
(decode-heavy), then both at once. Each layout is a `pdserve up` of `--workers` workers: the
static splits 1P+3D, 2P+2D, 3P+1D, and 2P+2D with the role planner on. Per phase and overall it
reports goodput (requests/s that met the TTFT and TPOT SLOs), TTFT and ITL p50/p99, and, from the
cluster's metrics, the role switches made, their durations and the requests migrated.

Prompts are made of English words drawn at random (seeded): text the demo models never trained
on (they saw CPython's standard library), so no prefix is shared between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from pdserve.bench.chaos_bench import ClusterProbe
from pdserve.bench.cpu_quota import CpuQuotas
from pdserve.bench.report_file import write_report
from pdserve.bench.serve_bench import (
    PROMPT_WORDS,
    RequestResult,
    ServeBenchArgs,
    _headers,
    _served_model,
    distribution,
    launched,
    send_chat,
    state_dir,
)

# The static splits and the planner's starting split, as `pdserve up` flags (4 workers).
SHIFTING_LAYOUTS: dict[str, list[str]] = {
    "1P+3D": ["--prefill", "1", "--decode", "3", "--both", "0"],
    "2P+2D": ["--prefill", "2", "--decode", "2", "--both", "0"],
    "3P+1D": ["--prefill", "3", "--decode", "1", "--both", "0"],
    "planner": ["--prefill", "2", "--decode", "2", "--both", "0"],
}
# The planner's targets below the SLO, as an operator would set them: a side is pressed before its
# requests miss (a decode step at 2/3 of the TPOT SLO, queued prompts' wait at 1/3 of the TTFT SLO).
ITL_TARGET_OF_SLO, TTFT_TARGET_OF_SLO = 2 / 3, 1 / 3


def layout_flags(layout: str, args: ShiftingArgs) -> list[str]:
    """`pdserve up` flags of one layout: its split, and the role planner off or on (with targets
    from the SLO)."""
    if layout != "planner":
        return [*SHIFTING_LAYOUTS[layout], "--role-planner", '{"enabled": false}']
    planner = {"enabled": True, "itl_target_ms": round(args.slo_tpot_ms * ITL_TARGET_OF_SLO, 1),
               "ttft_target_ms": round(args.slo_ttft_ms * TTFT_TARGET_OF_SLO, 1)}  # fmt: skip
    return [*SHIFTING_LAYOUTS[layout], "--role-planner", json.dumps(planner)]


@dataclass(frozen=True)
class Phase:
    """One stretch of the load: prompts of about `prompt_words` words wanting `max_tokens` tokens,
    arriving at `rate` per second for `duration_s` seconds."""

    name: str
    prompt_words: int
    max_tokens: int
    rate: float
    duration_s: float


@dataclass
class ShiftingArgs:
    """The shifting workload's knobs (read from `ServeBenchArgs` where they mean the same)."""

    model: str
    seed: int = 0
    # The load, sized for 4 demo workers of a quarter core each (`--worker-cores 0.25`; measured
    # there: a prefill worker computes ~2 of the 100-word (~315-token) prompts a second, a decode
    # worker at most ~580 tok/s at batch 64 with a step of ~110 ms): the prefill-heavy phase needs
    # 3 prefill workers, the decode-heavy one 3 decode workers, the mixed one 2 of each, so no
    # static split serves every phase (docs/DECISIONS.md, 2026-12-06).
    phase_s: float = 45.0
    prefill_heavy_rate: float = 5.5
    decode_heavy_rate: float = 5.0
    long_prompt_words: int = 100
    long_answer_tokens: int = 256
    slo_ttft_ms: float = 1500.0
    slo_tpot_ms: float = 150.0
    api_key: str | None = None
    layouts: tuple[str, ...] = tuple(SHIFTING_LAYOUTS)
    # Cores each worker may use (a CFS quota, see cpu_quota.py); None: workers share the machine.
    worker_cores: float | None = None

    @classmethod
    def from_serve(cls, args: ServeBenchArgs) -> ShiftingArgs:
        if args.model is None:
            raise ValueError("--workload shifting starts its own clusters: pass --model (e.g. demo)")
        return cls(
            model=args.model,
            seed=args.seed,
            slo_ttft_ms=args.slo_ttft_ms or cls.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms or cls.slo_tpot_ms,
            api_key=args.api_key,
            worker_cores=args.worker_cores,
        )

    def phases(self) -> list[Phase]:
        short_words, short_answer = 20, 8
        return [
            Phase("prefill-heavy", self.long_prompt_words, short_answer, self.prefill_heavy_rate, self.phase_s),
            Phase("decode-heavy", short_words, self.long_answer_tokens, self.decode_heavy_rate, self.phase_s),
            Phase("mixed", self.long_prompt_words // 2, self.long_answer_tokens // 2,
                  (self.prefill_heavy_rate + self.decode_heavy_rate) / 2, self.phase_s),
        ]  # fmt: skip


@dataclass
class Arrival:
    """One request of the schedule: when it is sent (seconds from the start) and what it asks."""

    at_s: float
    phase: str
    messages: list[dict[str, str]]
    max_tokens: int


def schedule(args: ShiftingArgs) -> list[Arrival]:
    """The seeded open-loop schedule: the same arrivals for every layout."""
    rng = random.Random(f"shifting-{args.seed}")
    arrivals, start = [], 0.0
    for phase in args.phases():
        t = start + rng.expovariate(phase.rate)
        while t < start + phase.duration_s:
            words = max(1, int(rng.gauss(phase.prompt_words, phase.prompt_words * 0.1)))
            text = " ".join(rng.choice(PROMPT_WORDS) for _ in range(words))
            messages = [{"role": "user", "content": f"Summarize this list of words: {text}"}]
            arrivals.append(Arrival(t, phase.name, messages, phase.max_tokens))
            t += rng.expovariate(phase.rate)
        start += phase.duration_s
    return arrivals


async def run_schedule(
    url: str, arrivals: list[Arrival], args: ShiftingArgs
) -> list[tuple[str, RequestResult]]:
    """Sends each arrival at its time (not waiting for earlier ones); (phase, result) per request."""
    import httpx

    headers = _headers(args.api_key)
    limits = httpx.Limits(max_connections=len(arrivals) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        model = await _served_model(client, url, headers)
        warm = await send_chat(client, url, model, [{"role": "user", "content": "warm up"}], 2, headers)
        if not warm.ok:
            raise RuntimeError(f"the warm-up request to {url} failed: {warm.error}")
        start = time.perf_counter()
        with tqdm(total=len(arrivals), desc="bench serve: shifting", leave=False) as bar:

            async def one(a: Arrival) -> tuple[str, RequestResult]:
                await asyncio.sleep(max(0.0, a.at_s - (time.perf_counter() - start)))
                result = await send_chat(client, url, model, a.messages, a.max_tokens, headers)
                bar.update()
                return a.phase, result

            return list(await asyncio.gather(*(one(a) for a in arrivals)))


def summarize_phase(results: list[RequestResult], duration_s: float, args: ShiftingArgs) -> dict[str, Any]:
    """One phase's (or the whole run's) row: goodput under the SLOs and the latency tails."""
    ok = [r for r in results if r.ok]

    def meets(r: RequestResult) -> bool:
        tpot = r.tpot_s
        return (r.ttft_s or 0) * 1e3 <= args.slo_ttft_ms and (tpot is None or tpot * 1e3 <= args.slo_tpot_ms)

    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(_error_kind(r.error) for r in results if not r.ok)),
        "slo_met": sum(meets(r) for r in ok),
        "goodput": round(sum(meets(r) for r in ok) / duration_s, 3),
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itl_s]),
    }


def _error_kind(error: str | None) -> str:
    """An error message without its request id, so that equal failures count together."""
    return re.sub(r"req-[0-9a-f]+(~\d+)?", "req-…", error or "")[:200]


def cluster_counters(url: str, api_key: str | None) -> dict[str, Any]:
    """Role switches (count, durations) and migrated requests, from the gateway's /metrics."""
    import httpx

    text = httpx.get(url + "/metrics", headers=_headers(api_key), timeout=30).text
    out: dict[str, Any] = {"switches": 0, "switch_seconds": [], "migrated": 0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pdserve_role_switches_total":
                out["switches"] += int(s.value)
            elif s.name == "pdserve_role_switch_seconds_sum":
                out["switch_seconds_sum"] = s.value
            elif s.name == "pdserve_live_migrations_total":
                out["migrated"] += int(s.value)
    return out


def switch_log(state: Path) -> list[dict[str, Any]]:
    """The cluster's role switches: who, which way, why, how long, how many requests moved."""
    probe = ClusterProbe.of(state)
    try:
        return [
            {"worker": s.worker_id, "from": s.from_role, "to": s.to_role, "reason": s.reason,
             "seconds": round(s.seconds, 3), "moved": s.moved, "handed_back": s.handed_back,
             "error": s.error}
            for s in probe.switches()
        ]  # fmt: skip
    finally:
        probe.close()


def run_layout(layout: str, arrivals: list[Arrival], args: ShiftingArgs, workdir: Path) -> dict[str, Any]:
    """One layout through the whole schedule: per-phase rows, the overall row, the cluster's counters."""
    with (
        launched(layout, args.model, workdir, args.api_key, flags=layout_flags(layout, args)) as url,
        worker_quotas(state_dir(workdir, layout), args.worker_cores) as throttled,
    ):
        results = asyncio.run(run_schedule(url, arrivals, args))
        counters = cluster_counters(url, args.api_key)
        counters["throttled_s"] = throttled()
        counters["switch_log"] = switch_log(state_dir(workdir, layout))
    row: dict[str, Any] = {"layout": layout, "phases": {}, **counters}
    for phase in args.phases():
        row["phases"][phase.name] = summarize_phase(
            [r for p, r in results if p == phase.name], phase.duration_s, args
        )
    total_s = sum(p.duration_s for p in args.phases())
    row["overall"] = summarize_phase([r for _, r in results], total_s, args)
    return row


@contextlib.contextmanager
def worker_quotas(state: Path, cores: float | None, timeout_s: float = 60) -> Iterator:
    """Puts each worker of the cluster kept in `state` under a quota of `cores` CPUs, and weighs
    the `up` process (router and gateway) and this one (the load) like them; yields a function
    giving the seconds each worker has waited for its quota so far."""
    if cores is None:
        yield dict
        return
    probe = ClusterProbe.of(state)
    try:
        deadline = time.monotonic() + timeout_s
        while not (workers := [w for w in probe.workers() if w.alive]) or not all(w.pid for w in workers):
            if time.monotonic() > deadline:  # pids come with the first load report
                raise RuntimeError(f"the workers did not report their pids within {timeout_s:.0f} s")
            time.sleep(0.2)
    finally:
        probe.close()
    with CpuQuotas(cores) as quotas:
        for w in workers:
            quotas.limit(w.worker_id, w.pid)
        if probe.up_pid:
            quotas.favor("up", probe.up_pid)
        quotas.favor("load", os.getpid())
        yield lambda: {w.worker_id: round(quotas.throttled_s(w.worker_id), 1) for w in workers}


def run_shifting_bench(args: ShiftingArgs, output: Path | None = None) -> dict[str, Any]:
    """Every layout through the same schedule, one after the other; prints the table, writes JSON."""
    if args.worker_cores is not None and (why := CpuQuotas.available()):
        raise RuntimeError(f"--worker-cores: {why}; run without it to let the workers share the cores")
    arrivals = schedule(args)
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-shifting-") as tmp:
        rows = [run_layout(layout, arrivals, args, Path(tmp)) for layout in args.layouts]
    doc = {"benchmark": "serve-shifting", "args": {**asdict(args), "api_key": None}, "requests": len(arrivals),
           "layouts": rows}  # fmt: skip
    print_table(rows, args)
    write_report(doc, output)
    return doc


def print_table(rows: list[dict[str, Any]], args: ShiftingArgs) -> None:
    """Goodput per phase and overall, latency tails, switches: one line per layout."""
    phases = [p.name for p in args.phases()]
    print(
        f"\nshifting workload, SLO TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms; goodput req/s"
    )
    head = f"{'layout':<9}" + "".join(f"{p:>15}" for p in [*phases, "overall"])
    print(
        head
        + f"{'TTFT p50/p99 ms':>19}{'ITL p50/p99 ms':>17}{'switches':>9}{'migrated':>9}{'switch s p50/max':>18}"
    )
    for row in rows:
        cells = "".join(f"{row['phases'][p]['goodput']:>15.2f}" for p in phases)
        o = row["overall"]
        ttft = f"{o['ttft_ms']['p50']:.0f}/{o['ttft_ms']['p99']:.0f}" if o["ttft_ms"] else "-"
        itl = f"{o['itl_ms']['p50']:.0f}/{o['itl_ms']['p99']:.0f}" if o["itl_ms"] else "-"
        print(
            f"{row['layout']:<9}{cells}{o['goodput']:>15.2f}{ttft:>19}{itl:>17}{row['switches']:>9}{row['migrated']:>9}"
            f"{_switch_seconds(row.get('switch_log', [])):>18}"
        )
    for row in rows:
        for s in row.get("switch_log", []):
            print(
                f"  {row['layout']}: {s['worker']} {s['from']}->{s['to']} ({s['reason']}) {s['seconds']:.2f} s, "
                f"{s['moved']} moved live, {s['handed_back']} handed back{' ' + s['error'] if s['error'] else ''}"
            )


def _switch_seconds(log: list[dict[str, Any]]) -> str:
    done = sorted(s["seconds"] for s in log if s["seconds"] >= 0)
    return f"{done[len(done) // 2]:.2f}/{done[-1]:.2f}" if done else "-"
