"""The router's gRPC service: validates requests, places them, streams their tokens back.

Status codes: INVALID_ARGUMENT names the bad field; RESOURCE_EXHAUSTED when the router's
in-flight limit is reached or no decode worker has room in time; UNAVAILABLE when no worker of
a needed role is alive (or every attempt failed); DEADLINE_EXCEEDED at the client's deadline.
A cancelled client stream, or an `Abort`, releases the request on its workers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.cluster.operator_actions import ActionRefused, EventLog
from pdserve.cluster.planner import DecisionRecord
from pdserve.cluster.role_switching import SwitchRecord
from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.guided_grammar import GuidedDecodingError, check_guided
from pdserve.engine.sampling_params import GuidedDecoding, SamplingParams
from pdserve.engine.served_model import ServedModel
from pdserve.proto import pdserve_pb2, pdserve_pb2_grpc
from pdserve.proto.bearer import matches, presented
from pdserve.roles.messages import TokenChunk
from pdserve.router.auth import KeyCheck, caller, same_caller
from pdserve.router.cluster_view import ClusterView
from pdserve.router.config import RouterConfig
from pdserve.router.context_cache_view import ContextCacheView, make_context_cache_view
from pdserve.router.metrics import RouterMetrics, merge_expositions
from pdserve.router.overview import overview_response, worker_state
from pdserve.router.placement import NoWorkerError, RouterPlacement
from pdserve.router.policies import POLICIES, make_policy
from pdserve.router.prefix_index import IndexUnavailable, PrefixIndex, make_prefix_index
from pdserve.router.recent_latencies import RecentLatencies
from pdserve.router.request_runner import NoRoomInTime, RequestFailed, RequestRunner
from pdserve.router.timeline import SLO, Timeline

log = logging.getLogger(__name__)

SERVICE_NAME = pdserve_pb2.DESCRIPTOR.services_by_name["Router"].full_name
_DONE = object()


# A prefill group names one API request's choices (its request id and a prompt index).
MAX_PREFILL_GROUP_CHARS = 256


# Operator actions on one worker (`WorkerAction`).
WORKER_ACTIONS = ("drain", "undrain", "restart")
# Who asked, as the event log keeps it: at most this many characters.
MAX_REQUESTED_BY_CHARS = 200

ADMIN_REFUSAL = (
    "this is an operator action: present the admin key (metadata 'authorization: Bearer <admin_key>')"
)


class InvalidRequest(ValueError):
    """A request field is wrong; the message names it."""


class ChunkQueue:
    """What a `Generate` call has yet to send: chunks, then its end (`_DONE`, an error). Chunks
    that pile up while the caller reads slower than the engine makes them go as one."""

    def __init__(self) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._ready = asyncio.Event()

    def put_nowait(self, item: object) -> None:
        last = self._items[-1] if self._items else None
        if isinstance(item, TokenChunk) and isinstance(last, TokenChunk) and not last.finished:
            self._items[-1] = last.then(item)
        else:
            self._items.append(item)
        self._ready.set()

    async def get(self, timeout_s: float | None = None) -> object:
        """The next item; asyncio.TimeoutError when none came within `timeout_s` (None: no limit).

        A timer on the event, not `asyncio.wait_for`: that makes a task per chunk."""
        if not self._items and timeout_s is not None:
            expired = False

            def expire() -> None:
                nonlocal expired
                expired = True
                self._ready.set()

            timer = asyncio.get_running_loop().call_later(timeout_s, expire)
            try:
                while not self._items and not expired:
                    self._ready.clear()
                    await self._ready.wait()
            finally:
                timer.cancel()
            if not self._items:
                raise asyncio.TimeoutError
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def to_sampling_params(p: pdserve_pb2.SamplingParams) -> SamplingParams:
    """The engine's params from the wire's (unset optionals keep the engine defaults)."""
    from pdserve.proto.sampling_fields import LIST_FIELDS, MAP_FIELDS, OPTIONAL_FIELDS, SCALAR_FIELDS

    kwargs = {name: getattr(p, name) for name in OPTIONAL_FIELDS if p.HasField(name)}
    kwargs.update({name: getattr(p, name) for name in SCALAR_FIELDS})
    kwargs.update({name: list(getattr(p, name)) or None for name in LIST_FIELDS})
    kwargs.update({name: dict(getattr(p, name)) or None for name in MAP_FIELDS})
    if p.HasField("guided_decoding"):
        kwargs["guided_decoding"] = GuidedDecoding(p.guided_decoding.kind, p.guided_decoding.value)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise InvalidRequest(f"sampling: {e}") from e


def to_chunk(chunk: TokenChunk) -> pdserve_pb2.GenerateChunk:
    out = pdserve_pb2.GenerateChunk(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        finished=chunk.finished,
        finish_reason=chunk.finish_reason or "",
        stop_reason="" if chunk.stop_reason is None else str(chunk.stop_reason),
    )
    for lp in chunk.logprobs or []:
        out.logprobs.append(_token_logprob(lp))
    return out


def _token_logprob(lp) -> pdserve_pb2.TokenLogprob:
    msg = pdserve_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank)
    for rank, (token_id, logprob) in enumerate(lp.top, start=1):
        msg.top.append(pdserve_pb2.TopLogprob(token_id=token_id, logprob=logprob, rank=rank))
    return msg


def _first_line(error: Exception) -> str:
    """The worker's own message, without Ray's wrapper and remote traceback."""
    cause = getattr(error, "cause", None)  # RayTaskError carries the exception the worker raised
    return (str(cause if isinstance(cause, BaseException) else error).splitlines() or [""])[0]


def client_error(error: Exception, rid: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed request's caller gets.

    Only messages the router and the engine write for callers pass through (a refused input, no
    worker, no room, attempts exhausted). Anything else (a Ray error names actor ids, pids, node
    addresses and library functions) becomes one plain line with the request id; the router's log
    keeps the error itself under that id.
    """
    if isinstance(error, InvalidRequestError):  # the engine refused the request as given
        return grpc.StatusCode.INVALID_ARGUMENT, _first_line(error)
    if isinstance(error, NoRoomInTime):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, (NoWorkerError, RequestFailed)):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    return grpc.StatusCode.UNAVAILABLE, f"request {rid} failed inside the cluster; retry it (logged as {rid})"


