"""The router's `Generate` called in process, for a gateway on the same event loop (`pdserve up`).

Under `pdserve up` the gateway and the router share one process and one event loop; a gRPC call
between them encodes, frames and decodes every chunk twice (about 75 us of CPU per chunk on
this machine, docs/DECISIONS.md 2026-12-05) to move it between two coroutines. `local_generate`
gives the gateway a callable shaped like the stub's `Generate`: the same `RouterService.Generate`
runs (validation, placement, metrics, the timeline, cancels, deadlines), and a refusal reaches
the gateway as the same `grpc.aio.AioRpcError` with the same code and message. The key check of
the gRPC server is not needed: the gateway checked the HTTP caller against the same key.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from pdserve.proto import pdserve_pb2


class LocalContext:
    """What `RouterService.Generate` reads of a gRPC context, for an in-process caller."""

    def __init__(self, timeout_s: float | None, metadata: tuple[tuple[str, str], ...]) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._metadata = metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "in-process"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        """Ends the call as gRPC's would: the caller sees an `AioRpcError` with `code`."""
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class LocalStream:
    """One in-process `Generate`: iterate it for the chunks; `aclose` ends it (and the request)."""

    def __init__(self, chunks: AsyncIterator[pdserve_pb2.GenerateChunk]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> pdserve_pb2.GenerateChunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]  # Generate is an async generator


def local_generate(service: Any) -> Callable[..., LocalStream]:
    """A stand-in for `RouterStub(channel).Generate` that runs `service.Generate` in process."""

    def generate(
        request: pdserve_pb2.GenerateRequest, timeout: float | None = None, metadata: Any = ()
    ) -> LocalStream:
        return LocalStream(service.Generate(request, LocalContext(timeout, tuple(metadata or ()))))

    return generate
