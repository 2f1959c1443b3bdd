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
import os
import random
import tempfile
import time
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

# The static splits and the planner's layout, as `pdserve up` flags (4 workers).
_STATIC = ["--role-planner", '{"enabled": false}']
SHIFTING_LAYOUTS: dict[str, list[str]] = {
    "1P+3D": ["--prefill", "1", "--decode", "3", "--both", "0", *_STATIC],
    "2P+2D": ["--prefill", "2", "--decode", "2", "--both", "0", *_STATIC],
    "3P+1D": ["--prefill", "3", "--decode", "1", "--both", "0", *_STATIC],
    "planner": ["--prefill", "2", "--decode", "2", "--both", "0", "--role-planner", '{"enabled": true}'],
}


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
    phase_s: float = 40.0
    prefill_heavy_rate: float = 3.0
    decode_heavy_rate: float = 8.0
    long_prompt_words: int = 500
    long_answer_tokens: int = 192
    slo_ttft_ms: float = 1500.0
    slo_tpot_ms: float = 100.0
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
        "slo_met": sum(meets(r) for r in ok),
        "goodput": round(sum(meets(r) for r in ok) / duration_s, 3),
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itl_s]),
    }


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


def run_layout(layout: str, arrivals: list[Arrival], args: ShiftingArgs, workdir: Path) -> dict[str, Any]:
    """One layout through the whole schedule: per-phase rows, the overall row, the cluster's counters."""
    with (
        launched(layout, args.model, workdir, args.api_key, flags=SHIFTING_LAYOUTS[layout]) as url,
        worker_quotas(state_dir(workdir, layout), args.worker_cores) as throttled,
    ):
        results = asyncio.run(run_schedule(url, arrivals, args))
        counters = cluster_counters(url, args.api_key)
        counters["throttled_s"] = throttled()
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
    print(head + f"{'TTFT p50/p99 ms':>19}{'ITL p50/p99 ms':>17}{'switches':>9}{'migrated':>9}")
    for row in rows:
        cells = "".join(f"{row['phases'][p]['goodput']:>15.2f}" for p in phases)
        o = row["overall"]
        ttft = f"{o['ttft_ms']['p50']:.0f}/{o['ttft_ms']['p99']:.0f}" if o["ttft_ms"] else "-"
        itl = f"{o['itl_ms']['p50']:.0f}/{o['itl_ms']['p99']:.0f}" if o["itl_ms"] else "-"
        print(
            f"{row['layout']:<9}{cells}{o['goodput']:>15.2f}{ttft:>19}{itl:>17}{row['switches']:>9}{row['migrated']:>9}"
        )
