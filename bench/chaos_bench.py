"""`pdserve bench chaos`: a bounded load while workers are killed and Redis restarts, then a storm of
cancelled streams; what survived, what failed, how fast the cluster healed, and what it kept.

One `pdserve up` (2 prefill + 2 decode workers, the planner off, its prefix index in a private
`redis-server` on a port of its own) serves `concurrency` clients that send greedy completions of
a fixed set of prompts for `duration_s`. Meanwhile, on a schedule: kill -9 of a decode worker's
process, of a prefill worker's, Redis stopped and started again, another decode worker killed.
Each answer is checked token-for-token (as text) against the answer the same prompt got before
any fault. Then `cancels` streams are opened and dropped after their first token.

Reported: requests completed and failed (by HTTP status), exact-output checks, per fault the time
to the first request completed after it and until the cluster was whole again, each worker's file
descriptors and threads before the load, after it and after the cancels, and KV blocks still held
once the cluster is idle (leaked). Prompts are random English words (seeded): text the demo
models never saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.bench.report_file import write_report
from pdserve.bench.serve_bench import PROMPT_WORDS, launched, spare_port, state_dir


@dataclass(frozen=True)
class ChaosArgs:
    """The run: model, load, and how many streams to cancel at the end."""

    model: str = "demo"
    duration_s: float = 60.0
    concurrency: int = 6
    max_tokens: int = 32
    prompts: int = 12
    cancels: int = 500
    seed: int = 0


@dataclass(frozen=True)
class Fault:
    """One injected fault: what, and when (seconds from the load's start)."""

    at_s: float
    kind: str  # "kill decode", "kill prefill", "stop redis", "start redis"


def fault_schedule(args: ChaosArgs) -> list[Fault]:
    """The faults, at fixed shares of the load's duration."""
    shares = (
        (0.15, "kill decode"),
        (0.35, "kill prefill"),
        (0.50, "stop redis"),
        (0.65, "start redis"),
        (0.80, "kill decode"),
    )
    return [Fault(share * args.duration_s, kind) for share, kind in shares]


@dataclass
class Outcome:
    """One request of the load, as its client saw it (seconds from the load's start)."""

    sent_s: float
    done_s: float
    status: str  # "200", "503", ..., or "connection" when no HTTP answer came
    exact: bool | None = None  # the answer equals the fault-free one (None: no answer)


@dataclass
class FaultRecord:
    """What one fault did and how the cluster came back from it."""

    kind: str
    at_s: float
    target: str = ""
    first_ok_after_s: float | None = None  # from the fault to the first request sent after it that completed
    whole_after_s: float | None = None  # from the fault until every worker was alive (or Redis indexed) again


@dataclass
class ChaosReport:
    """The table `pdserve bench chaos` prints and writes as JSON."""

    requests: int = 0
    completed: int = 0
    failed_by_status: dict[str, int] = field(default_factory=dict)
    exact_checked: int = 0
    exact_passed: int = 0
    faults: list[FaultRecord] = field(default_factory=list)
    footprint: dict[str, dict[str, list[int]]] = field(
        default_factory=dict
    )  # worker -> fds/threads at 3 moments
    cancelled_streams: int = 0
    leaked_blocks: dict[str, int] = field(default_factory=dict)


class PrivateRedis:
    """A `redis-server` of the bench's own on a free port, stopped and started at will."""

    def __init__(self) -> None:
        self.port = spare_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class ClusterProbe:
    """The router's view of the workers (its ClusterState call), as `pdserve status` reads it.

    Its own channel rather than `pdserve.cluster_state`'s helper: the CLI package imports the
    benches, so they must not import it back (tests/pdserve/test_import_graph.py). The clusters
    this bench starts have no API key."""

    def __init__(self, router_address: str, record: dict | None = None) -> None:
        import grpc

        from pdserve.proto import pdserve_pb2, pdserve_pb2_grpc

        self.up_pid: int | None = (record or {}).get("pid")  # the `pdserve up` that runs the router
        self._channel = grpc.insecure_channel(router_address)
        self._stub = pdserve_pb2_grpc.RouterStub(self._channel)
        self._request = pdserve_pb2.ClusterStateRequest()

    @classmethod
    def of(cls, state: Path) -> ClusterProbe:
        """The probe of the cluster whose state directory (`pdserve up --state-dir`) is `state`."""
        record = json.loads(next(state.glob("clusters/*.json")).read_text())
        return cls(record["router_address"], record)

    def state(self):
        return self._stub.ClusterState(self._request, timeout=10)

    def workers(self) -> list:
        return list(self.state().workers)

    def switches(self) -> list:
        """The router's latest role switches, oldest first (the planner's `status`)."""
        from pdserve.proto import pdserve_pb2

        request = pdserve_pb2.PlannerRequest(action="status", requested_by="bench")
        return list(self._stub.Planner(request, timeout=10).switches)

    def footprint(self) -> dict[str, tuple[int, int]]:
        return {w.worker_id: (w.open_fds, w.threads) for w in self.workers() if w.alive}

    def close(self) -> None:
        self._channel.close()


def make_prompts(args: ChaosArgs) -> list[str]:
    """`args.prompts` prompts of random words (seeded)."""
    rng = random.Random(f"chaos-{args.seed}")
    return [
        "Continue this list of words: "
        + " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(20, 60)))
        for _ in range(args.prompts)
    ]


async def _complete(client, url: str, prompt: str, max_tokens: int) -> tuple[str, str | None]:
    """(status, text): one greedy completion; status "connection" when no HTTP answer came."""
    import httpx

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    try:
        r = await client.post(f"{url}/v1/completions", json=body, timeout=120)
    except httpx.TransportError:
        return "connection", None
    if r.status_code != 200:
        return str(r.status_code), None
    return "200", r.json()["choices"][0]["text"]


async def references(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's answer before any fault: what every later answer must equal."""
    import httpx

    async with httpx.AsyncClient() as client:
        answers = [await _complete(client, url, p, max_tokens) for p in prompts]
    if any(status != "200" for status, _ in answers):
        raise RuntimeError(f"the cluster failed requests before any fault: {[s for s, _ in answers]}")
    return [text for _, text in answers]  # type: ignore[misc]


async def run_load(
    url: str, prompts: list[str], expected: list[str], args: ChaosArgs, t0: float
) -> list[Outcome]:
    """`concurrency` clients sending prompts round-robin until `duration_s` has passed."""
    import httpx

    outcomes: list[Outcome] = []

    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient() as client:
            k = i
            while time.monotonic() - t0 < args.duration_s:
                sent = time.monotonic() - t0
                status, text = await _complete(client, url, prompts[k % len(prompts)], args.max_tokens)
                exact = None if text is None else text == expected[k % len(prompts)]
                outcomes.append(Outcome(sent, time.monotonic() - t0, status, exact))
                k += args.concurrency

    await asyncio.gather(*(client_loop(i) for i in range(args.concurrency)))
    return outcomes


def _kill_worker(probe: ClusterProbe, role: str, rng: random.Random) -> tuple[str, int]:
    """kill -9 of one live worker of `role`; (its id, how many workers were alive before)."""
    workers = probe.workers()
    alive = [w for w in workers if w.alive and w.role == role and w.pid]
    victim = rng.choice(alive)
    os.kill(victim.pid, signal.SIGKILL)
    return victim.worker_id, sum(w.alive for w in workers)


def _replaced(probe: ClusterProbe, victim: str, workers: int) -> bool:
    """The killed worker is known dead and as many workers as before it died are alive again."""
    alive = [w.worker_id for w in probe.workers() if w.alive]
    return victim not in alive and len(alive) >= workers


async def _wait_until(check, timeout_s: float, since: float) -> float | None:
    """Seconds from `since` (monotonic) until `check()` holds; None if it did not within the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the router may be busy or mid-restart of a view
            if await asyncio.to_thread(check):
                return time.monotonic() - since
        await asyncio.sleep(0.2)
    return None


async def inject(
    faults: list[Fault], probe: ClusterProbe, redis: PrivateRedis, t0: float, seed: int
) -> list[FaultRecord]:
    """Carries out the schedule; for each fault, how long until the cluster was whole again."""
    rng = random.Random(f"chaos-faults-{seed}")
    records = []
    for fault in faults:
        await asyncio.sleep(max(0.0, t0 + fault.at_s - time.monotonic()))
        at = time.monotonic()
        record = FaultRecord(fault.kind, at - t0)
        if fault.kind.startswith("kill "):
            record.target, before = await asyncio.to_thread(_kill_worker, probe, fault.kind[5:], rng)
            whole = functools.partial(_replaced, probe, record.target, before)
            record.whole_after_s = await _wait_until(whole, 120, at)
        elif fault.kind == "stop redis":
            redis.stop()
        else:
            redis.start()
            record.whole_after_s = await _wait_until(lambda: probe.state().index_available, 60, at)
        records.append(record)
    return records


async def cancel_streams(url: str, n: int, prompts: list[str], concurrency: int) -> int:
    """Opens `n` streams and drops each after its first token; returns how many got that far."""
    import httpx

    got = 0

    async def one(client, i: int) -> None:
        nonlocal got
        body = {"prompt": prompts[i % len(prompts)], "max_tokens": 256, "ignore_eos": True, "stream": True}
        with contextlib.suppress(httpx.HTTPError):
            async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        got += 1
                        return  # leaving the block closes the connection: the client cancels

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        for start in range(0, n, concurrency):
            await asyncio.gather(*(one(client, i) for i in range(start, min(n, start + concurrency))))
    return got


def leaked_blocks(probe: ClusterProbe, timeout_s: float = 30.0) -> dict[str, int]:
    """KV blocks each worker still holds once nothing runs or waits (0 everywhere when nothing leaked)."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = [w for w in probe.workers() if w.alive]
        idle = all(not (w.num_running or w.num_waiting) for w in workers)
        held = {w.worker_id: w.kv_blocks_total - w.kv_blocks_free for w in workers}
        if (idle and not any(held.values())) or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


def _settle(probe: ClusterProbe, seconds: float = 3.0) -> None:
    """Lets heartbeats carry the workers' latest footprint to the router."""
    time.sleep(seconds)


def summarize(outcomes: list[Outcome], records: list[FaultRecord], report: ChaosReport) -> None:
    """Fills the request counts, exact checks and each fault's first success into `report`."""
    report.requests = len(outcomes)
    report.completed = sum(o.status == "200" for o in outcomes)
    report.failed_by_status = dict(Counter(o.status for o in outcomes if o.status != "200"))
    checked = [o for o in outcomes if o.exact is not None]
    report.exact_checked, report.exact_passed = len(checked), sum(bool(o.exact) for o in checked)
    for record in records:
        after = [o.done_s for o in outcomes if o.status == "200" and o.sent_s >= record.at_s]
        record.first_ok_after_s = min(after) - record.at_s if after else None
    report.faults = records


@contextlib.contextmanager
def _cluster(args: ChaosArgs, workdir: Path, redis: PrivateRedis) -> Iterator[tuple[str, ClusterProbe]]:
    flags = ["--prefill", "2", "--decode", "2", "--both", "0", "--role-planner", '{"enabled": false}',
             "--redis-url", redis.url]  # fmt: skip
    with launched("chaos", args.model, workdir, None, flags=flags) as url:
        probe = ClusterProbe.of(state_dir(workdir, "chaos"))
        try:
            yield url, probe
        finally:
            probe.close()


async def _chaos(
    url: str, probe: ClusterProbe, redis: PrivateRedis, args: ChaosArgs, report: ChaosReport
) -> None:
    prompts = make_prompts(args)
    expected = await references(url, prompts, args.max_tokens)
    _settle(probe)
    before = probe.footprint()
    t0 = time.monotonic()
    load = asyncio.ensure_future(run_load(url, prompts, expected, args, t0))
    records = await inject(fault_schedule(args), probe, redis, t0, args.seed)
    summarize(await load, records, report)
    _settle(probe)
    after_load = probe.footprint()
    report.cancelled_streams = await cancel_streams(url, args.cancels, prompts, args.concurrency)
    report.leaked_blocks = await asyncio.to_thread(leaked_blocks, probe)
    _settle(probe)
    after_cancels = probe.footprint()
    for worker in sorted(set(before) | set(after_load) | set(after_cancels)):
        moments = [m.get(worker, (-1, -1)) for m in (before, after_load, after_cancels)]
        report.footprint[worker] = {"fds": [m[0] for m in moments], "threads": [m[1] for m in moments]}


def run_chaos_bench(args: ChaosArgs, output: Path | None = None) -> ChaosReport:
    """The whole run: cluster up, load with faults, cancels, checks; prints the table, writes JSON."""
    report = ChaosReport()
    redis = PrivateRedis()
    redis.start()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="pdserve-chaos-") as tmp,
            _cluster(args, Path(tmp), redis) as (url, probe),
        ):
            asyncio.run(_chaos(url, probe, redis, args, report))
    finally:
        redis.stop()
    print_table(report, args)
    write_report({"args": asdict(args), "report": asdict(report)}, output)
    return report


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def print_table(report: ChaosReport, args: ChaosArgs) -> None:
    """The run as a few small tables."""
    failed = ", ".join(f"{k}: {v}" for k, v in sorted(report.failed_by_status.items())) or "none"
    print(
        f"\nchaos: {args.model}, 2 prefill + 2 decode, {args.concurrency} clients for {args.duration_s:g} s"
    )
    print(f"requests {report.requests}   completed {report.completed}   failed {failed}")
    print(f"exact output {report.exact_passed}/{report.exact_checked}")
    print(f"\n{'fault':<14} {'at':>7} {'target':<10} {'first ok after':>15} {'whole again after':>18}")
    for f in report.faults:
        print(
            f"{f.kind:<14} {_s(f.at_s):>7} {f.target or '-':<10} {_s(f.first_ok_after_s):>15} {_s(f.whole_after_s):>18}"
        )
    print(f"\n{'worker':<12} {'fds before/after load/after cancels':>36} {'threads':>16}")
    for worker, fp in report.footprint.items():
        fds = "/".join("-" if v < 0 else str(v) for v in fp["fds"])
        threads = "/".join("-" if v < 0 else str(v) for v in fp["threads"])
        print(f"{worker:<12} {fds:>36} {threads:>16}")
    print(f"\ncancelled streams {report.cancelled_streams}/{args.cancels}   "
          f"leaked KV blocks {sum(report.leaked_blocks.values())} {report.leaked_blocks}")  # fmt: skip
