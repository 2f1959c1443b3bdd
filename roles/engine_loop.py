"""Drives one `Engine` on a thread of its own for asyncio callers (the worker actor).

The engine is not thread-safe, so every touch of it (adding, aborting, exporting, importing)
is a command run on the loop thread between two steps; tokens go back to per-request streams
(an asyncio queue, or a worker's `RequestSink`), a whole step's in one hop to the event loop.
The event loop therefore never blocks on a forward pass. A step that fails stops the loop for
good: every command then fails with `EngineStopped` (a worker's load report too, so the controller
sees the worker as dead and replaces it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pdserve.engine import Engine, RequestDelta
from pdserve.engine.expert_parallel.group import ExpertParallelGroup

T = TypeVar("T")
log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine's step failed (an expert-parallel group lost a rank, a bug); it runs no more."""


class Stream(Protocol):
    """Where one request's deltas go (an asyncio.Queue, a `roles.chunk_feed.RequestSink`)."""

    def put_nowait(self, item: object) -> None: ...


class EngineLoop:
    """Owns the engine thread: runs commands, steps while there is work, routes deltas."""

    def __init__(
        self, engine: Engine | ExpertParallelGroup, loop: asyncio.AbstractEventLoop, idle_wait_s: float = 0.05
    ) -> None:
        self.engine = engine
        self._loop = loop
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[tuple[Callable[[Any], object], asyncio.Future]] = (
            queue.SimpleQueue()
        )
        self._streams: dict[str, Stream] = {}
        self._stopped = threading.Event()
        self.failure: str | None = None  # why the step failed; set once, before _stopped
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Runs `fn(engine)` on the engine thread and returns its result (or raises its error;
        `EngineStopped` once a step has failed)."""
        future: asyncio.Future = self._loop.create_future()
        self._commands.put((fn, future))
        if self.failure is not None:  # the engine thread is gone: nobody else will answer it
            self._fail_pending()
        return await future

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestDelta]:
        """A queue that receives the request's deltas; open it before the request can step."""
        stream: asyncio.Queue[RequestDelta] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def attach(self, request_id: str, stream: Stream) -> None:
        """Sends the request's deltas to `stream`; attach it before the request can step."""
        self._streams[request_id] = stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def push(self, request_id: str, item: object) -> None:
        """Puts `item` on an open stream after the deltas already delivered (a worker's marker:
        the request moved to another worker, or was handed back to the router)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)  # type: ignore[arg-type]

    def end_stream(self, request_id: str) -> None:
        """Ends an open stream with an "abort" delta (the request was aborted, so no more come)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(RequestDelta(request_id, [], "", None, True, "abort", None, 0, 0))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:
                # A failing step would fail every later one the same way; stop loudly.
                log.exception("engine step failed; the worker stops serving")
                self.failure = f"the engine stopped: {type(e).__name__}: {e}".splitlines()[0]
                self._stopped.set()
                self._fail_pending()
                return
            if deltas:  # one wake-up of the event loop per step, however many requests stepped
                self._loop.call_soon_threadsafe(self._deliver, deltas)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            try:
                result = fn(self.engine)
            except Exception as e:
                self._loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                self._loop.call_soon_threadsafe(_set_result, future, result)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_pending(self) -> None:
        """Fails every command waiting for the stopped engine thread with `EngineStopped`."""
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            self._loop.call_soon_threadsafe(_set_exception, future, EngineStopped(self.failure))

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put_nowait(delta)


def _set_result(future: asyncio.Future, result: object) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
