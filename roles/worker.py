"""The `Worker` Ray actor: one engine replica in the prefill, decode or both role.

- `both`: `generate` serves whole requests (the colocated baseline).
- `prefill`: `prefill` computes a prompt's KV and first token, keeps a copy of the request's
  blocks in an outbox, and `send_kv` ships it to the decode worker over the KV transport.
- `decode`: `reserve` sets blocks aside before the prefill side sends; `decode` receives the
  KV into them and starts the rest of the tokens.

The tokens of requests started by `generate` and `decode` reach their router on its chunk feed
(a link, `roles.feed_link`, opened at `feed_address`; see `roles.chunk_feed`): one batch per
engine step for all of them. The same link carries the worker's prefix-cache changes to the
router's index (a snapshot first, then what changed).

`set_role` switches role without reloading weights once the old role's work has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from pdserve.engine import Engine, EngineConfig, KVCacheEvent, KVPayload, SamplingParams
from pdserve.engine.expert_parallel.group import ExpertParallelGroup
from pdserve.engine.served_model import ServedModel
from pdserve.roles.aborted_requests import AbortedRequests
from pdserve.roles.cache_events import CacheEventBatch, CacheEventLog
from pdserve.roles.chunk_feed import ChunkOutbox
from pdserve.roles.cpu_binding import bind_this_process
from pdserve.roles.engine_loop import EngineLoop
from pdserve.roles.errors import RoleError
from pdserve.roles.feed_link import (
    Batch,
    CacheEvents,
    FeedAddress,
    FeedServer,
    Reply,
    Resync,
    StartCall,
    WorkerLink,
)
from pdserve.roles.kv_transfer import Channel, Endpoint, make_transport, transfer_tag
from pdserve.roles.messages import ROLES, Handoff, PrefillResult, RoleSwitch, Started, TokenChunk, WorkerLoad
from pdserve.roles.metrics import WorkerMetrics
from pdserve.roles.process_usage import ProcessUsage

log = logging.getLogger(__name__)

# How soon a feed link carries prefix-cache changes made while none of its requests stepped (a
# prefill worker's, say); with requests stepping, they go with the step's batch.
CACHE_EVENTS_EVERY_S = 0.1


@dataclass
class _HandedBack:
    """Stream marker: the request was given back to the router before it started here."""


class Worker:
    """Hosts one engine; wrap with `ray.remote` (see `pdserve.roles.start_worker`)."""

    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        role: str = "both",
        kv_backend: str = "gloo",
        host: str | None = "127.0.0.1",
        cores: tuple[int, ...] | None = None,
    ) -> None:
        """`host`: the address its KV transport listens on; None: this node's address as Ray
        knows it (workers on other machines must reach it). `cores`: the CPU cores it keeps to
        itself (cluster/core_plan.py), bound before any engine thread starts; None: the OS places it."""
        _check_role(role)
        self.cores = bind_this_process(cores) if cores else None
        self.worker_id = worker_id
        self.role = role
        self._draining = False  # switching role: refuses new work until the switch is done
        self._drained = False  # an operator's drain: refuses new work until undrained
        self._kv_sent: dict[str, int] = {}  # KV bytes sent, by receiving worker id
        self._engine_config = engine_config
        self._kv_backend = kv_backend
        self._host = host
        self._loop: EngineLoop | None = None
        self._building: asyncio.Task[EngineLoop] | None = None
        self._phase = "starting"
        self._transport = None
        self._outbox: dict[str, KVPayload] = {}
        self._feeds: dict[str, ChunkOutbox] = {}  # by subscriber (a router's feed)
        self._feed_server: FeedServer | None = None
        self._aborted = AbortedRequests()
        self.metrics = WorkerMetrics(worker_id)
        self._cache_events = CacheEventLog(worker_id)
        self.metrics.set_role(None, role)

    async def _engine(self) -> EngineLoop:
        # Built once, on first use, by whichever call comes first; the others wait for the same build.
        if self._loop is None:
            if self._building is None:
                self._building = asyncio.get_running_loop().create_task(self._build())
            await asyncio.shield(self._building)
        assert self._loop is not None
        return self._loop

    async def _build(self) -> EngineLoop:
        # In a thread, so the actor keeps answering (startup_phase) while weights load.
        engine = await asyncio.to_thread(
            build_engine, self._engine_config, self.worker_id, self._cache_events.record, self._set_phase
        )
        self._set_phase("opening the KV transport")
        self._transport = await asyncio.to_thread(
            make_transport, self._kv_backend, self.worker_id, self._host or _node_address()
        )
        # EngineLoop posts results to the actor's event loop, so it is made here, on it.
        self._loop = EngineLoop(engine, asyncio.get_running_loop())
        # The model, Ray's and the engine's start-up objects never die: moved out of the
        # collector's reach, a full collection no longer walks them between steps (TTFT p99 at
        # c=16 64-67 ms against 157-167 ms, docs/DECISIONS.md 2026-12-06).
        gc.freeze()
        self._set_phase("ready")
        return self._loop

    def _set_phase(self, phase: str) -> None:
        self._phase = phase  # a str assignment: safe from the building thread

    # ------------------------------------------------------------------ lifecycle

    async def ready(self) -> Endpoint:
        """Loads the model (if not yet) and returns this worker's KV transfer endpoint."""
        await self._engine()
        assert self._transport is not None
        return self._transport.endpoint

    async def startup_phase(self) -> str:
        """What the worker is doing while it starts ("loading weights 3/57", ...; "ready" once up)."""
        return self._phase

    async def served_model(self) -> ServedModel:
        """What this worker's engine serves and its limits (loads the model if not yet)."""
        loop = await self._engine()
        return await loop.call(lambda e: e.served_model)

    async def load(self) -> WorkerLoad:
        """Current load, for the controller and the router."""
        loop = await self._engine()
        measured_at = time.time()  # before the engine reads its queues: errs toward "not shown yet"
        stats = await loop.call(lambda e: e.stats())
        usage = ProcessUsage.of_this_process().with_ranks(stats.ranks)
        load = WorkerLoad.from_stats(
            stats,
            worker_id=self.worker_id,
            role=self.role,
            num_pending_sends=len(self._outbox),
            block_size=self._engine_config.block_size,
            draining=self._draining,
            usage=usage,
            drained=self._drained,
            kv_sent_bytes=self._kv_sent,
            measured_at=measured_at,
        )
        self.metrics.engine_stats(stats, load.num_pending_sends, usage)
        self.metrics.kv_channels(self._transport.open_channels if self._transport else 0)
        return load

    async def drain(self, drained: bool) -> bool:
        """Drains (True) or undrains (False) the worker: drained, it refuses new work (RoleError,
        which the router answers by going around it) and finishes what it holds. Returns whether
        it was drained before."""
        before, self._drained = self._drained, drained
        log.info("worker %s: %s", self.worker_id, "drained" if drained else "serving again")
        return before

    async def set_role(self, role: str, drain_timeout_s: float = 60.0) -> RoleSwitch:
        """Switches role in place: the weights and the prefix cache stay.

        New work of the old role is refused at once (RoleError: the router sends it elsewhere). A
        prefill worker hands the prompts it has not started back to the router and ships the KV
        of those it computed; a decode worker moves its running requests, KV and all, to other
        decode workers (the router continues each stream there: live migration). RoleError if
        that takes longer than `drain_timeout_s`.
        """
        _check_role(role)
        if role == self.role:
            return RoleSwitch(self.worker_id, role, role, 0.0)
        if self._draining:
            raise RoleError(f"worker {self.worker_id} is already switching role", self.worker_id)
        loop = await self._engine()
        start = time.perf_counter()
        old, moved, handed_back = self.role, 0, 0
        self._draining = True
        try:
            if old == "prefill":
                handed_back = await self._hand_back_unstarted(loop)
            deadline = asyncio.get_running_loop().time() + drain_timeout_s
            while True:
                if old == "decode":  # KV arriving meanwhile (reserved before) moves on too
                    moved += await self._move_running(loop)
                # Reservations whose prompts are still being computed elsewhere are not waited
                # for: their KV arrives here later and moves on at once (see `decode`).
                if not self._outbox and not await loop.call(lambda e: e.has_unfinished()):
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise RoleError(
                        f"worker {self.worker_id} did not drain within {drain_timeout_s} s", self.worker_id
                    )
                await asyncio.sleep(0.02)
            self.metrics.set_role(old, role)
            self.role = role
        finally:
            self._draining = False
        switch = RoleSwitch(self.worker_id, old, role, time.perf_counter() - start, moved, handed_back)
        log.info("worker %s: role %s -> %s in %.2f s (%d moved, %d handed back)", self.worker_id, old, role,
                 switch.seconds, moved, handed_back)  # fmt: skip
        return switch

    async def _move_running(self, loop: EngineLoop, request_ids: list[str] | None = None) -> int:
        """Takes every decoding request (or those of `request_ids`) out of the engine at a step
        boundary, its KV into the outbox, and ends its stream with the handoff (the router moves
        it to another worker)."""

        def take(engine: Engine) -> list[KVPayload]:
            payloads = []
            for request_id in engine.request_ids() if request_ids is None else request_ids:
                try:
                    payload = engine.export_kv(request_id)
                except KeyError:  # still computing its prompt (or preempted): moved on a later round
                    continue
                engine.release_exported(request_id)
                payloads.append(payload)
            return payloads

        payloads = await loop.call(take)
        for payload in payloads:
            self._outbox[payload.request_id] = payload
            loop.push(payload.request_id, _moved_chunk(payload.request_id, Handoff.of(payload)))
        return len(payloads)

    async def _hand_back_unstarted(self, loop: EngineLoop) -> int:
        """Gives the router back every prompt not started here (it places them on another worker)."""

        def take(engine: Engine) -> list[str]:
            ids = engine.unstarted_request_ids()
            for request_id in ids:
                engine.abort(request_id)
            return ids

        ids = await loop.call(take)
        for request_id in ids:
            loop.push(request_id, _HandedBack())
        return len(ids)

    # ------------------------------------------------------------------ both

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, subscriber: str
    ) -> Started:
        """Starts a whole request here, its chunks going to `subscriber`'s feed: on a `both`
        worker, or on a decode worker that computes a prompt itself when that beats a transfer
        (the router decides)."""
        self._admit("decode")
        loop = await self._engine()
        return await self._start(
            loop, request_id, subscriber, lambda e: e.add_request(request_id, prompt_token_ids, params)
        )

    async def feed_address(self) -> FeedAddress:
        """Where a router opens its feed link to this worker (`roles.feed_link`)."""
        if self._feed_server is None:
            self._feed_server = FeedServer(self._host or _node_address(), self._serve_feed)
        return await self._feed_server.start()

    async def _serve_feed(self, subscriber: str, link: WorkerLink) -> None:
        """One router's link: its start calls in, every chunk its requests make out, a batch per
        engine step, and this worker's prefix-cache changes. When the link ends, what the router
        still ran here is aborted (nobody would read it)."""
        outbox = self._feeds.setdefault(subscriber, ChunkOutbox())
        cursor = _CacheCursor()
        sender = asyncio.get_running_loop().create_task(self._send_batches(outbox, link, cursor))
        starts: set[asyncio.Task] = set()
        try:
            async for call in link.calls():
                if isinstance(call, Resync):
                    cursor.seq = None
                    continue
                task = asyncio.get_running_loop().create_task(self._answer(call, subscriber, link))
                starts.add(task)
                task.add_done_callback(starts.discard)
        finally:
            sender.cancel()
            for task in list(starts):
                task.cancel()
            self._feeds.pop(subscriber, None)
            if outbox.requests and self._loop is not None:
                orphans = list(outbox.requests)
                log.warning("worker %s: feed %s closed; aborting its %d requests", self.worker_id, subscriber,
                            len(orphans))  # fmt: skip
                for request_id in orphans:
                    self._loop.close_stream(request_id)
                await self._loop.call(lambda e: [e.abort(r) for r in orphans])

    async def _send_batches(self, outbox: ChunkOutbox, link: WorkerLink, cursor: _CacheCursor) -> None:
        """The link's outgoing side: each step's chunks as one batch, and the cache changes since
        the last ones sent (checked after each batch, and every CACHE_EVENTS_EVERY_S), in one write."""
        with contextlib.suppress(ConnectionError):
            while True:
                chunks = await outbox.take(CACHE_EVENTS_EVERY_S)
                frames: list[Batch | CacheEvents] = [Batch(chunks)] if chunks else []
                changes = None if cursor.seq is None else self._cache_events.since(cursor.seq)
                if changes is not None and changes.seq != cursor.seq:
                    cursor.seq = changes.seq
                    frames.append(CacheEvents(changes))
                if frames:
                    await link.send(*frames)
                if changes is None:  # a snapshot waits for the engine thread: the tokens went first
                    snapshot = await self._cache_snapshot()
                    cursor.seq = snapshot.seq
                    await link.send(CacheEvents(snapshot))

    async def _answer(self, call: StartCall, subscriber: str, link: WorkerLink) -> None:
        try:
            reply = Reply(call.call_id, await self.generate(call.request_id, call.prompt_token_ids, call.params,
                                                            subscriber))  # fmt: skip
        except Exception as e:
            reply = Reply(call.call_id, error=e)
        with contextlib.suppress(ConnectionError):
            await link.send(reply)

    async def _start(
        self, loop: EngineLoop, request_id: str, subscriber: str, start: Callable[[Engine], object]
    ) -> Started:
        """Starts a request in the engine (`start`), its chunks going to `subscriber`'s feed.

        A request aborted before it starts here never starts: nobody would read it. A call that
        fails or is cancelled half-way leaves nothing running.
        """
        if request_id in self._aborted:
            return Started(running=False)
        sink = self._feeds.setdefault(subscriber, ChunkOutbox()).sink(request_id, loop.close_stream)
        loop.attach(request_id, sink)
        try:
            await loop.call(start)
        except BaseException:
            sink.detach()
            await loop.call(lambda e: e.abort(request_id))
            raise
        return Started(running=True)

    # ------------------------------------------------------------------ prefill

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> PrefillResult:
        """Computes the prompt's KV and first token; the KV then waits in the outbox for `send_kv`.

        A request aborted before its KV reaches the outbox returns its first chunk marked
        finished ("abort") with no handoff, and holds nothing here.
        """
        self._admit("prefill")
        loop = await self._engine()
        if request_id in self._aborted:
            return PrefillResult(
                TokenChunk(request_id, [], "", True, "abort", None, len(prompt_token_ids), 0), None
            )
        stream = loop.open_stream(request_id)
        try:
            await loop.call(lambda e: e.add_request(request_id, prompt_token_ids, params, prefill_only=True))
            delta = await stream.get()
        except BaseException:
            await loop.call(lambda e: e.abort(request_id))
            raise
        finally:
            loop.close_stream(request_id)
        if isinstance(delta, _HandedBack):  # the worker is leaving the prefill role
            raise RoleError(
                f"worker {self.worker_id} handed the prompt back: it is switching role", self.worker_id
            )
        first = TokenChunk.from_delta(delta)
        if delta.finished:  # finished on its first token (or aborted): nothing to hand over
            return PrefillResult(first, None)
        if request_id in self._aborted:  # aborted after its first token: free the parked request
            await loop.call(lambda e: e.release_exported(request_id))
            return PrefillResult(replace(first, finished=True, finish_reason="abort"), None)

        def export(engine: Engine) -> KVPayload:
            try:
                return engine.export_kv(request_id)
            finally:
                # The outbox holds a copy; the blocks stay in the prefix cache for reuse.
                engine.release_exported(request_id)

        payload = await loop.call(export)
        if request_id in self._aborted:  # aborted while its KV was copied out: drop the copy
            return PrefillResult(replace(first, finished=True, finish_reason="abort"), None)
        self._outbox[request_id] = payload
        return PrefillResult(first, Handoff.of(payload))

    async def send_kv(self, request_id: str, channel: Channel, timeout_s: float) -> int:
        """Ships a prefilled request's KV to the decode worker; returns the bytes sent.

        The decode side is receiving by now, so once called this sends whatever happens to the
        request meanwhile (the router never aborts a request here after calling it); the
        receiver drops KV that arrives for an aborted request.
        """
        payload = self._outbox.pop(request_id, None)
        if payload is None:
            raise KeyError(f"no prefilled KV for request {request_id!r} on worker {self.worker_id}")
        assert self._transport is not None
        kv = payload.kv.contiguous()
        nbytes = kv.numel() * kv.element_size()
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self._transport.send, channel, kv, timeout_s, transfer_tag(request_id))
        except BaseException:
            self.metrics.transfer_failed("send")
            raise
        self.metrics.transfer("send", nbytes, time.perf_counter() - start)
        receiver = channel.receiver.worker_id
        self._kv_sent[receiver] = self._kv_sent.get(receiver, 0) + nbytes
        return nbytes

    # ------------------------------------------------------------------ decode

    async def reserve(self, request_id: str, num_tokens: int) -> bool:
        """Sets aside blocks for a request's incoming KV; False when there is no room (or it was aborted)."""
        self._admit("decode")
        loop = await self._engine()
        if request_id in self._aborted:
            return False
        return await loop.call(lambda e: e.reserve_kv(request_id, num_tokens))

    async def decode(
        self, request_id: str, handoff: Handoff, channel: Channel, timeout_s: float, subscriber: str
    ) -> Started:
        """Receives the request's KV from the prefill worker (or from a decode worker that moved the
        request), then starts the tokens after the ones already sent (on `subscriber`'s feed).

        The KV is received even for a request aborted meanwhile: the sender is sending it, and a
        receive left unposted would hold the sender until its timeout. It is then dropped. Also
        while this worker switches away from decode: the request was reserved before, and moves
        on from here (`Started.moved`).
        """
        loop = await self._engine()
        # A request reserved here before the worker left the decode role still lands here, and
        # moves on at once (its prefill worker is sending; refusing would waste its prefill).
        moving_on = self._draining or self.role not in ("decode", "both")
        if moving_on and not await loop.call(lambda e: e.has_reservation(request_id)):
            self._admit("decode")
        assert self._transport is not None
        block_shape = loop.engine.kv_block_shape
        shape = (*block_shape[:2], handoff.num_blocks, *block_shape[2:])
        buffer = torch.empty(shape, dtype=loop.engine.kv_dtype)
        # A guided request's grammar compiles (or comes from the cache) while its KV travels, so
        # the import on the engine thread only replays the output so far through it.
        guided = handoff.params.guided_decoding is not None and not moving_on
        grammar = loop.engine.compile_grammar(handoff.params) if guided else None
        start = time.perf_counter()
        try:
            await asyncio.to_thread(
                self._transport.recv, channel, buffer, timeout_s, transfer_tag(request_id)
            )
        except BaseException:
            self.metrics.transfer_failed("recv")
            await loop.call(lambda e: e.cancel_reservation(request_id))
            raise
        self.metrics.transfer("recv", buffer.numel() * buffer.element_size(), time.perf_counter() - start)
        state = {f.name: getattr(handoff, f.name) for f in fields(handoff) if f.name != "num_blocks"}
        payload = KVPayload(**state, kv=buffer)
        if moving_on:  # passed on as received: into the outbox, and the router moves it
            await loop.call(lambda e: e.cancel_reservation(request_id))
            if request_id in self._aborted:
                return Started(running=False)
            self._outbox[request_id] = payload
            return Started(running=False, moved=handoff)
        if grammar is not None:  # waited for, not raised: a failure surfaces from import_kv as any other
            await asyncio.wait([asyncio.wrap_future(grammar)])
        return await self._start(loop, request_id, subscriber, lambda e: e.import_kv(payload))

    # ------------------------------------------------------------------ any role

    async def cache_events(self, after: int) -> CacheEventBatch:
        """Prefix-cache changes after sequence number `after`, or a full snapshot when those are gone."""
        batch = self._cache_events.since(after)
        return batch if batch is not None else await self._cache_snapshot()

    async def _cache_snapshot(self) -> CacheEventBatch:
        """Every block hash this worker's prefix cache holds now."""
        loop = await self._engine()
        # Read the sequence number first: changes racing the snapshot are re-sent next time.
        seq = self._cache_events.seq
        hashes = await loop.call(lambda e: e.cached_block_hashes())
        return CacheEventBatch(self.worker_id, seq, snapshot=hashes)

    async def metrics_text(self) -> str:
        """This worker's Prometheus metrics, text exposition format (gauges refreshed now); an
        expert-parallel group's own families (tokens per expert and rank, dispatch time) after."""
        await self.load()
        text = self.metrics.exposition()
        loop = await self._engine()
        if isinstance(loop.engine, ExpertParallelGroup):
            text += await loop.call(lambda group: group.metrics_text())
        return text

    async def abort(self, request_id: str) -> bool:
        """Stops a request and frees its blocks, its reservation or its outbox entry.

        Calls for the request still on their way here (or half-way through) then hold nothing
        either: each checks `_aborted` before it would start holding something.
        """
        self._aborted.add(request_id)
        dropped = self._outbox.pop(request_id, None) is not None
        loop = await self._engine()
        found = await loop.call(lambda e: e.abort(request_id))
        loop.end_stream(request_id)  # a stream still open on it ends instead of waiting forever
        return found or dropped

    async def close_channel(self, channel: Channel) -> None:
        """Closes a KV channel that failed (the router moved the pair to a new generation)."""
        if self._transport is not None:
            await asyncio.to_thread(self._transport.close_channel, channel)

    async def close_peer(self, worker_id: str) -> int:
        """Closes every KV channel with a worker that died; returns how many there were."""
        if self._transport is None:
            return 0
        return await asyncio.to_thread(self._transport.close_peer, worker_id)

    def _admit(self, needed: str, switching_ok: bool = False) -> None:
        if self._draining and not switching_ok:
            raise RoleError(
                f"worker {self.worker_id} is switching role; send the request elsewhere", self.worker_id
            )
        if self._drained:
            raise RoleError(f"worker {self.worker_id} is drained; send the request elsewhere", self.worker_id)
        allowed = {"both": ("both",), "prefill": ("prefill", "both"), "decode": ("decode", "both")}[needed]
        if self.role not in allowed:
            raise RoleError(f"worker {self.worker_id} has role {self.role!r}, not {needed!r}", self.worker_id)


