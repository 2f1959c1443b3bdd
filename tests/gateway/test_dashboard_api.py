"""The operator dashboard's API on a real stack (Ray workers, the gRPC router, the gateway under
uvicorn): the overview and its event stream, every action with and without the admin key, and the
router's own checks of the key."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import grpc
import httpx
import pytest

from pdserve.gateway.app import create_app
from pdserve.proto import pdserve_pb2
from pdserve.proto.bearer import call_metadata
from pdserve.router.config import RouterConfig
from tests.gateway.stack import gateway_stack, served
from tests.router.test_server import RouterThread

ADMIN = "admin-key-of-the-dashboard-tests"
READ = "api-key-of-the-dashboard-tests"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
PROMPT = "def add(a, b):\n    return a + b\nclass Engine:\n    def step(self):\n"


@pytest.fixture(scope="module")
def dash(ray_session, moe_checkpoint):
    """1 prefill + 2 decode workers, the router, a gateway with an admin key (no API key); the role
    planner paused, so that only the tests' actions change roles."""
    with gateway_stack(
        ray_session, moe_checkpoint, name="pdserve-controller-dashboard-test", decode=2, admin_key=ADMIN
    ) as s:
        ray_session.get(s.controller.planner.remote("pause"))
        yield s


def overview(url: str, **headers) -> dict:
    r = httpx.get(f"{url}/admin/overview", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def complete(url: str, n: int = 1) -> None:
    for _ in range(n):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text


def wait_for(check, timeout_s: float = 30.0, every_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)


def states(url: str) -> dict[str, tuple[str, str]]:
    return {w["worker_id"]: (w["role"], w["state"]) for w in overview(url)["workers"]}


def test_the_overview_shows_every_worker_and_traffic_moves_it(dash):
    o = overview(dash.url)
    assert {w["worker_id"]: (w["role"], w["state"]) for w in o["workers"]} == {
        "prefill-0": ("prefill", "serving"), "decode-0": ("decode", "serving"), "decode-1": ("decode", "serving"),
    }  # fmt: skip
    assert o["model"] == "tiny" or o["settings"]["model"]["name"]
    assert o["policy"] == "cache_aware" and o["planner_running"] is False
    assert o["settings"]["router"]["slo"] == {"ttft_ms": 500.0, "itl_ms": 50.0}
    assert o["settings"]["workers"] == {"prefill": 1, "decode": 2, "both": 0}
    assert o["admin_enabled"] is True and o["can_act"] is False and overview(dash.url, **AS_ADMIN)["can_act"]

    complete(dash.url, 4)

    def moved() -> dict | None:
        now = overview(dash.url)
        samples = now["timeline"]
        moving = [any(s[k] for s in samples) for k in ("requests_per_s", "tokens_per_s", "ttft_p50_ms")]
        sent = sum(f["bytes_total"] for f in now["kv_flows"] if f["sender"] == "prefill-0")
        return now if all(moving) and sent else None

    now = wait_for(moved)
    assert any(s["slo_met"] is not None for s in now["timeline"])
    prefill = next(w for w in now["workers"] if w["worker_id"] == "prefill-0")
    assert (
        prefill["prefix_cache_hit_rate"] is not None and prefill["prefix_cache_hit_rate"] > 0
    )  # same prompt 4x

    # The flows are the prefill worker's own count of what it sent: its metric says the same total.
    # Both are read from the worker's reports, which reach the overview one heartbeat later.
    def same_total():
        metrics = httpx.get(f"{dash.url}/metrics", timeout=30).text
        line = next(ln for ln in metrics.splitlines()
                    if ln.startswith("pdserve_kv_transfer_bytes_total{") and 'worker="prefill-0"' in ln
                    and 'direction="send"' in ln)  # fmt: skip
        sent = sum(f["bytes_total"] for f in overview(dash.url)["kv_flows"] if f["sender"] == "prefill-0")
        return float(line.split()[-1]) == sent > 0

    assert wait_for(same_total)


def test_the_event_stream_pushes_the_overview_every_second(dash):
    events, start = [], time.monotonic()
    with httpx.stream("GET", f"{dash.url}/admin/events", timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic() - start, json.loads(line[6:])))
            if len(events) == 3:
                break
    first, later = events[0][1], events[2][1]
    assert {w["worker_id"] for w in first["workers"]} == {"prefill-0", "decode-0", "decode-1"}
    assert len(later["timeline"]) <= 5 < len(first["timeline"]) + 5  # later pushes carry the newest only
    assert later["timeline"][-1]["at"] > first["timeline"][-1]["at"]  # it is live, not a replay
    assert events[2][0] - events[0][0] >= 1.5  # one push a second


