"""`ExpertParallelGroup`: one MoE replica on N rank processes, driven like one `Engine`.

Each rank is a process with its own `Engine` (its own scheduler and paged KV cache: attention is
data parallel) holding its share of the routed experts. The group places each request on the
rank with the fewest unfinished ones, and steps all ranks together: a rank with nothing to run
still serves the others' dispatch rounds (see dispatch.py). Every wait on a rank is bounded, and
a rank that dies or fails takes the group down with a `GroupFailed` naming it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time
import traceback
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.expert_parallel.collective import RendezvousStore
from pdserve.engine.expert_parallel.metrics import ExpertParallelMetrics
from pdserve.engine.expert_parallel.placement import ExpertPlacement, rank_imbalance
from pdserve.engine.expert_parallel.rank import ExpertParallelRank, install_placement
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long a rank may take to load its share of the model before the group gives up on it.
START_TIMEOUT_S = 600.0


class GroupFailed(RuntimeError):
    """A rank died, timed out or failed a step; the group is closed."""


def _rank_main(config: EngineConfig, ep: ExpertParallelRank, conn) -> None:
    """A rank process: builds its engine, then runs the owner's commands until told to close."""
    from pdserve.engine.engine import Engine

    try:
        engine = Engine(config, expert_parallel_rank=ep)
    except BaseException as e:
        conn.send(("err", _portable(e)))
        return
    conn.send(("ok", engine.dispatcher.placement))
    commands = _RankCommands(engine)
    while True:
        try:
            name, args = conn.recv()
        except EOFError:
            return
        if name == "close":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(commands, name)(*args)))
        except BaseException as e:
            conn.send(("err", _portable(e)))


def _portable(e: BaseException) -> BaseException:
    """The exception if it pickles (ValueError and the like do), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


class _RankCommands:
    """What a rank process does for its owner (one method per command)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.dispatcher = engine.dispatcher
        self.busy_seconds = 0.0  # group steps, own step and serving others' rounds together

    def step(self) -> tuple[list[RequestDelta], bool]:
        started = time.perf_counter()
        try:
            return self.engine.step(), self.engine.has_unfinished()
        finally:
            # Even after an error: the other ranks' rounds need this one until they finish too.
            self.dispatcher.finish_step()
            self.busy_seconds += time.perf_counter() - started

    def add_request(self, request_id: str, ids: list[int], params: SamplingParams) -> None:
        self.engine.add_request(request_id, ids, params)

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def tokenize(self, prompt) -> list[int]:
        return self.engine.tokenize(prompt)

    def install(self, placement: ExpertPlacement) -> None:
        install_placement(self.engine.model, self.dispatcher, placement)

    def take_expert_tokens(self) -> dict[int, list[int]]:
        counts = self.dispatcher.stats.expert_tokens
        self.dispatcher.stats.expert_tokens = {}
        return counts

    def stats(self) -> dict[str, Any]:
        import resource

        s = self.dispatcher.stats
        return {
            "rank": self.dispatcher.rank,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "dispatch_seconds": s.seconds,
            "expert_compute_seconds": s.compute_seconds,
            "rounds": s.rounds,
            "rows_sent": s.rows_sent,
            "rows_received": s.rows_received,
            "layer_rows": dict(s.layer_rows),
            "step_seconds": self.busy_seconds,
            "steps": self.engine.counters.num_steps,
        }


