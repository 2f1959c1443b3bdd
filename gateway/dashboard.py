"""The operator dashboard: the page at /dashboard, the overview it reads (GET /admin/overview) and
the stream that keeps it live (GET /admin/events, server-sent events, one overview a second).

The page is static (gateway/static/, no build step, no CDN); everything it shows comes from the
router's `Overview` call, fetched at most once per `OVERVIEW_TTL_S` however many pages watch
(`SharedFetch`). Reading needs the cluster's API key when it has one (or the admin key); the
actions the page offers are gateway/admin.py's routes and need the admin key. `can_act` in the
overview says whether the credential presented would be allowed to act.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel

from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.errors import APIError
from pdserve.gateway.metrics_cache import SharedFetch
from pdserve.gateway.router_client import RouterConnection
from pdserve.proto import pdserve_pb2
from pdserve.proto.bearer import matches

log = logging.getLogger("pdserve.gateway")

STATIC = Path(__file__).parent / "static"
# The page's files: name -> media type (anything else is 404, so no path reaches the disk).
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# Pages watching share one Overview call per this interval; the stream pushes once a second.
OVERVIEW_TTL_S = 0.5
PUSH_INTERVAL_S = 1.0
# Timeline samples in each pushed overview after the first (which carries all of them).
SAMPLES_PER_PUSH = 5
# A stream ends after this long (the page reconnects), so a forgotten tab holds nothing for ever.
STREAM_MAX_S = 600.0


class RankView(BaseModel):
    """One rank of an expert-parallel worker: its KV, queues and the token slots its experts ran."""

    rank: int
    kv_blocks_used: int
    kv_blocks_total: int
    running: int
    waiting: int
    expert_tokens: int
    rss_bytes: int  # the rank process's (the worker's rss_bytes counts it)


class WorkerView(BaseModel):
    """One worker slot: identity, state, queues, KV, cache and speculation."""

    worker_id: str
    slot: str
    role: str
    state: str  # serving, draining, switching, migrating, restarting, dead
    alive: bool
    restarts: int
    uptime_s: float
    waiting: int
    running: int
    queued_prefill_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float | None  # None before any prompt was looked up
    step_ms: float
    spec_acceptance_rate: float | None  # None when it has not verified a guess
    spec_mean_accepted_length: float | None
    rss_bytes: int
    ranks: list[RankView] = []  # an expert-parallel group's; empty for one engine


class TimelinePoint(BaseModel):
    """One second of the router's traffic; latencies over its recent window (None: no samples)."""

    at: float
    requests_per_s: float
    tokens_per_s: float
    migrations_per_s: float
    in_flight: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    slo_met: float | None
    goodput_per_s: float


class KVFlowView(BaseModel):
    """KV bytes from one worker to another."""

    sender: str
    receiver: str
    bytes_per_s: float
    bytes_total: int


class EventView(BaseModel):
    """A role switch, planner decision, death, restart, index outage or operator action."""

    at: float
    kind: str
    worker_id: str
    text: str
    requested_by: str


class IndexView(BaseModel):
    backend: str
    available: bool
    entries: int


class Overview(BaseModel):
    """Everything the dashboard shows (GET /admin/overview; each event of GET /admin/events)."""

    model: str
    policy: str
    workers: list[WorkerView]
    timeline: list[TimelinePoint]
    kv_flows: list[KVFlowView]
    events: list[EventView]
    settings: dict[str, object]
    planner_running: bool
    index: IndexView
    requests_in_flight: int
    admin_enabled: bool  # the cluster has an admin key: actions exist
    can_act: bool  # the credential presented is the admin key


def _worker(w: pdserve_pb2.WorkerStatus) -> WorkerView:
    s = w.worker
    spec = s.spec_mean_accepted_length > 0
    return WorkerView(
        worker_id=s.worker_id, slot=w.slot, role=s.role, state=w.state, alive=s.alive, restarts=s.restarts,
        uptime_s=w.uptime_s, waiting=s.num_waiting, running=s.num_running,
        queued_prefill_tokens=s.waiting_prefill_tokens, kv_blocks_used=s.kv_blocks_total - s.kv_blocks_free,
        kv_blocks_total=s.kv_blocks_total,
        prefix_cache_hit_rate=None if w.prefix_cache_hit_rate < 0 else w.prefix_cache_hit_rate,
        step_ms=s.last_step_seconds * 1e3, spec_acceptance_rate=s.spec_acceptance_rate if spec else None,
        spec_mean_accepted_length=s.spec_mean_accepted_length if spec else None, rss_bytes=s.rss_bytes,
        ranks=[RankView(rank=r.rank, kv_blocks_used=r.kv_blocks_total - r.kv_blocks_free,
                        kv_blocks_total=r.kv_blocks_total, running=r.num_running, waiting=r.num_waiting,
                        expert_tokens=r.expert_tokens, rss_bytes=r.rss_bytes) for r in s.ranks],
    )  # fmt: skip


