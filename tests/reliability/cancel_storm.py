"""Many disaggregated streams cancelled at chosen moments, and the workers' footprint around them.

Used by `test_cancel_frees.py`, and run on its own to measure a longer storm:

    .venv/bin/python -m tests.reliability.cancel_storm 500

which starts a prefill and a decode worker on a tiny checkpoint, cancels that many streams and
prints each worker's open file descriptors and threads before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass

from pdserve.engine import SamplingParams
from pdserve.roles.handoff import WorkerRef
from pdserve.router.request_runner import RequestRunner, Route, RunnerConfig
from tests.prompts import prompts_of

# When each stream is cancelled: chunks read first (the prefill's first token is chunk 1), then a
# delay; "break" stops reading (the runner's generator is closed) instead of cancelling the task.
MOMENTS = (
    ("before the handoff", 0, 0.0, "cancel"),
    ("during the prefill", 0, 0.002, "cancel"),
    ("during the transfer", 1, 0.0, "cancel"),
    ("just after the transfer started", 1, 0.003, "cancel"),
    ("right after the first decode chunk", 2, 0.0, "cancel"),
    ("mid-decode", 4, 0.0, "cancel"),
    ("reader leaves after the first token", 1, 0.0, "break"),
    ("reader leaves mid-decode", 3, 0.0, "break"),
)


FAILED = -1  # what `cancel_one` reports for a stream that failed before its cancel
MAX_TOKENS = 1000
KV_BLOCKS = 1024  # of 4 tokens: room for several streams of MAX_TOKENS


class FixedPlacement:
    """Always the same prefill and decode worker: the storm tests the handoff, not the policy."""

    def __init__(self, prefill: WorkerRef, decode: WorkerRef) -> None:
        self.prefill = prefill
        self.decode = decode

    async def choose(self, prompt_token_ids: list[int], avoid: set[str], group: str | None = None) -> Route:
        return Route(self.prefill, self.decode)

    async def decode_target(self, num_tokens: int, avoid: set[str]) -> WorkerRef | None:
        """No other decode worker: a request moved off (not in these tests) would be recomputed."""
        return None

    async def failed(self, worker_id: str) -> None:
        """Nothing to tell: no controller here."""

    def settled(self, route: Route) -> None:
        """Nothing to do: this placement keeps no count."""


@dataclass
class Usage:
    """One worker's footprint and queues at one moment."""

    open_fds: int
    threads: int
    running: int
    waiting: int
    pending_sends: int
    blocks_free: int
    blocks_total: int

    @property
    def idle(self) -> bool:
        return (
            not (self.running or self.waiting or self.pending_sends) and self.blocks_free == self.blocks_total
        )


async def usage(ref: WorkerRef) -> Usage:
    """A worker's footprint and queues now, from its load report."""
    load = await ref.handle.load.remote()
    return Usage(
        load.open_fds,
        load.threads,
        load.num_running,
        load.num_waiting,
        load.num_pending_sends,
        load.kv_blocks_free,
        load.kv_blocks_total,
    )


async def wait_idle(refs: list[WorkerRef], timeout_s: float) -> tuple[float, list[Usage]]:
    """Polls until every worker is idle (nothing running, waiting or unsent; all blocks free).

    Returns the seconds it took and the last readings (not idle when `timeout_s` ran out).
    """
    start = time.monotonic()
    while True:
        now = await asyncio.gather(*(usage(r) for r in refs))
        if all(u.idle for u in now) or time.monotonic() - start > timeout_s:
            return time.monotonic() - start, now
        await asyncio.sleep(0.05)


