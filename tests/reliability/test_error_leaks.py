"""Issue 26, item 13: errors sent to clients name no internals (Ray actor ids, pids, node
addresses, library functions, Python exception classes); the log keeps them under the request id.

The errors are real ones, raised by a real Ray actor, and reach the client through a real router
and gateway: the router's request path is made to raise them (its runner is replaced on a router
of this test's own).
"""

from __future__ import annotations

import logging
import os
import time

import grpc
import httpx
import pytest

from pdserve.engine.errors import InvalidRequestError
from pdserve.gateway.app import create_app
from pdserve.router.config import RouterConfig
from pdserve.router.server import client_error
from tests.gateway.stack import served
from tests.reliability.gateways import gateway
from tests.router.test_server import RouterThread, request

REFUSAL = "prompt_token_ids has 9999 tokens; the context window is 512"


class Doomed:
    """A Ray actor that fails the ways a worker can."""

    def pid(self) -> int:
        return os.getpid()

    def fail(self) -> int:
        return max([])  # a library-level error: "max() arg is an empty sequence"

    def refuse(self) -> None:
        raise InvalidRequestError(REFUSAL)


@pytest.fixture(scope="module")
def ray_errors(ray_session):
    """(pid, actor id, {kind: the error Ray raised in the caller}) for a real actor."""
    actor = ray_session.remote(Doomed).remote()
    pid, actor_id = ray_session.get(actor.pid.remote()), actor._actor_id.hex()
    errors = {}
    for kind, call in (("task", actor.fail), ("invalid", actor.refuse)):
        with pytest.raises(Exception) as info:
            ray_session.get(call.remote())
        errors[kind] = info.value
    ray_session.kill(actor)
    # The kill is asynchronous: a call sent right after it may still be served.
    deadline = time.monotonic() + 60
    while "dead" not in errors:
        try:
            ray_session.get(actor.pid.remote(), timeout=30)
        except Exception as e:
            errors["dead"] = e
        assert time.monotonic() < deadline, "the killed actor kept answering"
    # They do carry the internals (else this suite would prove nothing).
    assert actor_id in str(errors["dead"]) and f"pid={pid}" in str(errors["task"])
    return pid, actor_id, errors


def internals(pid: int, actor_id: str) -> list[str]:
    return [actor_id, str(pid), "ray", "Ray", "Error", "max()", "127.0.0.1", "Traceback", "<class"]


@pytest.mark.parametrize("kind", ["task", "dead"])
def test_a_ray_error_maps_to_one_plain_line_with_the_request_id(ray_errors, kind):
    pid, actor_id, errors = ray_errors
    code, message = client_error(errors[kind], "req-leak")
    assert code == grpc.StatusCode.UNAVAILABLE
    assert message == "request req-leak failed inside the cluster; retry it (logged as req-leak)"
    assert not [word for word in internals(pid, actor_id) if word in message]


def test_an_engine_refusal_keeps_only_the_engines_message(ray_errors):
    _, _, errors = ray_errors
    assert isinstance(errors["invalid"], InvalidRequestError)  # Ray's wrapper is also the engine's type
    assert client_error(errors["invalid"], "req-x") == (grpc.StatusCode.INVALID_ARGUMENT, REFUSAL)


@pytest.fixture
def failing_router(stack):
    router = RouterThread(stack.controller, RouterConfig(port=0))
    yield router
    router.stop()


@pytest.mark.parametrize("kind", ["task", "dead"])
def test_through_the_router_and_gateway_the_client_sees_no_internals_and_the_log_keeps_them(
    stack, ray_errors, failing_router, caplog, kind
):
    pid, actor_id, errors = ray_errors

    async def run(request_id, prompt, params, group=None):
        raise errors[kind]
        yield  # an async generator, as the real runner is

    failing_router.router.service.runner.run = run
    with caplog.at_level(logging.WARNING, logger="pdserve.router.server"):
        with pytest.raises(grpc.RpcError) as info:
            list(failing_router.stub.Generate(request([5, 6], rid="grpc-leak", max_tokens=2), timeout=30))
        with gateway(stack, router_address=f"127.0.0.1:{failing_router.router.port}") as url:
            r = httpx.post(url + "/v1/completions", json={"prompt": "def f", "max_tokens": 2},
                           headers={"X-Request-Id": "http-leak"}, timeout=60)  # fmt: skip
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not [word for word in internals(pid, actor_id) if word in info.value.details()]
    assert r.status_code == 503 and r.json()["error"]["message"] == (
        "request http-leak failed inside the cluster; retry it (logged as http-leak)"
    )
    assert not [word for word in internals(pid, actor_id) if word in r.text]
    logged = [rec.getMessage() for rec in caplog.records]
    for rid in ("grpc-leak", "http-leak"):  # the details, under each request's id
        assert any(rid in line and (actor_id in line or f"pid={pid}" in line) for line in logged), logged


def test_an_unforeseen_router_error_is_a_plain_500_from_the_gateway(stack, failing_router, caplog):
    def broken(request):
        raise ValueError("max() arg is an empty sequence")

    failing_router.router.service._validate = broken  # the router's own code fails: gRPC says UNKNOWN
    address = f"127.0.0.1:{failing_router.router.port}"
    with (
        caplog.at_level(logging.ERROR, logger="pdserve.gateway"),
        gateway(stack, router_address=address) as url,
    ):
        r = httpx.post(url + "/v1/completions", json={"prompt": "def f", "max_tokens": 2},
                       headers={"X-Request-Id": "unknown-1"}, timeout=60)  # fmt: skip
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "request unknown-1 failed inside the server; it is logged under that id",
        "type": "internal_error", "param": None, "code": 500,
    }  # fmt: skip
    assert any("unknown-1" in rec.getMessage() and "max() arg" in rec.getMessage() for rec in caplog.records)


class BrokenTokenizer:
    """The stack's tokenizer, except that tokenizing raises (as a tokenizer used from two threads
    with changing truncation settings does: "Already borrowed")."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("Already borrowed (tokenizer at 0x7f00deadbeef)")


def test_an_exception_in_the_gateway_is_an_openai_shaped_500_not_plain_text(stack, caplog):
    config = stack.config
    with (
        caplog.at_level(logging.ERROR, logger="pdserve.gateway"),
        served(create_app(config, tokenizer=BrokenTokenizer(stack.tok)), config) as url,
    ):
        r = httpx.post(url + "/v1/completions", json={"prompt": "def f"}, headers={"X-Request-Id": "boom-1"},
                       timeout=60)  # fmt: skip
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
    assert (
        r.json()["error"]["message"]
        == "the server could not answer request boom-1; it is logged under that id"
    )
    assert "Already borrowed" not in r.text and "RuntimeError" not in r.text
    assert any(
        "boom-1" in rec.getMessage() and "Already borrowed" in (rec.exc_text or "") for rec in caplog.records
    )
