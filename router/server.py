"""The router's gRPC service: validates requests, places them, streams their tokens back.

Status codes: INVALID_ARGUMENT names the bad field; RESOURCE_EXHAUSTED when the router's
in-flight limit is reached or no decode worker has room in time; UNAVAILABLE when no worker of
a needed role is alive (or every attempt failed); DEADLINE_EXCEEDED at the client's deadline.
A cancelled client stream, or an `Abort`, releases the request on its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.cluster.planner import DecisionRecord
from pdserve.cluster.role_switching import SwitchRecord, SwitchRefused
from pdserve.engine import SamplingParams
from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.served_model import ServedModel
from pdserve.proto import pdserve_pb2, pdserve_pb2_grpc
from pdserve.proto.bearer import matches, presented
from pdserve.roles.messages import TokenChunk
from pdserve.router.auth import KeyCheck, caller, same_caller
from pdserve.router.cluster_view import ClusterView
from pdserve.router.config import RouterConfig
from pdserve.router.context_cache_view import ContextCacheView, make_context_cache_view
from pdserve.router.metrics import RouterMetrics, merge_expositions
from pdserve.router.placement import NoWorkerError, RouterPlacement
from pdserve.router.policies import make_policy
from pdserve.router.prefix_index import IndexUnavailable, PrefixIndex, make_prefix_index
from pdserve.router.recent_latencies import RecentLatencies
from pdserve.router.request_runner import NoRoomInTime, RequestFailed, RequestRunner

log = logging.getLogger(__name__)

SERVICE_NAME = pdserve_pb2.DESCRIPTOR.services_by_name["Router"].full_name
_DONE = object()


# A prefill group names one API request's choices (its request id and a prompt index).
MAX_PREFILL_GROUP_CHARS = 256


ADMIN_REFUSAL = (
    "this is an operator action: present the admin key (metadata 'authorization: Bearer <admin_key>')"
)


class InvalidRequest(ValueError):
    """A request field is wrong; the message names it."""


def to_sampling_params(p: pdserve_pb2.SamplingParams) -> SamplingParams:
    """The engine's params from the wire's (unset optionals keep the engine defaults)."""
    from pdserve.proto.sampling_fields import LIST_FIELDS, OPTIONAL_FIELDS, SCALAR_FIELDS

    kwargs = {name: getattr(p, name) for name in OPTIONAL_FIELDS if p.HasField(name)}
    kwargs.update({name: getattr(p, name) for name in SCALAR_FIELDS})
    kwargs.update({name: list(getattr(p, name)) or None for name in LIST_FIELDS})
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
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        queue: asyncio.Queue = asyncio.Queue()

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
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    outcome = "deadline"
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid} passed its deadline"
                    )
                if item is _DONE:
                    outcome = "ok"
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
                    last = now
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

    async def ClusterState(self, request, context):
        try:
            entries = await self.view.index.num_entries()
        except Exception:
            entries = -1
        self.metrics.index_blocks.set(max(entries, 0))
        workers = [
            pdserve_pb2.WorkerState(
                worker_id=w.worker_id,
                role=w.role,
                alive=w.alive,
                restarts=w.restarts,
                num_waiting=w.load.num_waiting if w.load else 0,
                num_running=w.load.num_running if w.load else 0,
                kv_blocks_total=w.load.kv_blocks_total if w.load else 0,
                kv_blocks_free=w.load.kv_blocks_free if w.load else 0,
                waiting_prefill_tokens=w.load.waiting_prefill_tokens if w.load else 0,
                last_step_seconds=w.load.last_step_seconds if w.load else 0.0,
                spec_acceptance_rate=w.load.spec_acceptance_rate if w.load else 0.0,
                spec_mean_accepted_length=w.load.spec_mean_accepted_length if w.load else 0.0,
                rss_bytes=w.load.rss_bytes if w.load else 0,
                open_fds=w.load.open_fds if w.load else 0,
                threads=w.load.threads if w.load else 0,
                context_cache_hit_tokens=w.load.context_cache_hit_tokens if w.load else 0,
                context_cache_bytes_read=w.load.context_cache_bytes_read if w.load else 0,
                context_cache_bytes_written=w.load.context_cache_bytes_written if w.load else 0,
                context_cache_available=w.load.context_cache_available if w.load else True,
            )
            for w in self.view.workers
        ]
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
        try:
            record = await self.view.controller.set_role.remote(request.worker_id, request.role)
        except Exception as e:
            cause = getattr(e, "cause", e)
            if isinstance(cause, SwitchRefused):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(cause))
            await context.abort(
                grpc.StatusCode.ABORTED, f"the switch failed: {str(cause).splitlines()[0][:300]}"
            )
        return switch_proto(record)

    async def Planner(self, request, context):
        """Pauses or resumes the role planner (admin), or reports its state."""
        if request.action not in ("pause", "resume", "status"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"action must be pause, resume or status, got {request.action!r}",
            )
        if request.action != "status":
            await self._check_admin(context)
        state = await self.view.controller.planner.remote(request.action)
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
    ) -> None:
        self.server = server
        self.view = view
        self.service = service
        self.port = port
        self._keep_alive = keep_alive

    async def stop(self, grace_s: float = 1.0, clear_index: bool = False) -> None:
        """Stops serving; `clear_index` also deletes the index's entries (the whole cluster is
        stopping, so no other router of it still needs them)."""
        await self.server.stop(grace_s)
        await self.view.stop()
        self._keep_alive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keep_alive
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


async def start_router(controller, config: RouterConfig) -> Router:
    """Builds the router over a running controller and starts serving; returns once it listens."""
    served = await controller.served_model.remote()
    metrics = RouterMetrics()
    index = make_prefix_index(served.name, config.redis_url, config.cluster, config.index_ttl_s)
    view = ClusterView(controller, index, config.view_interval_s)
    await view.start()
    context_cache = make_context_cache_view(served.context_cache_url, served.context_cache_namespace)
    placement = RouterPlacement(view, make_policy(config.policy), served.block_size, metrics, context_cache)
    runner = RequestRunner(placement, config.runner, metrics)
    service = RouterService(runner, view, metrics, config, served, context_cache)
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
    return Router(server, view, service, port, keep_alive)
