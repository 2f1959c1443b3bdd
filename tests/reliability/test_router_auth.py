"""Issue 26, items 11 and 12: the router requires the cluster's key, Abort is its request owner's
alone, and keys are compared in constant time.

The gRPC router used to answer anyone (bypassing `--api-key`), and any client could abort another's
request by its id. Real gRPC servers over the stack's workers: one with a key, one open.
"""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.config import ClusterConfig
from pdserve.gateway.config import GatewayConfig
from pdserve.proto import pdserve_pb2
from pdserve.proto.bearer import call_metadata
from pdserve.router.config import RouterConfig
from tests.reliability.gateways import gateway
from tests.router.test_server import RouterThread, request

KEY = "k3y-0f-the-cluster"
PROMPT = [5, 6, 7, 8]

# Each of the router's methods, called with the given metadata.
CALLS = {
    "Generate": lambda stub, md: list(stub.Generate(request(PROMPT, max_tokens=2), timeout=30, metadata=md)),
    "Abort": lambda stub, md: stub.Abort(pdserve_pb2.AbortRequest(request_id="x"), timeout=10, metadata=md),
    "ClusterState": lambda stub, md: stub.ClusterState(
        pdserve_pb2.ClusterStateRequest(), timeout=10, metadata=md
    ),
    "Metrics": lambda stub, md: stub.Metrics(pdserve_pb2.MetricsRequest(), timeout=10, metadata=md),
}


@pytest.fixture(scope="module")
def keyed_router(stack):
    router = RouterThread(stack.controller, RouterConfig(port=0, api_key=KEY))
    yield router
    router.stop()


@pytest.fixture(scope="module")
def open_router(stack):
    router = RouterThread(stack.controller, RouterConfig(port=0))
    yield router
    router.stop()


@pytest.mark.parametrize("method", CALLS)
@pytest.mark.parametrize(
    "metadata",
    [
        (),
        call_metadata("wrong"),
        (("authorization", KEY),),
        call_metadata(KEY + "x"),
        call_metadata(KEY[:-1] + "X"),
    ],
    ids=["no key", "wrong key", "key without Bearer", "longer key", "last character differs"],
)
def test_a_call_without_the_key_is_unauthenticated(keyed_router, method, metadata):
    with pytest.raises(grpc.RpcError) as info:
        CALLS[method](keyed_router.stub, metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <key>" in info.value.details()


def test_with_the_key_every_method_works_and_health_needs_none(keyed_router):
    stub, key = keyed_router.stub, call_metadata(KEY)
    chunks = CALLS["Generate"](stub, key)
    assert sum(len(c.token_ids) for c in chunks) == 2 and chunks[-1].finished
    assert not CALLS["Abort"](stub, key).found
    assert len(CALLS["ClusterState"](stub, key).workers) == 2
    assert "pdserve_kv_blocks_total" in CALLS["Metrics"](stub, key).text
    # Load balancers probe health without secrets.
    health = health_pb2_grpc.HealthStub(keyed_router.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_gateway_given_the_key_presents_it_to_the_router(stack, keyed_router):
    address = f"127.0.0.1:{keyed_router.router.port}"
    with gateway(stack, router_address=address, api_key=KEY) as url:
        body = {"prompt": "def f", "max_tokens": 2}
        ok = httpx.post(
            url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert ok.status_code == 200, ok.text
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
        for header in ({}, {"Authorization": f"Bearer {KEY[:-1]}X"}, {"Authorization": KEY}):
            refused = httpx.post(url + "/v1/completions", json=body, headers=header, timeout=60)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    # A gateway without the key is refused by the router; its client gets a plain 500, its log the reason.
    with gateway(stack, router_address=address) as url:
        r = httpx.post(url + "/v1/completions", json=body, headers={"X-Request-Id": "keyless"}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["message"] == (
            "request keyless failed inside the server; it is logged under that id"
        )
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 503 and "UNAUTHENTICATED" in health.json()["error"]["message"]


def abort(stub, rid: str, metadata=()) -> bool:
    return stub.Abort(pdserve_pb2.AbortRequest(request_id=rid), timeout=10, metadata=metadata).found


@pytest.mark.parametrize("router_kind", ["open", "keyed"])
def test_only_the_credential_that_started_a_request_can_abort_it(
    stack, open_router, keyed_router, router_kind
):
    # Open router: a client's own credential still owns its requests. Keyed: the key must be presented.
    router, owner = (
        (open_router, call_metadata("alice")) if router_kind == "open" else (keyed_router, call_metadata(KEY))
    )
    stub = router.stub
    rid = f"owned-{router_kind}"
    stream = stub.Generate(
        request(PROMPT, rid=rid, max_tokens=3000, ignore_eos=True), timeout=60, metadata=owner
    )
    assert next(stream).token_ids
    if router_kind == "open":
        assert not abort(stub, rid)  # no credential: not the owner, and told nothing more than "not found"
        assert not abort(stub, rid, call_metadata("mallory"))
    else:
        with pytest.raises(grpc.RpcError) as info:
            abort(stub, rid)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert abort(stub, rid, owner)
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    stack.wait_idle()


def test_settings_never_show_the_key():
    shown = [
        repr(ClusterConfig(api_key=KEY)),
        repr(RouterConfig(api_key=KEY)),
        repr(
            GatewayConfig(
                router_address="r:1", model_name="m", tokenizer_path="t", max_model_len=8, api_key=KEY
            )
        ),
    ]
    assert not [text for text in shown if KEY in text]
