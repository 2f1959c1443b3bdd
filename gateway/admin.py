"""The operator's HTTP actions: switch a worker's role, drain, undrain or restart it, pause or
resume the role planner, change the placement policy.

They go through the router's `SetRole`, `WorkerAction`, `Planner` and `SetPolicy` calls, the
path `pdserve role / drain / undrain / restart / planner / policy` take (and the planner's own
switches). Every action needs `Authorization: Bearer <admin_key>`; a request without it gets 401
and changes nothing, and without an `admin_key` the actions are off (403), so no public gateway
has them by accident. Every action is logged with who asked (the client's address), what, the
outcome and the request id; the cluster's event log keeps who asked too.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import grpc
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.errors import APIError
from pdserve.gateway.router_client import RouterConnection
from pdserve.proto import pdserve_pb2
from pdserve.proto.bearer import matches

log = logging.getLogger("pdserve.gateway")
# Operator actions, one line each (who, what, outcome, request id); `pdserve up` prints them.
audit = logging.getLogger("pdserve.audit")

ROLES = ("prefill", "decode", "both")
# The header the dashboard sends so the event log can say an action came from it.
CLIENT_HEADER = "x-pdserve-client"


class RoleBody(BaseModel):
    """POST /admin/workers/{worker_id}/role."""

    model_config = ConfigDict(extra="forbid")
    role: str


class PolicyBody(BaseModel):
    """POST /admin/policy."""

    model_config = ConfigDict(extra="forbid")
    policy: str = Field(max_length=64)


class WorkerActionResult(BaseModel):
    """What a drain, undrain or restart did."""

    worker_id: str
    action: str
    message: str


class PolicyResult(BaseModel):
    """The router's placement policy now, and before the change."""

    policy: str
    previous: str


def require_admin(config: GatewayConfig, request: Request) -> str:
    """The admin key, when the request presents it: 403 when the cluster has none, 401 otherwise."""
    if not config.admin_key:
        raise APIError(
            403, "the admin routes are off: start the cluster with admin_key set", "permission_error"
        )
    if not matches(request.headers.get("authorization", ""), config.admin_key):
        audit.info("admin action by %s: %s %s: refused (missing or wrong admin key) [%s]",
                   requested_by(request), request.method, request.url.path, request.state.request_id)  # fmt: skip
        raise APIError(401, "missing or wrong admin key: send 'Authorization: Bearer <admin_key>'",
                       "authentication_error")  # fmt: skip
    return config.admin_key


def requested_by(request: Request) -> str:
    """Who asks, for the logs: the client's address, and "dashboard" when the page sent it."""
    source = "dashboard" if request.headers.get(CLIENT_HEADER) == "dashboard" else "http"
    return f"{source} {request.client.host if request.client else 'unknown'}"


def switch_json(s: pdserve_pb2.RoleSwitch) -> dict[str, object]:
    return {"worker_id": s.worker_id, "from_role": s.from_role, "to_role": s.to_role, "reason": s.reason,
            "at": s.at, "seconds": None if s.seconds < 0 else s.seconds, "moved": s.moved,
            "handed_back": s.handed_back, "error": s.error or None}  # fmt: skip


def add_admin_routes(app: FastAPI, config: GatewayConfig, router: RouterConnection) -> None:
    """/admin/workers/{id}/role, /admin/workers/{id}/{drain,undrain,restart}, /admin/policy,
    /admin/planner/{pause,resume} and GET /admin/planner."""

    def check(request: Request) -> str:
        return require_admin(config, request)

    @app.post("/admin/workers/{worker_id}/role", tags=["admin"])
    async def set_role(worker_id: str, body: RoleBody, request: Request):
        """Switches a worker's role in place (`pdserve role`); its requests move live."""
        key = check(request)
        if body.role not in ROLES:
            raise APIError(400, f"role must be one of {', '.join(ROLES)}, got {body.role!r}", param="role")
        what = f"switch {worker_id} to {body.role}"
        done = await _audited(
            request, what, router.client().set_role(worker_id, body.role, key, requested_by(request))
        )
        return switch_json(done)

    @app.post("/admin/workers/{worker_id}/{action}", response_model=WorkerActionResult, tags=["admin"])
    async def worker_action(worker_id: str, action: Literal["drain", "undrain", "restart"], request: Request):
        """Drains a worker (no new work; it finishes what it holds), undrains it, or restarts it
        (`pdserve drain / undrain / restart`)."""
        key = check(request)
        call = router.client().worker_action(worker_id, action, key, requested_by(request))
        done = await _audited(request, f"{action} {worker_id}", call)
        return WorkerActionResult(worker_id=done.worker_id, action=done.action, message=done.message)

    @app.post("/admin/policy", response_model=PolicyResult, tags=["admin"])
    async def set_policy(body: PolicyBody, request: Request):
        """Changes the router's placement policy (`pdserve policy`)."""
        key = check(request)
        call = router.client().set_policy(body.policy, key, requested_by(request))
        done = await _audited(request, f"policy {body.policy}", call)
        return PolicyResult(policy=done.policy, previous=done.previous)

    @app.post("/admin/planner/{action}", tags=["admin"])
    async def planner_action(action: str, request: Request):
        """Pauses or resumes the role planner (`pdserve planner`)."""
        key = check(request)
        if action not in ("pause", "resume"):
            raise APIError(404, f"no planner action {action!r}: use pause or resume")
        return await _planner(router, action, key, request)

    @app.get("/admin/planner", tags=["admin"])
    async def planner_state(request: Request):
        """The role planner's state, settings, last switches and decisions."""
        return await _planner(router, "status", check(request), request)


async def _audited(request: Request, what: str, call, logged: bool = True):
    """Awaits an operator call, logging who asked, what, and how it ended (under the request id);
    `logged=False` for reads. The router's refusal becomes the `APIError` the operator reads."""
    rid, who = request.state.request_id, requested_by(request)
    try:
        done = await call
    except grpc.aio.AioRpcError as e:
        if logged:
            audit.info(
                "admin action by %s: %s: refused (%s: %s) [%s]", who, what, e.code().name, e.details(), rid
            )
        raise _refusal(e, request) from e
    if logged:
        audit.info("admin action by %s: %s: done [%s]", who, what, rid)
    return done


async def _planner(router: RouterConnection, action: str, key: str, request: Request) -> dict[str, object]:
    call = router.client().planner(action, key, requested_by(request))
    state = await _audited(request, f"planner {action}", call, logged=action != "status")
    return {"running": state.running, "config": json.loads(state.config_json or "{}"),
            "switches": [switch_json(s) for s in state.switches], "decisions": list(state.decisions)}  # fmt: skip


def _refusal(e: grpc.aio.AioRpcError, request: Request) -> APIError:
    """The router's refusal as the operator should read it (its messages are the controller's own)."""
    if e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("policy:"):
        return APIError(400, e.details(), param="policy")
    if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
        return APIError(409, e.details() or "refused", "conflict")
    if e.code() == grpc.StatusCode.ABORTED:
        return APIError(500, e.details() or "the switch failed", "internal_error")
    log.warning("request %s: admin call failed: %s %s", request.state.request_id, e.code().name, e.details())
    return APIError(503, f"the router did not carry it out ({e.code().name})", "service_unavailable")
