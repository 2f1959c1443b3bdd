"""The operator's HTTP routes: switch a worker's role, pause or resume the role planner.

They go through the router's `SetRole` and `Planner` calls, the path `pdserve role` and
`pdserve planner` take, and so the planner's own switches. Every route needs
`Authorization: Bearer <admin_key>`; a request without it gets 401 and changes nothing, and
without an `admin_key` the routes are off (403), so no public gateway has them by accident.
"""

from __future__ import annotations

import json
import logging

import grpc
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.errors import APIError
from pdserve.gateway.router_client import RouterConnection
from pdserve.proto import pdserve_pb2
from pdserve.proto.bearer import matches

log = logging.getLogger("pdserve.gateway")

ROLES = ("prefill", "decode", "both")


class RoleBody(BaseModel):
    """POST /admin/workers/{worker_id}/role."""

    model_config = ConfigDict(extra="forbid")
    role: str


def switch_json(s: pdserve_pb2.RoleSwitch) -> dict[str, object]:
    return {"worker_id": s.worker_id, "from_role": s.from_role, "to_role": s.to_role, "reason": s.reason,
            "at": s.at, "seconds": None if s.seconds < 0 else s.seconds, "moved": s.moved,
            "handed_back": s.handed_back, "error": s.error or None}  # fmt: skip


def add_admin_routes(app: FastAPI, config: GatewayConfig, router: RouterConnection) -> None:
    """/admin/workers/{id}/role, /admin/planner/{pause,resume} and GET /admin/planner."""

    def check(request: Request) -> str:
        if not config.admin_key:
            raise APIError(
                403, "the admin routes are off: start the cluster with admin_key set", "permission_error"
            )
        if not matches(request.headers.get("authorization", ""), config.admin_key):
            raise APIError(401, "missing or wrong admin key: send 'Authorization: Bearer <admin_key>'",
                           "authentication_error")  # fmt: skip
        return config.admin_key

    @app.post("/admin/workers/{worker_id}/role")
    async def set_role(worker_id: str, body: RoleBody, request: Request):
        key = check(request)
        if body.role not in ROLES:
            raise APIError(400, f"role must be one of {', '.join(ROLES)}, got {body.role!r}", param="role")
        try:
            done = await router.client().set_role(worker_id, body.role, key)
        except grpc.aio.AioRpcError as e:
            raise _refusal(e, request) from e
        return switch_json(done)

    @app.post("/admin/planner/{action}")
    async def planner_action(action: str, request: Request):
        key = check(request)
        if action not in ("pause", "resume"):
            raise APIError(404, f"no planner action {action!r}: use pause or resume")
        return await _planner(router, action, key, request)

    @app.get("/admin/planner")
    async def planner_state(request: Request):
        return await _planner(router, "status", check(request), request)


async def _planner(router: RouterConnection, action: str, key: str, request: Request) -> dict[str, object]:
    try:
        state = await router.client().planner(action, key)
    except grpc.aio.AioRpcError as e:
        raise _refusal(e, request) from e
    return {"running": state.running, "config": json.loads(state.config_json or "{}"),
            "switches": [switch_json(s) for s in state.switches], "decisions": list(state.decisions)}  # fmt: skip


def _refusal(e: grpc.aio.AioRpcError, request: Request) -> APIError:
    """The router's refusal as the operator should read it (its messages are the controller's own)."""
    if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
        return APIError(409, e.details() or "refused", "conflict")
    if e.code() == grpc.StatusCode.ABORTED:
        return APIError(500, e.details() or "the switch failed", "internal_error")
    log.warning("request %s: admin call failed: %s %s", request.state.request_id, e.code().name, e.details())
    return APIError(503, f"the router did not carry it out ({e.code().name})", "service_unavailable")