class RouterService(pdserve_pb2_grpc.RouterServicer):
    """Generate / Abort / ClusterState / Metrics over a `RequestRunner` and a `ClusterView`."""

    def __init__(
        self,
        runner: RequestRunner,
        view: ClusterView,
        metrics: RouterMetrics,
        config: RouterConfig,
        served: ServedModel,
        slo: SLO | None = None,
        context_cache: ContextCacheView | None = None,
    ) -> None:
        self.runner = runner
        self.context_cache = context_cache  # shown in ClusterState
        self.view = view
        self.metrics = metrics
        self.config = config
        self.served = served
        self._in_flight: dict[str, asyncio.Task] = {}
        self._owners: dict[str, bytes] = {}  # request id -> its Generate call's `caller`
        self.latencies = RecentLatencies()
        # The dashboard's traffic history; the SLO is the role planner's latency targets.
        self.timeline = Timeline(slo or SLO(ttft_ms=500.0, itl_ms=50.0))
        self.events = EventLog()  # the router's own: policy changes (the view keeps index outages)

    @property
    def requests_in_flight(self) -> int:
        return len(self._in_flight)

    def _validate(self, request: pdserve_pb2.GenerateRequest) -> tuple[list[int], SamplingParams]:
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidRequest("prompt_token_ids is empty; send at least one token id")
        bad = next((i for i, t in enumerate(prompt) if not 0 <= t < self.served.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"prompt_token_ids[{bad}] = {prompt[bad]} is outside the vocabulary [0, {self.served.vocab_size})"
            )
        if len(prompt) >= self.served.max_model_len:
            raise InvalidRequest(
                f"prompt_token_ids has {len(prompt)} tokens; the context window is {self.served.max_model_len}"
            )
        if len(request.prefill_group) > MAX_PREFILL_GROUP_CHARS:
            raise InvalidRequest(
                f"prefill_group has {len(request.prefill_group)} characters; at most {MAX_PREFILL_GROUP_CHARS}"
            )
        params = to_sampling_params(request.sampling)
        if params.n != 1:
            raise InvalidRequest("sampling.n must be 1 per Generate call")
        vocab = self.served.vocab_size
        if bad := [t for t in params.logit_bias or {} if t >= vocab]:
            raise InvalidRequest(
                f"sampling.logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        if params.guided_decoding is not None:
            # Refused here, by the rules the engine compiles with, before any worker spends time on it.
            try:
                check_guided(params.guided_decoding)
            except GuidedDecodingError as e:
                raise InvalidRequest(f"sampling.guided_decoding ({params.guided_decoding.kind}): {e}") from e
        return prompt, params

    async def Generate(self, request, context):
        rid = request.request_id or uuid.uuid4().hex
        policy = self.config.policy
        try:
            prompt, params = self._validate(request)
        except InvalidRequest as e:
            self.metrics.requests.labels(policy, "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if rid in self._in_flight:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is already in flight")
        if len(self._in_flight) >= self.config.max_in_flight:
            self.metrics.requests.labels(policy, "overloaded").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"router has {len(self._in_flight)} requests in flight (max_in_flight); retry later",
            )
        self.timeline.arrived()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        queue = ChunkQueue()

        async def pump() -> None:
            chunks = self.runner.run(rid, prompt, params, request.prefill_group or None)
            try:
                async for chunk in chunks:
                    queue.put_nowait(chunk)
                queue.put_nowait(_DONE)
            except asyncio.CancelledError:
                queue.put_nowait(asyncio.CancelledError())
                raise
            except Exception as e:
                queue.put_nowait(e)
            finally:
                await chunks.aclose()  # releases the request on its workers now, not at garbage collection

        task = asyncio.get_running_loop().create_task(pump())
        self._in_flight[rid], self._owners[rid] = task, caller(context)
        self.metrics.in_flight.set(len(self._in_flight))
        emitted, cached, from_redis, outcome = 0, 0, 0, "error"
        started = last = time.monotonic()
        ttft: float | None = None
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await queue.get(timeout)
                except asyncio.TimeoutError:
                    outcome = "deadline"
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid} passed its deadline"
                    )
                if item is _DONE:
                    outcome = "ok"
                    gaps = (
                        (last - started - ttft) / (emitted - 1) if ttft is not None and emitted > 1 else None
                    )
                    self.timeline.finished(ttft, gaps)
                    return
                if isinstance(item, asyncio.CancelledError):  # Abort RPC
                    outcome = "aborted"
                    yield pdserve_pb2.GenerateChunk(
                        request_id=rid, finished=True, finish_reason="abort",
                        usage=pdserve_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=emitted, cached_tokens=cached,
                                                context_cached_tokens=from_redis),
                    )  # fmt: skip
                    return
                if isinstance(item, Exception):
                    outcome = await self._fail(item, rid, context)
                    return
                msg = to_chunk(item)
                now = time.monotonic()
                if item.token_ids:
                    (self.latencies.gap if emitted else self.latencies.first_token)(
                        now - (last if emitted else started)
                    )
                    ttft = now - started if ttft is None else ttft
                    last = now
                    self.timeline.emitted(len(item.token_ids))
                emitted += len(item.token_ids)
                cached, from_redis = item.num_cached_tokens, item.num_context_cached_tokens
                if item.finished:
                    msg.usage.CopyFrom(
                        pdserve_pb2.Usage(
                            prompt_tokens=len(prompt),
                            completion_tokens=emitted,
                            cached_tokens=cached,
                            context_cached_tokens=from_redis,
                        )
                    )
                yield msg
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._in_flight.pop(rid, None)
            self._owners.pop(rid, None)
            self.metrics.in_flight.set(len(self._in_flight))
            self.metrics.requests.labels(policy, outcome).inc()

    async def _fail(self, error: Exception, rid: str, context) -> str:
        code, message = client_error(error, rid)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            self.metrics.requests.labels(self.config.policy, "invalid").inc()
        else:  # the details stay here, under the request id the caller was given
            expected = isinstance(error, (NoWorkerError, RequestFailed))
            log.warning(
                "request %s failed: %s: %s",
                rid,
                type(error).__name__,
                error,
                exc_info=None if expected else error,
            )
        await context.abort(code, message)
        return "error"

    async def Abort(self, request, context):
        """Cancels a request in flight, if the caller owns it (another caller's looks not found)."""
        rid = request.request_id
        task, owner = self._in_flight.get(rid), self._owners.get(rid)
        if task is None or task.done() or owner is None or not same_caller(owner, caller(context)):
            return pdserve_pb2.AbortResponse(found=False)
        task.cancel()
        return pdserve_pb2.AbortResponse(found=True)

    async def _index_entries(self) -> int:
        try:
            entries = await self.view.index.num_entries()
        except Exception:
            entries = -1
        self.metrics.index_blocks.set(max(entries, 0))
        return entries

    async def ClusterState(self, request, context):
        entries = await self._index_entries()
        workers = [worker_state(w.worker_id, w.role, w.alive, w.restarts, w.load) for w in self.view.workers]
        return pdserve_pb2.ClusterStateResponse(
            model=self.served.name,
            policy=self.config.policy,
            workers=workers,
            index_entries=entries,
            index_backend="redis" if self.config.redis_url else "in-process",
            index_available=self.view.index_available,
            requests_in_flight=len(self._in_flight),
            context_cache=self.context_cache.where if self.context_cache is not None else "",
        )

    async def Metrics(self, request, context):
        """Every live worker's Prometheus metrics (its `metrics_text`), merged into one exposition."""
        self.metrics.metrics_fanouts.inc()
        live = [w for w in self.view.workers if w.alive]
        texts = await asyncio.gather(
            *(asyncio.wait_for(w.handle.metrics_text.remote(), self.config.metrics_timeout_s) for w in live),
            return_exceptions=True,
        )
        try:  # the controller's own: role switches and the planner
            controller_text = await asyncio.wait_for(
                self.view.controller.metrics_text.remote(), self.config.metrics_timeout_s
            )
        except Exception:
            controller_text = None
        answered = [t for t in texts if isinstance(t, str)] + ([controller_text] if controller_text else [])
        unreachable = [w.worker_id for w, t in zip(live, texts) if not isinstance(t, str)]
        if unreachable:
            log.warning("metrics: no answer from workers %s", unreachable)
        try:
            text = merge_expositions(answered)
        except ValueError as e:  # a worker's text that does not parse: serve the others' as they are
            log.warning("metrics: cannot merge the workers' expositions (%s); concatenating them", e)
            text = "".join(answered)
        return pdserve_pb2.MetricsResponse(text=text, unreachable=unreachable)

    async def SetRole(self, request, context):
        """Switches a worker's role in place, through the controller (as the planner does)."""
        await self._check_admin(context)
        by = requested_by(request, context)
        try:
            record = await self.view.controller.set_role.remote(request.worker_id, request.role, "manual", by)
        except Exception as e:
            await _refused(e, "the switch", context)
        return switch_proto(record)

    async def WorkerAction(self, request, context):
        """Drains, undrains or restarts a worker, through the controller (admin)."""
        await self._check_admin(context)
        if request.action not in WORKER_ACTIONS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"action must be one of {', '.join(WORKER_ACTIONS)}, got {request.action!r}",
            )
        by, controller = requested_by(request, context), self.view.controller
        try:
            if request.action == "restart":
                text = await controller.restart.remote(request.worker_id, by)
            else:
                text = await controller.drain.remote(request.worker_id, request.action == "drain", by)
        except Exception as e:
            await _refused(e, f"the {request.action}", context)
        return pdserve_pb2.WorkerActionResponse(
            worker_id=request.worker_id, action=request.action, message=text
        )

    async def SetPolicy(self, request, context):
        """Changes this router's placement policy (admin); INVALID_ARGUMENT names the known ones."""
        await self._check_admin(context)
        try:
            policy = make_policy(request.policy)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"policy: {e}")
        previous = self.config.policy
        self.config = replace(self.config, policy=request.policy)
        self.runner.placement.policy = policy  # type: ignore[attr-defined]  # RouterPlacement's
        by = requested_by(request, context)
        self.events.add("policy", "", f"placement policy {previous} -> {request.policy}", by)
        log.info("placement policy %s -> %s (by %s)", previous, request.policy, by)
        return pdserve_pb2.PolicyResponse(policy=request.policy, previous=previous)

    async def Overview(self, request, context):
        """What the operator dashboard shows (workers, traffic, KV flows, events, settings)."""
        overview = await self.view.controller.overview.remote()
        router_settings = {"policy": self.config.policy, "redis_url": bool(self.config.redis_url),
                           "max_in_flight": self.config.max_in_flight, "policies": list(POLICIES),
                           "slo": {"ttft_ms": self.timeline.slo.ttft_ms, "itl_ms": self.timeline.slo.itl_ms}}  # fmt: skip
        response = overview_response(
            overview, self.timeline, self.events.events() + self.view.events.events(), router_settings,
            max(0, request.samples),
        )  # fmt: skip
        response.model, response.policy = self.served.name, self.config.policy
        response.index_backend = "redis" if self.config.redis_url else "in-process"
        response.index_available = self.view.index_available
        response.index_entries = await self._index_entries()
        response.requests_in_flight = len(self._in_flight)
        return response

    def sample_timeline(self) -> None:
        """One second of the dashboard's timeline (called every second while the router runs)."""
        moved = self.metrics.registry.get_sample_value("pdserve_live_migrations_total", {"outcome": "moved"})
        sent = {
            (w.worker_id, receiver): nbytes
            for w in self.view.workers
            if w.load is not None
            for receiver, nbytes in w.load.kv_sent_bytes.items()
        }
        self.timeline.sample(moved or 0.0, len(self._in_flight), self.latencies.signals(0), sent)

    async def Planner(self, request, context):
        """Pauses or resumes the role planner (admin), or reports its state."""
        if request.action not in ("pause", "resume", "status"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"action must be pause, resume or status, got {request.action!r}",
            )
        if request.action != "status":
            await self._check_admin(context)
        state = await self.view.controller.planner.remote(request.action, requested_by(request, context))
        return pdserve_pb2.PlannerResponse(
            running=state.running,
            config_json=json.dumps(state.config),
            switches=[switch_proto(s) for s in state.switches],
            decisions=[DecisionRecord(**d).line() for d in state.decisions],
        )

    async def _check_admin(self, context) -> None:
        """Operator calls present the admin key when the cluster has one."""
        key = self.config.admin_key
        if key and not matches(presented(context.invocation_metadata()), key):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, ADMIN_REFUSAL)