class ExpertParallelGroup:
    """N ranks serving one MoE replica (`config.expert_parallel.size`), with `Engine`'s driving API:
    `tokenize`, `add_request`, `abort`, `has_unfinished`, `step`, `tokenizer`."""

    def __init__(self, config: EngineConfig, host: str = "127.0.0.1") -> None:
        self.config = config
        ep = config.expert_parallel
        self.size = ep.size
        self._timeout_s = ep.timeout_s + 30.0  # a collective's own timeout fires first
        self.name = f"ep-{uuid.uuid4().hex[:12]}"  # the store's key prefix and the metrics' label
        self._store = RendezvousStore(self.name, host, ep.timeout_s)
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for rank in range(self.size):
            parent, child = ctx.Pipe()
            rank_config = replace(config, expert_parallel=replace(ep, size=ep.size))
            proc = ctx.Process(
                target=_rank_main,
                args=(rank_config, ExpertParallelRank(rank, ep, self._store.address), child),
                name=f"pdserve-ep-rank{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._procs, self._store)
        placements = self._gather(START_TIMEOUT_S)
        self.placement: ExpertPlacement = placements[0]
        self._rank_of: dict[str, int] = {}
        self._unfinished = [False] * self.size
        self._tokenizer = None
        self._rebalanced_at = time.monotonic()
        self.expert_tokens: dict[int, list[int]] = {}  # since the last rebalance, summed over ranks
        self.metrics = ExpertParallelMetrics(self.name)
        self.metrics.ranks.labels(self.name).set(self.size)
        self.metrics.placement_version.labels(self.name).set(self.placement.version)

    # ------------------------------------------------------------------ Engine's API

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from pdserve.engine.model_source import resolve_model
            from pdserve.engine.tokenizer import load_tokenizer

            source = resolve_model(self.config.model)
            if self.config.tokenizer or source.has_tokenizer:
                self._tokenizer = load_tokenizer(self.config.tokenizer or source.path)
        return self._tokenizer

    def tokenize(self, prompt) -> list[int]:
        return self._call(0, "tokenize", prompt)

    def add_request(self, request_id: str, ids: list[int], params: SamplingParams) -> None:
        """Queues a request on the rank with the fewest unfinished requests."""
        load = [0] * self.size
        for rank in self._rank_of.values():
            load[rank] += 1
        rank = min(range(self.size), key=lambda r: (load[r], r))
        self._call(rank, "add_request", request_id, ids, params)
        self._rank_of[request_id] = rank
        self._unfinished[rank] = True

    def abort(self, request_id: str) -> bool:
        rank = self._rank_of.pop(request_id, None)
        return rank is not None and self._call(rank, "abort", request_id)

    def has_unfinished(self) -> bool:
        return any(self._unfinished)

    def step(self) -> list[RequestDelta]:
        """One step of every rank at once; the deltas of all of them."""
        interval = self.config.expert_parallel.rebalance_interval_s
        if interval is not None and time.monotonic() - self._rebalanced_at >= interval:
            self.rebalance()
        deltas = []
        for rank, (rank_deltas, unfinished) in enumerate(self._call_all("step")):
            self._unfinished[rank] = unfinished
            for delta in rank_deltas:
                if delta.finished:
                    self._rank_of.pop(delta.request_id, None)
            deltas.extend(rank_deltas)
        return deltas

    # ------------------------------------------------------------------ balancing and stats

    def collect_expert_tokens(self) -> dict[int, list[int]]:
        """Adds the ranks' token counts per expert since the last call to `expert_tokens`."""
        for counts in self._call_all("take_expert_tokens"):
            self.metrics.add_expert_tokens(counts)
            for layer, per_expert in counts.items():
                total = self.expert_tokens.setdefault(layer, [0] * len(per_expert))
                for e, n in enumerate(per_expert):
                    total[e] += n
        return self.expert_tokens

    def imbalance(self, placement: ExpertPlacement | None = None) -> float:
        """max/mean tokens per rank for the counted tokens, under `placement` (default: current)."""
        return rank_imbalance(placement or self.placement, self.collect_expert_tokens())

    def rebalance(self) -> ExpertPlacement:
        """Re-places spare copies from the counted tokens: weights first, then the routing table,
        between steps; the counts start over."""
        new = self.placement.rebalanced(self.collect_expert_tokens())
        self._call_all("install", new)
        self.placement = new
        self.expert_tokens = {}
        self._rebalanced_at = time.monotonic()
        self.metrics.rebalances.labels(self.name).inc()
        self.metrics.placement_version.labels(self.name).set(new.version)
        logger.info("expert-parallel group rebalanced (placement v%d)", new.version)
        return new

    def rank_stats(self) -> list[dict[str, Any]]:
        """Per rank: peak RSS, seconds in dispatch/combine, rounds, rows moved, rows computed per
        MoE layer, step seconds."""
        return self._call_all("stats")

    def metrics_text(self) -> str:
        """The group's Prometheus metrics (see metrics.py), brought up to date from the ranks."""
        self.metrics.rank_stats(self.rank_stats())
        self.metrics.imbalance.labels(self.name).set(self.imbalance())
        return self.metrics.text()

    def close(self) -> None:
        """Stops the rank processes."""
        self._finalizer()

    # ------------------------------------------------------------------ plumbing

    def _call(self, rank: int, name: str, *args):
        self._send(rank, name, args)
        return self._receive(rank, self._timeout_s)

    def _call_all(self, name: str, *args) -> list:
        for rank in range(self.size):
            self._send(rank, name, args)
        return self._gather(self._timeout_s)

    def _send(self, rank: int, name: str, args: Sequence) -> None:
        try:
            self._conns[rank].send((name, tuple(args)))
        except (OSError, EOFError) as e:
            self._fail(f"rank {rank} is gone ({e})")

    def _gather(self, timeout_s: float) -> list:
        results, error = [], None
        for rank in range(self.size):
            try:
                results.append(self._receive(rank, timeout_s))
            except GroupFailed:
                raise
            except Exception as e:
                error = error or e
                results.append(None)
        if error is not None:
            raise error
        return results

    def _receive(self, rank: int, timeout_s: float):
        conn, proc = self._conns[rank], self._procs[rank]
        deadline = time.monotonic() + timeout_s
        while not conn.poll(0.2):
            if not proc.is_alive():
                self._fail(f"rank {rank} exited (code {proc.exitcode})")
            if time.monotonic() > deadline:
                self._fail(f"rank {rank} did not answer within {timeout_s:.0f} s")
        try:
            status, value = conn.recv()
        except (OSError, EOFError) as e:
            self._fail(f"rank {rank} is gone ({e})")
        if status == "err":
            raise value
        return value

    def _fail(self, why: str) -> None:
        self.close()
        raise GroupFailed(f"expert-parallel group failed: {why}; the group was closed")


def _stop(conns, procs, store: RendezvousStore) -> None:
    for conn, proc in zip(conns, procs):
        if proc.is_alive():
            with contextlib.suppress(OSError, EOFError):
                conn.send(("close", ()))
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    for conn in conns:
        conn.close()
    store.close()
