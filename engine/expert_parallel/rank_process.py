"""`RankProcesses`: an expert-parallel group's rank processes and the owner's calls into them.

Each rank is a spawned process running one `Engine` (see group.py) that answers its owner's
commands over a pipe. Every wait is bounded and watches every rank at once: a rank that exits,
fails to answer in time or breaks its pipe fails the whole group at once (`GroupFailed`, the
ranks killed), even while the others sit in a collective waiting for it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import resource
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.engine.block_pool import KVCacheEvent
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.expert_parallel.collective import RendezvousStore
from pdserve.engine.expert_parallel.placement import ExpertPlacement
from pdserve.engine.expert_parallel.rank import ExpertParallelRank, install_placement
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.process_memory import resident_bytes
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.stats import EngineStats, RankLoad

# How often a wait on the ranks looks at whether they are still alive.
POLL_S = 0.2


class GroupFailed(RuntimeError):
    """A rank died, timed out or failed a step; the group is closed."""


def _rank_main(config: EngineConfig, ep: ExpertParallelRank, conn) -> None:
    """A rank process: builds its engine, then runs the owner's commands until told to close.

    Every answer is (status, value, the prefix-cache changes since the last answer), so the
    owner sees a rank's cache in the order its commands changed it. While the engine is built,
    ("phase", what it is doing, []) messages come first, for the worker's start-up progress."""
    conn.send(("phase", "importing the engine", []))
    from pdserve.engine.engine import Engine

    cache_events: list[KVCacheEvent] = []

    def answer(status: str, value: Any) -> None:
        conn.send((status, value, cache_events[:]))
        cache_events.clear()

    try:
        engine = Engine(
            config,
            expert_parallel_rank=ep,
            on_cache_event=cache_events.append,
            on_phase=lambda phase: conn.send(("phase", phase, [])),
        )
    except BaseException as e:
        answer("err", _portable(e))
        return
    answer("ok", engine.dispatcher.placement)
    commands = _RankCommands(engine)
    while True:
        try:
            name, args, kwargs = conn.recv()
        except EOFError:  # the owner is gone
            return
        if name == "close":
            answer("ok", None)
            return
        try:
            answer("ok", getattr(commands, name)(*args, **kwargs))
        except BaseException as e:
            answer("err", _portable(e))


