"""The gateway's only way into the cluster: the router's gRPC service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from pdserve.proto import pdserve_pb2, pdserve_pb2_grpc
from pdserve.proto.bearer import call_metadata

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


# A role switch waits for the worker's running requests to move (the controller's drain timeout).
SWITCH_TIMEOUT_S = 150.0


class RouterClient:
    """A channel to one router (several gateways may share it; each keeps its own channel).

    Every call presents `api_key` (when set) as `authorization: Bearer KEY` metadata.
    `generate_call`: what `generate` calls instead of the stub's `Generate` (a router in this
    process and event loop, `pdserve.router.local_call`); it answers and fails the same way.
    """

    def __init__(self, address: str, api_key: str | None = None, generate_call=None) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pdserve_pb2_grpc.RouterStub(self._channel)
        self._generate = generate_call or self._stub.Generate
        self._metadata = call_metadata(api_key)

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: pdserve_pb2.SamplingParams,
        timeout_s: float | None,
        prefill_group: str | None = None,
    ) -> AsyncIterator[pdserve_pb2.GenerateChunk]:
        """The request's chunk stream; cancelling the iteration cancels the call (and the request)."""
        request = pdserve_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling,
            prefill_group=prefill_group or "",
        )  # fmt: skip
        return self._generate(request, timeout=timeout_s, metadata=self._metadata)

    async def abort(self, request_id: str) -> bool:
        """Cancels a request this client started; False if none such is in flight."""
        request = pdserve_pb2.AbortRequest(request_id=request_id)
        return (await self._stub.Abort(request, metadata=self._metadata)).found

    async def cluster_state(self) -> pdserve_pb2.ClusterStateResponse:
        request = pdserve_pb2.ClusterStateRequest()
        return await self._stub.ClusterState(request, timeout=5, metadata=self._metadata)

    async def worker_metrics(self, timeout_s: float) -> pdserve_pb2.MetricsResponse:
        """The workers' Prometheus text, merged by the router."""
        return await self._stub.Metrics(
            pdserve_pb2.MetricsRequest(), timeout=timeout_s, metadata=self._metadata
        )

    async def set_role(
        self, worker_id: str, role: str, admin_key: str, requested_by: str = ""
    ) -> pdserve_pb2.RoleSwitch:
        """Switches a worker's role (an operator call: it presents the admin key)."""
        request = pdserve_pb2.SetRoleRequest(worker_id=worker_id, role=role, requested_by=requested_by)
        return await self._stub.SetRole(request, timeout=SWITCH_TIMEOUT_S, metadata=call_metadata(admin_key))

    async def planner(
        self, action: str, admin_key: str | None, requested_by: str = ""
    ) -> pdserve_pb2.PlannerResponse:
        """Pauses, resumes or reads the role planner (pause and resume present the admin key)."""
        metadata = call_metadata(admin_key) if admin_key else self._metadata
        request = pdserve_pb2.PlannerRequest(action=action, requested_by=requested_by)
        return await self._stub.Planner(request, timeout=10, metadata=metadata)

    async def worker_action(
        self, worker_id: str, action: str, admin_key: str, requested_by: str = ""
    ) -> pdserve_pb2.WorkerActionResponse:
        """Drains, undrains or restarts a worker (an operator call)."""
        request = pdserve_pb2.WorkerActionRequest(
            worker_id=worker_id, action=action, requested_by=requested_by
        )
        return await self._stub.WorkerAction(request, timeout=30, metadata=call_metadata(admin_key))

    async def set_policy(
        self, policy: str, admin_key: str, requested_by: str = ""
    ) -> pdserve_pb2.PolicyResponse:
        """Changes the router's placement policy (an operator call)."""
        request = pdserve_pb2.PolicyRequest(policy=policy, requested_by=requested_by)
        return await self._stub.SetPolicy(request, timeout=10, metadata=call_metadata(admin_key))

    async def overview(self) -> pdserve_pb2.OverviewResponse:
        """What the operator dashboard shows."""
        return await self._stub.Overview(pdserve_pb2.OverviewRequest(), timeout=5, metadata=self._metadata)

    async def close(self) -> None:
        await self._channel.close()


class RouterConnection:
    """The gateway's `RouterClient`, made on first use: a grpc.aio channel belongs to the event loop
    that creates it, and the app is built before uvicorn starts its loop."""

    def __init__(self, address: str, api_key: str | None = None, client: RouterClient | None = None) -> None:
        self.address, self.api_key = address, api_key
        self._client = client

    def client(self) -> RouterClient:
        """The client (made now if this is its first use)."""
        if self._client is None:
            self._client = RouterClient(self.address, self.api_key)
        return self._client
