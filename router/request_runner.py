"""Runs one request to completion across worker failures.

The runner asks a `Placement` for workers, streams the request through them (disaggregated,
or colocated on a `both` worker), and when a worker dies or a transfer fails it continues on
other workers from the prompt plus the tokens already streamed, so the caller sees every
token exactly once. A new attempt gets a new engine request id (`<id>~<attempt>`) because the
failed attempt may still linger on a surviving worker until its cleanup lands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from pdserve.engine import SamplingParams
from pdserve.engine.errors import InvalidRequestError
from pdserve.roles.chunk_feed import ChunkFeeds
from pdserve.roles.errors import MoveFailed, RoleError
from pdserve.roles.handoff import (
    ChannelGenerations,
    NoRoomError,
    WorkerRef,
    generate_colocated,
    generate_disaggregated,
)
from pdserve.roles.messages import TokenChunk
from pdserve.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

# Times one request may be sent around switching workers before that counts as failures.
MAX_REDIRECTS = 8


class RequestFailed(RuntimeError):
    """A request could not be completed: no room in time, or too many failed attempts."""


class NoRoomInTime(RequestFailed):
    """No decode worker had room for the request within the admission timeout."""


@dataclass
class Route:
    """Where one attempt runs: `prefill` None means computed whole on `decode` (a `both` worker,
    or a decode worker that prefills a short prompt itself)."""

    prefill: WorkerRef | None
    decode: WorkerRef
    charges: object = None  # what the placement counted against the workers, handed back in `settled`


class Placement(Protocol):
    """Chooses workers for a request (the router's policies implement this)."""

    async def choose(self, prompt_token_ids: list[int], avoid: set[str], group: str | None = None) -> Route:
        """A route avoiding the worker ids in `avoid` where possible; raises when none is alive.

        Requests of one `group` prefill where the group's first request did, while that worker lives.
        """
        ...

    async def failed(self, worker_id: str) -> None:
        """A call to this worker failed; the controller should check it now."""
        ...

    def settled(self, route: Route) -> None:
        """The route's prefill is over (first token out, or the attempt ended): stop counting it."""
        ...

    async def decode_target(self, num_tokens: int, avoid: set[str]) -> WorkerRef | None:
        """A serving decode worker, not in `avoid`, with room for `num_tokens` tokens of KV (or None)."""
        ...


@dataclass
class RunnerConfig:
    """Limits on retrying: how many continuations after failures, how long to wait for room."""

    max_migrations: int = 3
    transfer_timeout_s: float = 30.0
    admission_timeout_s: float = 30.0  # waiting for a decode worker with free blocks
    admission_poll_s: float = 0.05


class RequestRunner:
    """Streams requests through the cluster, continuing them elsewhere when workers fail."""

    def __init__(
        self, placement: Placement, config: RunnerConfig | None = None, metrics: RouterMetrics | None = None
    ) -> None:
        self.placement = placement
        self.config = config or RunnerConfig()
        self.metrics = metrics
        self.waiting_for_room = 0  # requests in admission, waiting for a decode worker with room
        self.channels = ChannelGenerations()
        self.feeds = ChunkFeeds(*_feed_metrics(metrics))
        self.after_prefill: Callable[[str], Awaitable[None]] | None = None

    async def run(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, group: str | None = None
    ) -> AsyncIterator[TokenChunk]:
        """Yields the request's chunks, each token once, whatever fails underneath (`group`:
        see `Placement.choose`)."""
        emitted: list[int] = []
        avoid: set[str] = set()
        cached: int | None = None
        from_redis = 0  # of `cached`, from the context cache (both as the first attempt saw them)
        attempt = failures = redirects = 0
        while failures <= self.config.max_migrations:
            prompt = prompt_token_ids + emitted
            attempt_params = _remaining(params, len(emitted))
            engine_id = request_id if attempt == 0 else f"{request_id}~{attempt}"
            attempt += 1
            route = await self._admit(engine_id, prompt, attempt_params, avoid, group)
            stream = self._attempt(route, engine_id, prompt, attempt_params)
            try:
                async for chunk in stream:
                    self.placement.settled(route)
                    emitted += chunk.token_ids
                    if cached is None:
                        cached, from_redis = chunk.num_cached_tokens, chunk.num_context_cached_tokens
                    yield replace(
                        chunk,
                        request_id=request_id,
                        num_prompt_tokens=len(prompt_token_ids),
                        num_cached_tokens=cached,
                        num_context_cached_tokens=from_redis,
                    )
                    if chunk.finished:
                        return
                return
            except NoRoomError:
                continue  # lost a race for the reserved room: choose again
            except InvalidRequestError:
                raise  # the request itself is wrong: another worker would refuse it too
            except Exception as e:
                switching = _switching_worker(e)
                if switching is not None and redirects < MAX_REDIRECTS:
                    # A worker switching role refused it, or none could take a request moved off
                    # one: not a failure, so it does not use up a migration; the next goes elsewhere.
                    redirects += 1
                    avoid.add(switching)
                    log.info(
                        "request %s goes around %s (%s)", request_id, switching, str(e).splitlines()[0][:200]
                    )
                    await asyncio.sleep(self.config.admission_poll_s * (redirects > 1))
                    continue
                failures += 1
                failed = await self._failed_workers(route)
                avoid |= failed or {route.decode.worker_id}
                log.warning(
                    "request %s attempt %d failed after %d tokens (%s); dead workers: %s",
                    request_id,
                    attempt,
                    len(emitted),
                    str(e).splitlines()[0][:200],
                    sorted(failed) or "none",
                )
            finally:
                self.placement.settled(route)
                await stream.aclose()  # runs the attempt's own cleanup now, not at garbage collection
        raise RequestFailed(
            f"request {request_id} failed {self.config.max_migrations + 1} times; giving up "
            f"after {len(emitted)} tokens (raise max_migrations to keep trying)"
        )

    def _attempt(self, route: Route, engine_id: str, prompt: list[int], params: SamplingParams):
        if route.prefill is None:
            return generate_colocated(
                route.decode,
                engine_id,
                prompt,
                params,
                self.channels,
                self.feeds,
                self.config.transfer_timeout_s,
                self._move_target,
            )
        return generate_disaggregated(
            route.prefill,
            route.decode,
            engine_id,
            prompt,
            params,
            self.channels,
            self.feeds,
            self.config.transfer_timeout_s,
            self.after_prefill,
            self._move_target,
        )

    async def _move_target(self, num_tokens: int, avoid: set[str]) -> WorkerRef | None:
        """Where a request moved off a decode worker continues (see roles.handoff)."""
        target = await self.placement.decode_target(num_tokens, avoid)
        if self.metrics is not None:
            self.metrics.live_migrations.labels("moved" if target is not None else "no_room").inc()
        return target

    async def _admit(
        self, engine_id: str, prompt: list[int], params: SamplingParams, avoid: set[str], group: str | None
    ) -> Route:
        """A route whose decode side has room for the prompt; waits (bounded) while none has.

        A decode worker that died a moment ago may still be listed: asking it for its load
        fails, and it joins `avoid` (and the placement hears of it) before choosing again.
        A colocated route is taken as chosen: it allocates as it goes, so the load would only
        say whether the worker lives, and its `generate` call says that as well (a failure the
        runner continues elsewhere). Asking cost a round trip and a wait for the worker's current
        engine step on every request's way to its first token (docs/DECISIONS.md 2026-12-05).
        """
        started = asyncio.get_running_loop().time()
        deadline = started + self.config.admission_timeout_s
        while True:
            route = await self.placement.choose(prompt, avoid, group)
            if route.prefill is None:
                return route
            try:
                load = await route.decode.handle.load.remote()
            except Exception:
                load = None
                avoid.add(route.decode.worker_id)
                await self.placement.failed(route.decode.worker_id)
            # Disaggregated runs need the prompt's blocks now.
            if load is not None and load.room_blocks * load.block_size >= len(prompt) + 1:
                if self.metrics is not None:
                    self.metrics.admission_wait_seconds.observe(asyncio.get_running_loop().time() - started)
                return route
            self.placement.settled(route)  # not placed after all
            if asyncio.get_running_loop().time() > deadline:
                raise NoRoomInTime(
                    f"request {engine_id}: no decode worker had room for {len(prompt)} prompt tokens within "
                    f"{self.config.admission_timeout_s} s; retry later or add decode workers"
                )
            if load is not None:  # no room yet (after a dead worker, another is chosen at once)
                self.waiting_for_room += 1
                try:
                    await asyncio.sleep(self.config.admission_poll_s)
                finally:
                    self.waiting_for_room -= 1

    async def _failed_workers(self, route: Route) -> set[str]:
        """Which of the route's workers no longer answer (and tells the placement about them)."""
        dead = set()
        for ref in (route.prefill, route.decode):
            if ref is None:
                continue
            try:
                await asyncio.wait_for(ref.handle.load.remote(), 5.0)
            except Exception:
                dead.add(ref.worker_id)
                await self.placement.failed(ref.worker_id)
        return dead


def _feed_metrics(metrics: RouterMetrics | None) -> tuple:
    """The chunk feeds' observers: batches and their chunks counted, open feeds as a gauge."""
    if metrics is None:
        return None, None

    def batch(n: int) -> None:
        metrics.feed_batches.inc()
        metrics.feed_chunks.inc(n)

    return batch, metrics.feeds_open.set


def _switching_worker(error: BaseException) -> str | None:
    """The worker to go around when `error` says it is switching role (RoleError, through Ray's
    wrapper) or a request moved off it found no taker (MoveFailed); None for real failures."""
    for e in (error, getattr(error, "cause", None)):
        if isinstance(e, RoleError | MoveFailed) and e.worker_id:
            return e.worker_id
    return None


def _remaining(params: SamplingParams, done: int) -> SamplingParams:
    """The params for continuing after `done` tokens were already emitted."""
    if done == 0:
        return params
    max_tokens = None if params.max_tokens is None else params.max_tokens - done
    guided = params.guided_decoding
    if guided is not None:  # the output so far is in the prompt: its grammar state is past it
        guided = replace(guided, num_output_in_prompt=done)
    return replace(
        params, max_tokens=max_tokens, min_tokens=max(0, params.min_tokens - done), guided_decoding=guided
    )
