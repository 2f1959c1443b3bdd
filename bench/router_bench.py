"""`pdserve bench router`: the router's decision cost, its throughput, and its prefix hit rate.

Three parts, one JSON:

1. Decision overhead: `RouterPlacement.choose` for one long prompt over synthetic workers (load
   reports made up, never called) and a prefix index filled with `index_blocks` (worker, block)
   entries, with the in-process index and with Redis; hashing, the index lookup and the policy
   are also timed alone, so the split is visible.
2. Requests/s through one router: a real Ray cluster (1 prefill + 1 decode worker hosting a
   tiny dummy-weight model, so the engine costs little) and the router in this process; gRPC
   clients, also in this process, keep `concurrency` requests in flight for `duration` seconds.
3. Prefix hit rate of each policy on a shared-prefix workload (several system prompts,
   multi-turn sessions) beside an oracle that reads every worker's cache: a simulation with
   LRU caches and prefill queues, no engine (`simulate_shared_prefix`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pdserve.bench.report_file import write_report
from pdserve.cluster.controller import WorkerInfo
from pdserve.engine.block_hash import hash_blocks
from pdserve.roles.kv_transfer import Endpoint
from pdserve.roles.messages import WorkerLoad
from pdserve.router.metrics import RouterMetrics
from pdserve.router.placement import RouterPlacement
from pdserve.router.policies import POLICIES, Candidate, make_policy
from pdserve.router.prefix_index import IndexUnavailable, InProcessPrefixIndex, PrefixIndex, RedisPrefixIndex

# The bundled ERNIE 4.5 0.3B architecture shrunk to almost nothing: with dummy weights its steps
# take well under a millisecond, so part 2 measures the router and the Ray hops, not the model.
TINY_MODEL = "ernie-4.5-0.3b"
TINY_OVERRIDES: dict[str, Any] = {
    "num_hidden_layers": 1,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
}


@dataclass
class RouterBenchArgs:
    """What to measure (CLI flags for the first ones; the rest are fixed by the benchmark)."""

    workers: int = 64  # synthetic prefill workers in part 1
    index_blocks: int = 100_000  # (worker, block) entries in part 1's index
    prompt_tokens: int = 2048
    redis_url: str | None = "redis://127.0.0.1:6379/0"
    concurrency: int = 8
    duration: float = 10.0  # seconds per part 2 row
    skip_cluster: bool = False
    decode_workers: int = 8
    block_size: int = 16
    decisions: int = 2000  # timed decisions per index backend
    cluster_prompt_tokens: int = 64
    cluster_max_tokens: tuple[int, ...] = (1, 16)
    sim_workers: int = 8
    sim_capacity: int = 384  # blocks per simulated worker cache
    sim_systems: int = 4
    sim_sessions: int = 48
    sim_turns: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "workers", "index_blocks", "prompt_tokens", "concurrency", "decode_workers", "block_size",
            "decisions", "cluster_prompt_tokens", "sim_workers", "sim_capacity", "sim_systems",
            "sim_sessions", "sim_turns",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration!r}")
        if self.prompt_tokens < self.block_size:
            raise ValueError(f"prompt_tokens must be >= block_size ({self.block_size}) to touch the index")


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) of `samples`, in milliseconds rounded to microseconds."""
    s = sorted(samples)
    pick = lambda q: s[max(0, math.ceil(q * len(s)) - 1)]  # noqa: E731
    return {"p50": round(pick(0.50) * 1e3, 3), "p99": round(pick(0.99) * 1e3, 3)}


# ---------------------------------------------------------------------------- part 1: decisions


class StaticView:
    """What `RouterPlacement` reads of a `ClusterView`: fixed workers and an index nobody refreshes."""

    def __init__(self, workers: list[WorkerInfo], index: PrefixIndex) -> None:
        self.workers = workers
        self.index = index
        self.index_available = True
        self.controller = None  # only `failed()` uses it, and the bench never reports failures


