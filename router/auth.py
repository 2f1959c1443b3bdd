"""Who may call the router: the cluster's API key on every call, and a request's owner for Abort.

With a key set (`--api-key`), every call must carry the metadata `authorization: Bearer KEY`
(`pdserve.proto.bearer`), or it ends UNAUTHENTICATED before it reaches the service. The gRPC health
service stays open: load balancers probe it without secrets, and it reveals only "SERVING".

A request belongs to the credential its Generate call presented; only a call presenting the same
credential may abort it (a digest of it is kept, not the credential itself). Without a key the
router admits everyone, and a client may still present a private credential to keep its requests
its own.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc

from pdserve.proto.bearer import matches, presented

# Methods callable without the key (full gRPC method names start with "/<service>/").
OPEN_SERVICE_PREFIX = "/grpc.health.v1.Health/"
REFUSAL = (
    "missing or wrong API key: send the call metadata 'authorization: Bearer <key>' (the cluster's api_key)"
)

# The RpcMethodHandler factory for each (request_streaming, response_streaming).
HANDLER_OF_KIND = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class KeyCheck(grpc.aio.ServerInterceptor):
    """Refuses calls that do not present the cluster's key, with UNAUTHENTICATED."""

    def __init__(self, key: str, admin_key: str | None = None) -> None:
        self.key = key
        self.admin_key = admin_key  # an operator's key opens every call too

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (
            handler is None  # an unknown method: gRPC answers UNIMPLEMENTED itself
            or handler_call_details.method.startswith(OPEN_SERVICE_PREFIX)
            or matches(credential := presented(handler_call_details.invocation_metadata), self.key)
            or (self.admin_key is not None and matches(credential, self.admin_key))
        ):
            return handler
        return refusal(handler)


async def _refuse(request_or_requests, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


def refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that ends the call UNAUTHENTICATED without running it."""
    make = HANDLER_OF_KIND[(handler.request_streaming, handler.response_streaming)]
    return make(
        _refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def caller(context: grpc.aio.ServicerContext) -> bytes:
    """Who is calling: a digest of the credential the call presented (the same for no credential)."""
    return hashlib.sha256(presented(context.invocation_metadata()).encode("utf-8", "surrogatepass")).digest()


def same_caller(a: bytes, b: bytes) -> bool:
    """Whether two `caller` digests are the same caller (constant time)."""
    return hmac.compare_digest(a, b)