def _portable(e: BaseException) -> BaseException:
    """The exception if it pickles (ValueError and the like do), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
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

    def add_request(
        self, request_id: str, ids: list[int], params: SamplingParams, prefill_only: bool
    ) -> None:
        self.engine.add_request(request_id, ids, params, prefill_only=prefill_only)

    def engine_call(self, method: str, *args: Any) -> Any:
        """An `Engine` method the group forwards as is (export_kv, reserve_kv, abort, ...)."""
        return getattr(self.engine, method)(*args)

    def facts(self) -> tuple[Any, tuple[int, ...], Any]:
        """What the engine worked out once: its `ServedModel`, KV block shape and KV dtype."""
        return self.engine.served_model, self.engine.kv_block_shape, self.engine.kv_dtype

    def engine_stats(self) -> EngineStats:
        """The engine's stats, with this rank's line (`RankLoad`) as their `ranks`."""
        stats = self.engine.stats()
        stats.ranks = [
            RankLoad(
                rank=self.dispatcher.rank,
                pid=os.getpid(),
                kv_blocks_total=stats.kv_blocks_total,
                kv_blocks_free=stats.kv_blocks_free,
                num_running=stats.num_running,
                num_waiting=stats.num_waiting,
                expert_tokens=sum(self.dispatcher.stats.layer_rows.values()),
                rss_bytes=resident_bytes(),
            )
        ]
        return stats

    def install(self, placement: ExpertPlacement) -> None:
        install_placement(self.engine.model, self.dispatcher, placement)

    def take_expert_tokens(self) -> dict[int, list[int]]:
        counts = self.dispatcher.stats.expert_tokens
        self.dispatcher.stats.expert_tokens = {}
        return counts

    def stats(self) -> dict[str, Any]:
        s = self.dispatcher.stats
        return {
            "rank": self.dispatcher.rank,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "dispatch_seconds": s.seconds,
            "expert_compute_seconds": s.compute_seconds,
            "split_compute_seconds": s.split_seconds,
            "split_rounds": s.split_rounds,
            "lookup_rounds": s.lookup_rounds,
            "rounds": s.rounds,
            "rows_sent": s.rows_sent,
            "rows_received": s.rows_received,
            "layer_rows": dict(s.layer_rows),
            "step_seconds": self.busy_seconds,
            "steps": self.engine.counters.num_steps,
        }


class RankProcesses:
    """Starts `config.expert_parallel.size` rank processes and calls their commands.

    `call(rank, name, ...)` and `call_all(name, ...)` run a `_RankCommands` method and return its
    result, re-raising a command's own error; any sign of a dead or stuck rank raises
    `GroupFailed` after killing every rank. `on_cache_events(rank, events)` hears each rank's
    prefix-cache changes as its answers bring them, `on_phase(rank, phase)` what each rank is doing
    while it starts.
    """

    def __init__(
        self,
        config: EngineConfig,
        store_prefix: str,
        host: str,
        start_timeout_s: float,
        on_cache_events: Callable[[int, list[KVCacheEvent]], None] | None = None,
        on_phase: Callable[[int, str], None] | None = None,
    ) -> None:
        ep = config.expert_parallel
        self.size = ep.size
        self.timeout_s = ep.timeout_s + 30.0  # a collective's own timeout fires first
        self.failure: str | None = None
        self._on_cache_events = on_cache_events
        self._on_phase = on_phase
        self._store = RendezvousStore(store_prefix, host, ep.timeout_s)
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for rank in range(self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_rank_main,
                args=(config, ExpertParallelRank(rank, ep, self._store.address), child),
                name=f"pdserve-ep-rank{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._procs, self._store)
        self.placements: list[ExpertPlacement] = self._gather(range(self.size), start_timeout_s)

    @property
    def pids(self) -> list[int]:
        """The rank processes' ids, by rank."""
        return [p.pid for p in self._procs]

    def alive(self) -> list[bool]:
        """Whether each rank's process is running, by rank."""
        return [p.is_alive() for p in self._procs]

    def call(self, rank: int, name: str, *args, **kwargs):
        self._send(rank, name, args, kwargs)
        return self._gather([rank], self.timeout_s)[0]

    def call_all(self, name: str, *args, **kwargs) -> list:
        for rank in range(self.size):
            self._send(rank, name, args, kwargs)
        return self._gather(range(self.size), self.timeout_s)

    def close(self) -> None:
        """Stops the rank processes (politely: each finishes its command first)."""
        self._finalizer()

    def _send(self, rank: int, name: str, args: Sequence, kwargs: dict) -> None:
        if self.failure is not None:
            raise GroupFailed(self.failure)
        try:
            self._conns[rank].send((name, tuple(args), kwargs))
        except (OSError, EOFError, ValueError) as e:
            self._fail(f"rank {rank} is gone ({e})")

    def _gather(self, ranks: Sequence[int], timeout_s: float) -> list:
        """The answers of `ranks`, in order, waiting on all of them at once. Every rank's answer
        is taken before a command's error is raised (the pipes stay in step)."""
        answers: dict[int, tuple[str, Any, list[KVCacheEvent]]] = {}
        deadline = time.monotonic() + timeout_s
        while len(answers) < len(ranks):
            waiting = [r for r in ranks if r not in answers]
            ready = mp.connection.wait([self._conns[r] for r in waiting], POLL_S)
            for rank in waiting:
                conn = self._conns[rank]
                if conn in ready:
                    try:
                        message = conn.recv()
                    except (OSError, EOFError) as e:
                        self._fail(f"rank {rank} is gone ({e})")
                    if message[0] != "phase":
                        answers[rank] = message
                    elif self._on_phase is not None:
                        self._on_phase(rank, message[1])
            for rank in range(self.size):  # any rank's death stops the others' collectives too
                self._check_alive(rank, answers.get(rank))
            if time.monotonic() > deadline:
                late = [r for r in ranks if r not in answers]
                self._fail(f"rank {late[0]} did not answer within {timeout_s:.0f} s")
        if self._on_cache_events is not None:
            for rank in ranks:
                if answers[rank][2]:
                    self._on_cache_events(rank, answers[rank][2])
        errors = [value for status, value, _ in answers.values() if status == "err"]
        if errors:
            raise errors[0]
        return [answers[r][1] for r in ranks]

    def _check_alive(self, rank: int, answer: tuple | None) -> None:
        """Fails the group when `rank` has exited, once its last words are read: a rank that
        exits right after answering (a refused config) may be seen dead before its answer is."""
        if self._procs[rank].is_alive() or (answer is None and self._conns[rank].poll()):
            return  # alive, or its answer (or EOF) is still in the pipe: the next round reads it
        if answer is not None and answer[0] == "err":  # its own error says why (a refused config)
            self._fail(f"rank {rank} stopped on an error", error=answer[1])
        self._fail(f"rank {rank} exited (code {self._procs[rank].exitcode})")

    def _fail(self, why: str, error: BaseException | None = None) -> None:
        """Closes the group for good and raises `error`, or GroupFailed saying `why`."""
        self.failure = f"expert-parallel group failed: {why}; the group was closed"
        for proc in self._procs:  # not politely: a rank may be stuck in a collective
            if proc.is_alive():
                proc.kill()
        self.close()
        raise error if error is not None else GroupFailed(self.failure)


def _stop(conns, procs, store: RendezvousStore) -> None:
    for conn, proc in zip(conns, procs):
        if proc.is_alive():
            with contextlib.suppress(OSError, EOFError, ValueError):
                conn.send(("close", (), {}))
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    for conn in conns:
        conn.close()
    store.close()