def requested_by(request, context) -> str:
    """Who asks for an operator action: what the caller says (`requested_by`, printable, capped),
    else its address as gRPC sees it."""
    said = "".join(c for c in request.requested_by if c.isprintable())[:MAX_REQUESTED_BY_CHARS]
    return said or f"grpc {context.peer()}"


async def _refused(error: Exception, what: str, context) -> None:
    """Ends an operator call the controller refused (FAILED_PRECONDITION, its reason) or failed."""
    cause = getattr(error, "cause", error)
    if isinstance(cause, ActionRefused):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(cause))
    await context.abort(grpc.StatusCode.ABORTED, f"{what} failed: {str(cause).splitlines()[0][:300]}")


def switch_proto(record: SwitchRecord) -> pdserve_pb2.RoleSwitch:
    """A controller's SwitchRecord on the wire."""
    return pdserve_pb2.RoleSwitch(
        worker_id=record.worker_id, from_role=record.from_role, to_role=record.to_role, reason=record.reason,
        at=record.at, seconds=-1.0 if record.seconds is None else record.seconds, moved=record.moved,
        handed_back=record.handed_back, error=record.error or "",
    )  # fmt: skip


class Router:
    """A running router: the gRPC server, its view of the cluster and its service."""

    def __init__(
        self,
        server: grpc.aio.Server,
        view: ClusterView,
        service: RouterService,
        port: int,
        keep_alive: asyncio.Task[None],
        sampler: asyncio.Task[None] | None = None,
    ) -> None:
        self.server = server
        self.view = view
        self.service = service
        self.port = port
        self._keep_alive = keep_alive
        self._sampler = sampler

    async def stop(self, grace_s: float = 1.0, clear_index: bool = False) -> None:
        """Stops serving; `clear_index` also deletes the index's entries (the whole cluster is
        stopping, so no other router of it still needs them)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await self.server.stop(grace_s)
        # Calls made in process (router.local_call) are not the gRPC server's to wait for.
        while self.service.requests_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.service.runner.feeds.stop()
        await self.view.stop()
        for task in (self._keep_alive, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if clear_index:
            with contextlib.suppress(IndexUnavailable):  # a gone Redis lets the keys expire instead
                await self.view.index.clear()
        await self.view.index.close()
        if self.service.context_cache is not None:
            await self.service.context_cache.close()


async def _keep_index_alive(index: PrefixIndex, interval_s: float) -> None:
    """Refreshes the index's expiry while the router lives; a dead router's entries expire."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await index.refresh()
        except IndexUnavailable as e:
            log.warning("cannot refresh the prefix index's expiry: %s", e)