ACTIONS = [
    ("post", "/admin/workers/decode-1/role", {"role": "prefill"}),
    ("post", "/admin/workers/decode-1/drain", None),
    ("post", "/admin/workers/decode-1/undrain", None),
    ("post", "/admin/workers/decode-1/restart", None),
    ("post", "/admin/policy", {"policy": "round_robin"}),
    ("post", "/admin/planner/resume", None),
    ("get", "/admin/planner", None),
]


@pytest.mark.parametrize("method,path,body", ACTIONS, ids=[a[1] for a in ACTIONS])
def test_every_action_without_the_admin_key_is_refused_and_changes_nothing(dash, method, path, body):
    before = overview(dash.url)
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": f"Bearer {READ}"}):
        r = httpx.request(method, dash.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and "admin key" in r.json()["error"]["message"], r.text
    with served(create_app(replace(dash.config, admin_key=None), tokenizer=dash.tok), dash.config) as url:
        r = httpx.request(method, url + path, json=body, headers=AS_ADMIN, timeout=30)
        assert r.status_code == 403 and "admin_key" in r.json()["error"]["message"]
        assert overview(url)["admin_enabled"] is False
    after = overview(dash.url)
    assert [(w["worker_id"], w["role"], w["state"]) for w in after["workers"]] == [
        (w["worker_id"], w["role"], w["state"]) for w in before["workers"]
    ]
    assert (after["policy"], after["planner_running"]) == (before["policy"], before["planner_running"])
    assert len(after["events"]) == len(before["events"])


def test_reading_needs_the_api_key_when_the_cluster_has_one(dash):
    config = replace(dash.config, api_key=READ)
    with served(create_app(config, tokenizer=dash.tok), config) as url:
        for path in ("/admin/overview", "/admin/events"):
            r = httpx.get(url + path, timeout=30)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert overview(url, Authorization=f"Bearer {READ}")["can_act"] is False
        assert overview(url, **AS_ADMIN)["can_act"] is True
        # The page itself holds no data: it loads without a key and asks for one.
        page = httpx.get(f"{url}/dashboard", timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="/dashboard/dashboard.js"' in page.text
        js = httpx.get(f"{url}/dashboard/dashboard.js", timeout=30)
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert httpx.get(f"{url}/dashboard/..%2Fapp.py", timeout=30).status_code == 404
        assert httpx.get(f"{url}/dashboard/nothing.js", timeout=30).status_code == 404


def test_drain_keeps_new_work_off_a_worker_until_undrained(dash):
    r = httpx.post(f"{dash.url}/admin/workers/decode-1/drain", headers=AS_ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["message"] == "decode-1 is now drained"
    try:
        # The page's overview is at most OVERVIEW_TTL_S old.
        assert wait_for(lambda: states(dash.url)["decode-1"] == ("decode", "draining"), timeout_s=5)
        last = httpx.post(f"{dash.url}/admin/workers/decode-0/drain", headers=AS_ADMIN, timeout=30)
        assert last.status_code == 409 and "last decode worker" in last.json()["error"]["message"]

        def to_decode_1() -> int:
            flows = overview(dash.url)["kv_flows"]
            return sum(f["bytes_total"] for f in flows if f["receiver"] == "decode-1")

        time.sleep(1.5)  # the router's view and the flows have seen the drain
        before = to_decode_1()
        complete(dash.url, 3)  # decode-1 has more free blocks: only the drain keeps these off it
        time.sleep(1.5)
        assert to_decode_1() == before
    finally:
        r = httpx.post(f"{dash.url}/admin/workers/decode-1/undrain", headers=AS_ADMIN, timeout=30)
    assert r.status_code == 200
    assert wait_for(lambda: states(dash.url)["decode-1"] == ("decode", "serving"), timeout_s=5)
    events = [(e["kind"], e["worker_id"], e["requested_by"]) for e in overview(dash.url)["events"]]
    assert ("drain", "decode-1", "http 127.0.0.1") in events and (
        "undrain",
        "decode-1",
        "http 127.0.0.1",
    ) in events


def test_the_policy_changes_on_the_router_and_a_bad_one_is_named(dash):
    bad = httpx.post(f"{dash.url}/admin/policy", json={"policy": "fastest"}, headers=AS_ADMIN, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "policy"
    assert "round_robin" in bad.json()["error"]["message"]
    r = httpx.post(f"{dash.url}/admin/policy", json={"policy": "round_robin"}, headers=AS_ADMIN, timeout=30)
    assert r.json() == {"policy": "round_robin", "previous": "cache_aware"}
    try:
        assert wait_for(lambda: overview(dash.url)["policy"] == "round_robin", timeout_s=5)
        with grpc.insecure_channel(dash.config.router_address) as channel:
            from pdserve.proto import pdserve_pb2_grpc

            state = pdserve_pb2_grpc.RouterStub(channel).ClusterState(
                pdserve_pb2.ClusterStateRequest(), timeout=10
            )
        assert state.policy == "round_robin"
        complete(dash.url, 2)  # requests are placed under the new policy
    finally:
        httpx.post(f"{dash.url}/admin/policy", json={"policy": "cache_aware"}, headers=AS_ADMIN, timeout=30)


def test_the_planner_resumes_and_pauses_from_the_api(dash):
    r = httpx.post(f"{dash.url}/admin/planner/resume", headers=AS_ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["running"] is True
    assert wait_for(lambda: overview(dash.url)["planner_running"] is True, timeout_s=5)
    r = httpx.post(f"{dash.url}/admin/planner/pause", headers=AS_ADMIN, timeout=30)
    assert r.json()["running"] is False
    assert wait_for(lambda: overview(dash.url)["planner_running"] is False, timeout_s=5)
    events = [(e["kind"], e["text"], e["requested_by"]) for e in overview(dash.url)["events"]]
    assert events[-2:] == [("planner", "role planner resumed", "http 127.0.0.1"),
                           ("planner", "role planner paused", "http 127.0.0.1")]  # fmt: skip


def test_a_restart_replaces_the_worker_and_requests_keep_completing(dash):
    last = httpx.post(f"{dash.url}/admin/workers/prefill-0/restart", headers=AS_ADMIN, timeout=30)
    assert last.status_code == 409 and "last prefill worker" in last.json()["error"]["message"]
    r = httpx.post(f"{dash.url}/admin/workers/decode-1/restart", headers=AS_ADMIN, timeout=30)
    assert r.status_code == 200 and "restarting" in r.json()["message"]
    assert wait_for(lambda: states(dash.url).get("decode-1", ("decode", "restarting"))[1] == "restarting", 5)
    complete(dash.url, 2)  # decode-0 serves meanwhile
    now = wait_for(lambda: states(dash.url).get("decode-1.r1") == ("decode", "serving"), timeout_s=120)
    assert now
    fresh = next(w for w in overview(dash.url)["workers"] if w["worker_id"] == "decode-1.r1")
    assert fresh["restarts"] == 1 and fresh["slot"] == "decode-1" and fresh["uptime_s"] < 120
    kinds = [(e["kind"], e["worker_id"]) for e in overview(dash.url)["events"]]
    assert ("restart", "decode-1") in kinds and ("restart", "decode-1.r1") in kinds
    unknown = httpx.post(f"{dash.url}/admin/workers/decode-1/restart", headers=AS_ADMIN, timeout=30)
    assert unknown.status_code == 409 and "no live worker 'decode-1'" in unknown.json()["error"]["message"]


def test_the_openapi_schema_lists_the_dashboard_api(dash):
    schema = httpx.get(f"{dash.url}/openapi.json", timeout=30).json()
    paths = {path: set(ops) for path, ops in schema["paths"].items()}
    assert paths["/admin/overview"] == {"get"} and paths["/admin/events"] == {"get"}
    assert "text/event-stream" in schema["paths"]["/admin/events"]["get"]["responses"]["200"]["content"]
    for path in ("/admin/workers/{worker_id}/role", "/admin/workers/{worker_id}/{action}", "/admin/policy",
                 "/admin/planner/{action}"):  # fmt: skip
        assert paths[path] == {"post"}, path
    assert "Overview" in schema["components"]["schemas"] and "/dashboard" not in paths


def test_the_router_refuses_operator_calls_without_the_admin_key(dash):
    router = RouterThread(dash.controller, RouterConfig(port=0, admin_key=ADMIN))
    try:
        calls = {
            "WorkerAction": pdserve_pb2.WorkerActionRequest(worker_id="decode-1.r1", action="drain"),
            "SetPolicy": pdserve_pb2.PolicyRequest(policy="round_robin"),
        }
        for method, request in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                getattr(router.stub, method)(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        overview_now = router.stub.Overview(pdserve_pb2.OverviewRequest(), timeout=10)  # reading is open
        assert overview_now.policy == "cache_aware"
        assert all(w.state != "draining" for w in overview_now.workers)
        done = router.stub.SetPolicy(calls["SetPolicy"], timeout=10, metadata=call_metadata(ADMIN))
        assert (done.previous, done.policy) == ("cache_aware", "round_robin")
        event = [e for e in router.stub.Overview(pdserve_pb2.OverviewRequest(), timeout=10).events
                 if e.kind == "policy"][-1]  # fmt: skip
        assert event.requested_by.startswith("grpc ")  # no name given: the caller's address
    finally:
        router.stop()