async def cancel_one(runner: RequestRunner, rid: str, prompt: list[int], moment: tuple) -> int:
    """Runs one request and cancels it at `moment`; returns the chunks it read (FAILED if it failed)."""
    _, after_chunks, delay_s, how = moment
    # Long enough that a decode left running without a reader would still run long after.
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    read = 0
    reached = asyncio.Event()

    async def consume() -> None:
        nonlocal read
        chunks = runner.run(rid, prompt, params)
        try:
            async for _ in chunks:
                read += 1
                if read >= after_chunks:
                    reached.set()
                    if how == "break":
                        return
        except Exception:
            read = FAILED
        finally:
            await chunks.aclose()
            reached.set()

    task = asyncio.get_running_loop().create_task(consume())
    if after_chunks:
        await reached.wait()
    if delay_s:
        await asyncio.sleep(delay_s)
    # No delay: cancel at once. Even sleep(0) would let a chunk that arrived meanwhile reach
    # the reader first (its wake-up is queued before this task's), one chunk past the moment.
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return read


async def storm(runner: RequestRunner, n: int, concurrency: int = 8, seed: int = 0) -> dict[str, list[int]]:
    """Cancels `n` streams, `concurrency` at a time, cycling through `MOMENTS`.

    Returns, per moment, how many chunks each of its streams had read when it was cancelled.
    """
    rng = random.Random(seed)
    prompts = prompts_of([rng.randint(6, 30) for _ in range(32)], seed=seed)
    counts: dict[str, list[int]] = {m[0]: [] for m in MOMENTS}
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        moment = MOMENTS[i % len(MOMENTS)]
        async with gate:
            read = await cancel_one(runner, f"storm-{seed}-{i}", prompts[i % len(prompts)], moment)
        counts[moment[0]].append(read)

    await asyncio.gather(*(one(i) for i in range(n)))
    return counts


async def warm_up(runner: RequestRunner, concurrency: int = 8) -> None:
    """Completes `concurrency` requests at once, so the workers' thread pools and KV channel
    exist before a footprint is taken."""

    async def one(i: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        chunks = [c async for c in runner.run(f"warm-{i}", prompts_of([12], seed=i)[0], params)]
        assert chunks[-1].finished

    await asyncio.gather(*(one(i) for i in range(concurrency)))


def runner_over(prefill: WorkerRef, decode: WorkerRef) -> RequestRunner:
    """The router's request path over one fixed prefill/decode pair."""
    return RequestRunner(FixedPlacement(prefill, decode), RunnerConfig(transfer_timeout_s=10.0))


async def measure(n: int, checkpoint: str) -> None:
    """Starts a prefill and a decode worker, cancels `n` streams, prints the footprints."""
    from pdserve.engine import EngineConfig
    from pdserve.roles.worker import start_worker

    config = EngineConfig(
        model=checkpoint,
        dtype="float32",
        block_size=4,
        num_threads=1,
        progress=False,
        kv_cache_blocks=KV_BLOCKS,
    )
    refs = []
    for role in ("prefill", "decode"):
        handle = start_worker(f"storm-{role}", config, role)
        refs.append(WorkerRef(f"storm-{role}", handle, await handle.ready.remote()))
    runner = runner_over(*refs)
    await warm_up(runner)
    _, before = await wait_idle(refs, 10.0)
    start = time.monotonic()
    counts = await storm(runner, n)
    elapsed = time.monotonic() - start
    settle_s, after = await wait_idle(refs, 30.0)
    print(f"{n} cancelled streams in {elapsed:.1f} s; idle {settle_s:.2f} s after the last cancel")
    for moment, reads in counts.items():
        print(f"  {len(reads):4d} {moment} (chunks read: {sorted(set(reads))})")
    for ref, b, a in zip(refs, before, after):
        print(
            f"{ref.worker_id}: fds {b.open_fds} -> {a.open_fds}, threads {b.threads} -> {a.threads}, "
            f"blocks free {a.blocks_free}/{a.blocks_total}, running {a.running}, waiting {a.waiting}, "
            f"unsent {a.pending_sends}"
        )


def main() -> None:
    """`python -m tests.reliability.cancel_storm [N]`: the storm on a fresh tiny checkpoint."""
    import tempfile
    from pathlib import Path

    import ray

    from tests.conftest import make_checkpoint

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp), moe=True, tokenizer=True)
        asyncio.run(measure(n, str(checkpoint)))
    ray.shutdown()


if __name__ == "__main__":
    main()