def build_engine(
    config: EngineConfig,
    worker_id: str,
    on_cache_event: Callable[[KVCacheEvent], None],
    on_phase: Callable[[str], None],
) -> Engine | ExpertParallelGroup:
    """The worker's engine: one `Engine`, or with `expert_parallel.size` > 1 a group of that many
    rank processes sharing the worker's threads (each rank gets `num_threads // size`, at least
    one), named after the worker in its metrics, reporting its ranks' prefix caches as one and
    its ranks' start-up phases as the worker's."""
    size = config.expert_parallel.size
    if size == 1:
        return Engine(config, on_cache_event=on_cache_event, on_phase=on_phase)
    on_phase(f"starting {size} expert-parallel ranks")
    threads = max(1, (config.num_threads or 1) // size)
    return ExpertParallelGroup(
        replace(config, num_threads=threads), name=worker_id, on_cache_event=on_cache_event, on_phase=on_phase
    )


def _moved_chunk(request_id: str, handoff: Handoff) -> TokenChunk:
    """A request's last chunk here: it continues on another worker from `handoff`."""
    return TokenChunk(request_id, [], "", False, None, None, 0, 0, moved=handoff)


@dataclass
class _CacheCursor:
    """The last prefix-cache change one feed link carried (None: it needs a snapshot next)."""

    seq: int | None = None


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def start_worker(
    worker_id: str,
    engine_config: EngineConfig,
    role: str = "both",
    kv_backend: str | None = None,
    *,
    num_cpus: float = 1,
    name: str | None = None,
    host: str | None = "127.0.0.1",
    cores: tuple[int, ...] | None = None,
):
    """Starts a `Worker` actor: one GPU when the engine runs on CUDA (and NCCL transfers), CPU otherwise.

    `host`: where its KV transport listens (None: its node's address, for multi-node clusters)."""
    import ray

    on_gpu = engine_config.on_gpu
    backend = kv_backend or ("nccl" if on_gpu else "gloo")
    actor = ray.remote(Worker).options(
        num_cpus=num_cpus,
        num_gpus=1 if on_gpu else 0,
        name=name,
        max_concurrency=1000,  # an async actor: many streams at once
    )
    return actor.remote(worker_id, engine_config, role, backend, host, cores)