async def _sample_every_second(service: RouterService) -> None:
    """The dashboard's timeline, one sample a second while the router lives."""
    while True:
        await asyncio.sleep(1.0)
        try:
            service.sample_timeline()
        except Exception:  # one bad sample must not end the timeline
            log.exception("sampling the dashboard's timeline failed")


async def start_router(controller, config: RouterConfig) -> Router:
    """Builds the router over a running controller and starts serving; returns once it listens."""
    served = await controller.served_model.remote()
    metrics = RouterMetrics()
    index = make_prefix_index(served.name, config.redis_url, config.cluster, config.index_ttl_s)
    view = ClusterView(controller, index, config.view_interval_s)
    await view.start()
    context_cache = make_context_cache_view(served.context_cache_url, served.context_cache_namespace)
    placement = RouterPlacement(
        view,
        make_policy(config.policy),
        served.block_size,
        metrics,
        config.local_prefill_tokens,
        context_cache,
    )
    runner = RequestRunner(placement, config.runner, metrics)
    view.watch_cache(runner.feeds)  # every worker's cache changes come on its feed link
    slo = SLO(ttft_ms=config.slo_ttft_ms, itl_ms=config.slo_itl_ms)
    service = RouterService(runner, view, metrics, config, served, slo, context_cache)
    view.signals = lambda: service.latencies.signals(runner.waiting_for_room)  # for the role planner

    server = grpc.aio.server(
        interceptors=[KeyCheck(config.api_key, config.admin_key)] if config.api_key else None
    )
    pdserve_pb2_grpc.add_RouterServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port} (port in use?); pick another --port")
    await server.start()
    for name in ("", SERVICE_NAME):
        result = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(result):
            await result
    log.info("router listening on %s:%d (policy %s)", config.host, port, config.policy)
    # Three refreshes per TTL: one missed (a slow Redis) still leaves the entries alive.
    keep_alive = asyncio.get_running_loop().create_task(_keep_index_alive(index, config.index_ttl_s / 3))
    sampler = asyncio.get_running_loop().create_task(_sample_every_second(service))
    return Router(server, view, service, port, keep_alive, sampler)