def _point(s: pdserve_pb2.TimelineSample) -> TimelinePoint:
    def opt(name: str) -> float | None:
        return getattr(s, name) if s.HasField(name) else None

    return TimelinePoint(
        at=s.at, requests_per_s=s.requests_per_s, tokens_per_s=s.tokens_per_s,
        migrations_per_s=s.migrations_per_s, in_flight=s.in_flight, ttft_p50_ms=opt("ttft_p50_ms"),
        ttft_p99_ms=opt("ttft_p99_ms"), itl_p50_ms=opt("itl_p50_ms"), itl_p99_ms=opt("itl_p99_ms"),
        slo_met=opt("slo_met"), goodput_per_s=s.goodput_per_s,
    )  # fmt: skip


def overview_of(o: pdserve_pb2.OverviewResponse, admin_enabled: bool) -> Overview:
    """The router's `OverviewResponse` as the dashboard's JSON (`can_act` False until a request's
    credential is known)."""
    return Overview(
        model=o.model, policy=o.policy, workers=[_worker(w) for w in o.workers],
        timeline=[_point(s) for s in o.timeline],
        kv_flows=[KVFlowView(sender=f.sender, receiver=f.receiver, bytes_per_s=f.bytes_per_s,
                             bytes_total=f.bytes_total) for f in o.kv_flows],
        events=[EventView(at=e.at, kind=e.kind, worker_id=e.worker_id, text=e.text,
                          requested_by=e.requested_by) for e in o.events],
        settings=json.loads(o.settings_json or "{}"), planner_running=o.planner_running,
        index=IndexView(backend=o.index_backend, available=o.index_available, entries=o.index_entries),
        requests_in_flight=o.requests_in_flight, admin_enabled=admin_enabled, can_act=False,
    )  # fmt: skip


def add_dashboard_routes(app: FastAPI, config: GatewayConfig, router: RouterConnection) -> None:
    """/dashboard (the page and its files), GET /admin/overview and GET /admin/events."""

    async def fetch() -> Overview:
        return overview_of(await router.client().overview(), bool(config.admin_key))

    shared = SharedFetch(fetch, OVERVIEW_TTL_S)

    def reader(request: Request) -> bool:
        """Checks the request may read; returns whether it presents the admin key."""
        presented = request.headers.get("authorization", "")
        is_admin = bool(config.admin_key) and matches(presented, config.admin_key)
        if config.api_key and not (is_admin or matches(presented, config.api_key)):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the cluster's "
                           "api_key or admin_key)", "authentication_error")  # fmt: skip
        return is_admin

    async def current(request: Request, samples: int) -> Overview:
        try:
            overview = await shared.get()
        except grpc.RpcError as e:
            log.warning("request %s: no overview from the router: %s", request.state.request_id, e.details())
            raise APIError(503, f"the router did not answer ({e.code().name})", "service_unavailable") from e
        timeline = overview.timeline[-samples:] if samples > 0 else overview.timeline
        return overview.model_copy(update={"timeline": timeline, "can_act": reader(request)})

    @app.get("/dashboard", include_in_schema=False)
    async def page():
        return FileResponse(
            STATIC / "dashboard.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            raise APIError(404, f"Invalid URL (GET /dashboard/{name}): no such file")
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/admin/overview", response_model=Overview, tags=["admin"])
    async def overview(request: Request, samples: int = Query(0, ge=0, le=3600)):
        """The cluster at a glance: workers and their state, traffic, latency, KV flows, events,
        settings. `samples`: the latest timeline samples only (0: all the router keeps)."""
        reader(request)
        return await current(request, samples)

    @app.get(
        "/admin/events",
        tags=["admin"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "`data: <Overview JSON>` "
                         "once a second; the first carries the whole timeline, later ones the latest "
                         f"{SAMPLES_PER_PUSH} samples; `event: error` when the router does not answer"}},
    )  # fmt: skip
    async def events(request: Request):
        """The overview pushed once a second as server-sent events (what keeps the page live)."""
        reader(request)
        return StreamingResponse(_pushes(request, current), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


async def _pushes(request: Request, current):
    """The event stream's messages until the client leaves (or STREAM_MAX_S passes)."""
    loop = asyncio.get_running_loop()
    end, samples = loop.time() + STREAM_MAX_S, 0
    while loop.time() < end and not await request.is_disconnected():
        try:
            body = (await current(request, samples)).model_dump_json()
            yield f"data: {body}\n\n"
            samples = SAMPLES_PER_PUSH
        except APIError as e:
            yield f"event: error\ndata: {json.dumps(e.body())}\n\n"
        await asyncio.sleep(PUSH_INTERVAL_S)