def synthetic_workers(prefill: int, decode: int, block_size: int, seed: int) -> list[WorkerInfo]:
    """Live workers with made-up, varied load reports and no handle (placement never calls them)."""
    rng = random.Random(seed)
    infos = []
    for role, n in (("prefill", prefill), ("decode", decode)):
        for i in range(n):
            wid = f"{role}-{i}"
            total = 8192
            load = WorkerLoad(
                worker_id=wid,
                role=role,
                num_waiting=rng.randint(0, 4),
                num_running=rng.randint(0, 16),
                num_pending_sends=0,
                kv_blocks_total=total,
                kv_blocks_free=rng.randint(total // 4, total),
                block_size=block_size,
                waiting_prefill_tokens=rng.randint(0, 8192),
                last_step_seconds=0.02,
                draining=False,
            )
            infos.append(WorkerInfo(wid, wid, role, None, Endpoint(wid, "127.0.0.1", 0), load=load))
    return infos


def synthetic_index(
    worker_ids: list[str], prompt_tokens: int, block_size: int, entries: int, seed: int
) -> tuple[dict[str, list[int]], list[list[int]]]:
    """Each worker's cached block hashes, and the prompts that are looked up.

    Half of the entries come from the prompts themselves (8 system prompts a quarter of the
    prompt long, each prompt a system prompt plus its own tail), each prompt cached by up to 4
    workers to a random depth: lookups then walk deep with several workers still matching, the
    expensive case. The other half is filler: blocks of prompts nobody asks for again.
    """
    rng = random.Random(seed)
    token = lambda: rng.randrange(10, 100_000)  # noqa: E731
    systems = [[token() for _ in range(prompt_tokens // 4)] for _ in range(8)]
    blocks_per_prompt = prompt_tokens // block_size
    holders = min(4, len(worker_ids))
    held: dict[str, set[int]] = {w: set() for w in worker_ids}
    total = 0
    prompts: list[list[int]] = []
    while total < entries // 2 or not prompts:
        system = rng.choice(systems)
        prompt = system + [token() for _ in range(prompt_tokens - len(system))]
        prompts.append(prompt)
        hashes = hash_blocks(prompt, block_size)
        for w in rng.sample(worker_ids, holders):
            before = len(held[w])
            held[w].update(hashes[: rng.randint(1, blocks_per_prompt)])
            total += len(held[w]) - before
    i = 0
    while total < entries:
        # Random 63-bit values: as good as real hashes for the index, and far cheaper to make.
        held[worker_ids[i % len(worker_ids)]].add(rng.getrandbits(63))
        total += 1
        i += 1
    return {w: sorted(hs) for w, hs in held.items()}, prompts


async def _time_decisions(
    index: PrefixIndex, workers: list[WorkerInfo], prompts: list[list[int]], args: RouterBenchArgs, bar: tqdm
) -> dict[str, Any]:
    placement = RouterPlacement(
        StaticView(workers, index), make_policy("cache_aware", args.seed), args.block_size, RouterMetrics()
    )
    policy = make_policy("cache_aware", args.seed)
    prefill = [w for w in workers if w.role == "prefill"]
    ids = [w.worker_id for w in prefill]
    times: dict[str, list[float]] = {"choose": [], "hash": [], "lookup": [], "policy": []}
    warmup = min(50, args.decisions)
    hits = 0
    for i in range(warmup + args.decisions):
        prompt = prompts[i % len(prompts)]
        # The stages alone, in the order choose() runs them, then choose() itself.
        t0 = time.perf_counter()
        hashes = hash_blocks(prompt, args.block_size)
        t1 = time.perf_counter()
        cached = await index.longest_prefix(hashes, ids)
        t2 = time.perf_counter()
        candidates = [Candidate(w.worker_id, w.load, cached[w.worker_id]) for w in prefill]
        t3 = time.perf_counter()
        chosen = policy.choose(candidates, len(prompt))
        t4 = time.perf_counter()
        route = await placement.choose(prompt, set())
        t5 = time.perf_counter()
        # As if the request's prefill were over: charges would otherwise pile up on workers whose
        # made-up reports never refresh, until every decode worker looked full.
        placement.settled(route)
        if i < warmup:
            continue
        hits += chosen.cached_blocks > 0
        times["hash"].append(t1 - t0)
        times["lookup"].append(t2 - t1)
        times["policy"].append(t4 - t3)
        times["choose"].append(t5 - t4)
        bar.update()
    return {
        "entries": await index.num_entries(),
        "decisions": args.decisions,
        "chosen_with_cached_prefix": round(hits / args.decisions, 3),
        **{f"{k}_ms": percentiles(v) for k, v in times.items()},
    }


async def _fill(index: PrefixIndex, held: dict[str, list[int]]) -> None:
    for worker_id, hashes in held.items():
        # Chunks keep each Lua call's argument list (and Redis' reply buffer) modest.
        for start in range(0, len(hashes), 10_000):
            await index.apply(worker_id, hashes[start : start + 10_000], [])


async def _redis_decisions(
    args: RouterBenchArgs,
    held: dict[str, list[int]],
    workers: list[WorkerInfo],
    prompts: list[list[int]],
    bar: tqdm,
) -> dict[str, Any]:
    import redis.asyncio as aioredis

    # A model name of its own is the key namespace: nothing of a real deployment is touched,
    # and everything under it is deleted afterwards.
    model = f"bench-router-{uuid.uuid4().hex[:12]}"
    index = RedisPrefixIndex(args.redis_url, model, socket_timeout_s=5.0)
    try:
        await _fill(index, held)
        return {"model": model, **await _time_decisions(index, workers, prompts, args, bar)}
    finally:
        cleanup = aioredis.Redis.from_url(args.redis_url, socket_timeout=5.0)
        try:
            keys = [k async for k in cleanup.scan_iter(match=f"pdserve:{model}:*", count=10_000)]
            for start in range(0, len(keys), 10_000):
                await cleanup.delete(*keys[start : start + 10_000])
        except Exception:  # Redis was unreachable all along: there is nothing to delete
            pass
        finally:
            await cleanup.aclose()
            with contextlib.suppress(IndexUnavailable):
                await index.close()


def run_decision_part(args: RouterBenchArgs) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Part 1: rows per index backend, and {row: reason} for the rows skipped."""
    workers = synthetic_workers(args.workers, args.decode_workers, args.block_size, args.seed)
    held, prompts = synthetic_index(
        [w.worker_id for w in workers if w.role == "prefill"],
        args.prompt_tokens,
        args.block_size,
        args.index_blocks,
        args.seed,
    )
    rows, skipped = [], {}
    backends = ["in-process"] + (["redis"] if args.redis_url else [])
    with tqdm(total=args.decisions * len(backends), desc="bench router: decisions") as bar:
        index = InProcessPrefixIndex("bench-router")

        async def in_process() -> dict[str, Any]:
            await _fill(index, held)
            return await _time_decisions(index, workers, prompts, args, bar)

        rows.append({"index": "in-process", **asyncio.run(in_process())})
        if args.redis_url:
            try:
                rows.append(
                    {"index": "redis", **asyncio.run(_redis_decisions(args, held, workers, prompts, bar))}
                )
            except IndexUnavailable as e:
                skipped["decision/redis"] = f"Redis unreachable at {args.redis_url}: {e}"
        else:
            skipped["decision/redis"] = "no --redis-url"
    return rows, skipped


# ---------------------------------------------------------------------------- part 2: throughput


class _RouterThread:
    """The router on its own event loop thread, as it would run in its own process."""

    def __init__(self, controller) -> None:
        from pdserve.router.config import RouterConfig
        from pdserve.router.server import start_router

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.router = self.call(start_router(controller, RouterConfig(port=0)))

    def call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.router.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


async def _load(
    port: int, args: RouterBenchArgs, max_tokens: int, duration: float, seed: int
) -> dict[str, Any]:
    """`concurrency` clients each sending one request after another until `duration` has passed."""
    import grpc

    from pdserve.proto import pdserve_pb2, pdserve_pb2_grpc

    latencies: list[float] = []
    errors: dict[str, int] = {}
    tokens = 0
    vocab = TINY_OVERRIDES["vocab_size"]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pdserve_pb2_grpc.RouterStub(channel)

        async def client(k: int, deadline: float) -> None:
            nonlocal tokens
            rng = random.Random(seed * 1000 + k)
            while time.perf_counter() < deadline:
                # A fresh prompt each time: no request rides on another's cached prefix.
                prompt = [rng.randrange(10, vocab) for _ in range(args.cluster_prompt_tokens)]
                sampling = pdserve_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
                request = pdserve_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)
                start = time.perf_counter()
                try:
                    got = 0
                    async for chunk in stub.Generate(request, timeout=60):
                        got += len(chunk.token_ids)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - start)
                tokens += got

        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(client(k, deadline) for k in range(args.concurrency)))
        elapsed = time.perf_counter() - start  # includes finishing the requests in flight at the deadline
    row: dict[str, Any] = {
        "max_tokens": max_tokens,
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 3),
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
    }
    if latencies:
        row["latency_ms"] = percentiles(latencies)
    return row


def run_cluster_part(args: RouterBenchArgs) -> list[dict[str, Any]]:
    """Part 2: a real controller, workers and router; rows per max_tokens. Shuts it all down."""
    import ray

    from pdserve.cluster.controller import ControllerConfig, start_controller
    from pdserve.engine import EngineConfig

    started_ray = not ray.is_initialized()
    if started_ray:
        # More logical CPUs than cores: the actors mostly wait, and each needs a CPU slot.
        ray.init(
            num_cpus=64,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    engine = EngineConfig(
        model=TINY_MODEL,
        load_format="dummy",
        hf_overrides=dict(TINY_OVERRIDES),
        dtype="float32",
        block_size=args.block_size,
        kv_cache_blocks=2048,
        num_threads=1,
        progress=False,
        seed=args.seed,
    )
    rows = []
    controller = router = None
    try:
        controller = start_controller(
            ControllerConfig(engine, prefill=1, decode=1), name=f"pdserve-bench-router-{uuid.uuid4().hex[:8]}"
        )
        ray.get(controller.start.remote())
        router = _RouterThread(controller)
        with tqdm(total=len(args.cluster_max_tokens), desc="bench router: requests/s") as bar:
            for max_tokens in args.cluster_max_tokens:
                # Warm-up: channels, the KV transfer communicator, first-call costs.
                asyncio.run(_load(router.router.port, args, max_tokens, 0.5, seed=10_000 + max_tokens))
                rows.append(
                    asyncio.run(_load(router.router.port, args, max_tokens, args.duration, max_tokens))
                )
                bar.update()
    finally:
        if router is not None:
            router.stop()
        if controller is not None:
            ray.get(controller.shutdown.remote())
            ray.kill(controller)
        if started_ray:
            ray.shutdown()
    return rows


# ---------------------------------------------------------------------------- part 3: hit rate


class LRUCache:
    """A worker's prefix cache: whole blocks, least recently used evicted first (as the engine's pool)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def prefix(self, hashes: list[int]) -> int:
        """Leading blocks of `hashes` held."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def insert(self, hashes: list[int]) -> tuple[list[int], list[int]]:
        """Caches a prompt's blocks; returns (stored, removed) as the worker's events would."""
        stored, removed = [], []
        for h in hashes:
            if h in self.blocks:
                self.blocks.move_to_end(h)
            else:
                self.blocks[h] = None
                stored.append(h)
        while len(self.blocks) > self.capacity:
            h, _ = self.blocks.popitem(last=False)
            removed.append(h)
        # A block stored and evicted within one insert was never visible: report neither.
        gone, new = set(removed), set(stored)
        return [h for h in stored if h not in gone], [h for h in removed if h not in new]


@dataclass
class SimWorker:
    """A simulated prefill worker: its cache and its FIFO of remaining prefill tokens per request."""

    worker_id: str
    cache: LRUCache
    block_size: int
    queue: list[int] = field(default_factory=list)

    def load(self) -> WorkerLoad:
        return WorkerLoad(
            worker_id=self.worker_id,
            role="prefill",
            num_waiting=max(0, len(self.queue) - 1),
            num_running=min(1, len(self.queue)),
            num_pending_sends=0,
            kv_blocks_total=1000,
            kv_blocks_free=1000,
            block_size=self.block_size,
            waiting_prefill_tokens=sum(self.queue),
            last_step_seconds=0.01,
            draining=False,
        )

    def drain(self, tokens: int) -> None:
        while tokens > 0 and self.queue:
            step = min(tokens, self.queue[0])
            self.queue[0] -= step
            tokens -= step
            if self.queue[0] == 0:
                self.queue.pop(0)


@dataclass
class SimResult:
    """One policy's run: share of prompt tokens found cached, and the longest queue seen (tokens)."""

    hit_rate: float
    max_queue: int


def shared_prefix_workload(
    *,
    systems: int = 4,
    sessions: int = 48,
    turns: int = 6,
    system_blocks: int = 48,
    turn_blocks: int = 12,
    interleave: int = 16,
    seed: int = 0,
) -> list[list[int]]:
    """Block-hash lists of sessions x turns prompts: each session starts from one of `systems`
    system prompts (`system_blocks` long, popularity skewed systems : systems-1 : ... : 1) and
    every turn appends `turn_blocks` of its own; `interleave` sessions run at once."""
    rng = random.Random(seed)
    ids = iter(range(1, 10**9))
    system_prompts = [[next(ids) for _ in range(system_blocks)] for _ in range(systems)]
    weights = [systems - i for i in range(systems)]
    pending = [(rng.choices(range(systems), weights=weights)[0], turns) for _ in range(sessions)]
    active: list[list] = []
    prompts = []
    while pending or active:
        while pending and len(active) < interleave:
            system, left = pending.pop()
            active.append([list(system_prompts[system]), left])
        session = rng.choice(active)
        session[0] = session[0] + [next(ids) for _ in range(turn_blocks)]
        session[1] -= 1
        prompts.append(session[0])
        if session[1] == 0:
            active.remove(session)
    return prompts


async def simulate(
    policy: str,
    prompts: list[list[int]],
    *,
    workers: int = 8,
    capacity: int = 384,
    drain_tokens: int = 64,
    block_size: int = 16,
) -> SimResult:
    """Routes the prompts one per tick over `workers` (LRU caches of `capacity` blocks, each
    computing `drain_tokens` prefill tokens per tick).

    `oracle` reads the workers' caches directly and takes the longest prefix (ties: least
    loaded), ignoring load; the other policies see only the index fed by the caches' events.
    The oracle is greedy, a reference rather than a bound: spreading load can also spare evictions,
    so a policy may edge past it on some workloads.
    """
    sims = [SimWorker(f"w{i}", LRUCache(capacity), block_size) for i in range(workers)]
    by_id = {w.worker_id: w for w in sims}
    index = InProcessPrefixIndex("sim")
    chooser = None if policy == "oracle" else make_policy(policy, seed=0)
    hit = total = max_queue = 0
    for hashes in prompts:
        tokens = len(hashes) * block_size
        if chooser is None:
            chosen = max(sims, key=lambda w: (w.cache.prefix(hashes), -sum(w.queue)))
        else:
            cached = await index.longest_prefix(hashes, list(by_id))
            cs = [Candidate(w.worker_id, w.load(), cached[w.worker_id]) for w in sims]
            chosen = by_id[chooser.choose(cs, tokens).worker_id]
        hit_tokens = chosen.cache.prefix(hashes) * block_size
        hit += hit_tokens
        total += tokens
        chosen.queue.append(tokens - hit_tokens)
        stored, removed = chosen.cache.insert(hashes)
        await index.apply(chosen.worker_id, stored, removed)
        for w in sims:
            w.drain(drain_tokens)
        max_queue = max(max_queue, *(sum(w.queue) for w in sims))
    return SimResult(hit / total, max_queue)


def simulate_shared_prefix(
    policies: list[str] | None = None,
    *,
    workers: int = 8,
    capacity: int = 384,
    systems: int = 4,
    sessions: int = 48,
    turns: int = 6,
    block_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, SimResult]:
    """Each policy (default: the oracle, then every policy) on one shared-prefix workload."""
    prompts = shared_prefix_workload(systems=systems, sessions=sessions, turns=turns, seed=seed)
    names = policies or ["oracle", *POLICIES]
    return {
        name: asyncio.run(simulate(name, prompts, workers=workers, capacity=capacity, block_size=block_size))
        for name in tqdm(names, desc="bench router: hit rate", disable=not progress)
    }


def run_hit_rate_part(args: RouterBenchArgs) -> list[dict[str, Any]]:
    """Part 3: a row per policy, the oracle first."""
    results = simulate_shared_prefix(
        workers=args.sim_workers,
        capacity=args.sim_capacity,
        systems=args.sim_systems,
        sessions=args.sim_sessions,
        turns=args.sim_turns,
        block_size=args.block_size,
        seed=args.seed,
        progress=True,
    )
    oracle = results["oracle"].hit_rate
    return [
        {
            "policy": name,
            "hit_rate": round(r.hit_rate, 4),
            "of_oracle": round(r.hit_rate / oracle, 4) if oracle else None,
            "max_queue_tokens": r.max_queue,
        }
        for name, r in results.items()
    ]


# ---------------------------------------------------------------------------- the whole bench


def _print_tables(doc: dict[str, Any]) -> None:
    a = doc["args"]
    skipped = doc["skipped"]
    print(
        f"\n1. decision overhead: {a['workers']} prefill + {a['decode_workers']} decode workers, "
        f"{a['prompt_tokens']}-token prompt, block_size {a['block_size']}, policy cache_aware (ms, p50 / p99)"
    )
    print(f"{'index':<11} {'entries':>8} {'choose':>15} {'hash':>15} {'lookup':>15} {'policy':>15}")
    fmt = lambda p: f"{p['p50']:.3f} / {p['p99']:.3f}"  # noqa: E731
    for r in doc["decision"]:
        print(
            f"{r['index']:<11} {r['entries']:>8} {fmt(r['choose_ms']):>15} {fmt(r['hash_ms']):>15} "
            f"{fmt(r['lookup_ms']):>15} {fmt(r['policy_ms']):>15}"
        )
    if "decision/redis" in skipped:
        print(f"{'redis':<11} skipped: {skipped['decision/redis']}")

    print(
        f"\n2. requests/s through one router: 1 prefill + 1 decode worker ({TINY_MODEL}, tiny dummy "
        f"weights), {a['cluster_prompt_tokens']}-token prompts, {a['concurrency']} concurrent clients"
    )
    if "throughput" in skipped:
        print(f"skipped: {skipped['throughput']}")
    else:
        print(
            f"{'max_tokens':>10} {'requests':>9} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}  errors"
        )
        for r in doc["throughput"]:
            lat = r.get("latency_ms", {"p50": float("nan"), "p99": float("nan")})
            print(
                f"{r['max_tokens']:>10} {r['requests']:>9} {r['requests_per_s']:>8.1f} {r['tokens_per_s']:>8.1f} "
                f"{lat['p50']:>8.2f} {lat['p99']:>8.2f}  {r['errors'] or '-'}"
            )

    print(
        f"\n3. prefix hit rate: {a['sim_workers']} workers x {a['sim_capacity']}-block LRU caches, "
        f"{a['sim_systems']} system prompts, {a['sim_sessions']} sessions x {a['sim_turns']} turns"
    )
    print(f"{'policy':<13} {'hit rate':>8} {'% oracle':>9} {'max queue':>10}")
    for r in doc["hit_rate"]:
        share = "-" if r["of_oracle"] is None else f"{100 * r['of_oracle']:.1f}"
        print(f"{r['policy']:<13} {r['hit_rate']:>8.3f} {share:>9} {r['max_queue_tokens']:>10}")


def run_router_bench(args: RouterBenchArgs, output: Path | None = None) -> dict[str, Any]:
    """Runs the three parts; prints a table per part and writes the JSON to `output`."""
    decision, skipped = run_decision_part(args)
    if args.skip_cluster:
        throughput: list[dict[str, Any]] = []
        skipped["throughput"] = "--skip-cluster"
    else:
        throughput = run_cluster_part(args)
    hit_rate = run_hit_rate_part(args)
    doc = {
        "benchmark": "router",
        "args": asdict(args),
        "decision": decision,
        "throughput": throughput,
        "hit_rate": hit_rate,
        "skipped": skipped,
    }
    _print_tables(doc)
    write_report(doc, output)
    return doc
