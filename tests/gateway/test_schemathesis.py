"""Property-based: whatever schemathesis makes of the gateway's OpenAPI schema, no answer is a 5xx.

The schema is the one the running gateway serves at /openapi.json; requests go over HTTP to the
real stack (uvicorn, router, Ray workers). Each operation gets valid and invalid inputs.
Generation lengths are capped so the run takes about a minute on two cores; invalid lengths
are left as generated.

(Hypothesis' `@given` over each operation's strategy rather than schemathesis' pytest plugin:
its lazy `from_fixture` schema does not run under pytest 9.)
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

MAX_TOKENS = 4
MAX_N = 2
# (method, path, examples): the generating endpoints get the most.
OPERATIONS = [
    ("POST", "/v1/chat/completions", 50),
    ("POST", "/v1/completions", 50),
    ("POST", "/v1/responses", 40),
    ("GET", "/v1/models/{model_id}", 10),
    ("GET", "/v1/models", 3),
    ("GET", "/health", 3),
    ("GET", "/metrics", 3),
    # The operator's routes (off in this stack: no admin_key; fuzzed for 5xx all the same).
    ("POST", "/admin/workers/{worker_id}/role", 10),
    ("POST", "/admin/planner/{action}", 5),
    ("GET", "/admin/planner", 3),
    ("POST", "/admin/workers/{worker_id}/{action}", 10),
    ("POST", "/admin/policy", 5),
    ("GET", "/admin/overview", 5),
]
# Not fuzzed: an event stream that does not end while the client reads (tests/gateway/test_dashboard_api.py).
STREAMS = [("GET", "/admin/events")]


@pytest.fixture(scope="module")
def api_schema(stack) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(stack.url + "/openapi.json")


def _cap_lengths(body: dict[str, Any]) -> None:
    """Valid length fields at most MAX_TOKENS / MAX_N, absent ones set: generation is what costs
    (a body with `input` is a Responses body, its length field `max_output_tokens`)."""
    names = ("max_output_tokens",) if "input" in body else ("max_tokens", "max_completion_tokens")
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if all(body.get(name) is None for name in names):
        body[names[0]] = MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_N:
        body["n"] = MAX_N


def test_every_operation_is_covered(api_schema):
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == {(method, path) for method, path, _ in OPERATIONS} | set(STREAMS)


@pytest.mark.parametrize(
    ("method", "path", "examples"), OPERATIONS, ids=[f"{m} {p}" for m, p, _ in OPERATIONS]
)
def test_no_input_gets_a_server_error(api_schema, stack, method, path, examples):
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )
    statuses: list[int] = []

    @given(case=cases)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        if isinstance(case.body, dict):
            _cap_lengths(case.body)
        response = case.call(base_url=stack.url, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, (
            f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
        )

    check()
    assert statuses  # the strategy produced requests and they were sent
