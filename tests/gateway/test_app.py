"""The gateway over real HTTP (uvicorn) → real gRPC router → real Ray workers."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine import SamplingParams
from pdserve.gateway.app import GatewayConfig, create_app
from tests.gateway.stack import BLOCK_SIZE


def post(stack, path, body, **kw):
    return httpx.post(stack.url + path, json=body, timeout=60, **kw)


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_text_equals_one_engine(stack, reference):
    r = post(stack, "/v1/completions", {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 8,
                                        "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    want = reference.generate(
        ["def add(a, b):"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )[0]
    assert body["choices"][0]["text"] == want.outputs[0].text
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert "cached_tokens" in body["usage"]["prompt_tokens_details"]
    assert r.headers["x-request-id"].startswith("req-")


def test_streamed_completion_matches_the_whole_one_and_ends_with_done(stack):
    body = {"prompt": "import os", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    whole = post(stack, "/v1/completions", body).json()["choices"][0]["text"]
    with httpx.stream("POST", stack.url + "/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == 10 and events[-2]["choices"] == []
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == whole
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_chat_with_thinking_separates_reasoning(stack):
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "add two numbers"},
    ]
    r = post(stack, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0,
                                             "chat_template_kwargs": {"enable_thinking": True}})  # fmt: skip
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and "reasoning_content" in message
    # The template opened <think>, and 6 tokens cannot close it: everything is reasoning.
    assert message["content"] == "" and message["reasoning_content"]
    plain = post(
        stack, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}
    ).json()
    assert (
        "reasoning_content" not in plain["choices"][0]["message"]
        and plain["choices"][0]["message"]["content"]
    )


def test_n_choices_and_seeds(stack):
    body = {"prompt": "x = ", "max_tokens": 5, "n": 3, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    a, b = post(stack, "/v1/completions", body).json(), post(stack, "/v1/completions", body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # reproducible
    assert a["usage"]["completion_tokens"] == 15


def prefill_hit_tokens(stack) -> float:
    prefill = next(w for w in stack.ray.get(stack.controller.workers.remote()) if w.role == "prefill")
    text = stack.ray.get(prefill.handle.metrics_text.remote())
    return next(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "pdserve_prefix_cache_hit_tokens"
    )


def test_n_choices_run_at_once_and_share_one_prefill(stack):
    # n=4 used to run its choices one after another, each prefilling the prompt. Now they run at
    # once as one prefill group: the prefill worker computes the prompt once, and the streamed
    # choices interleave. Each choice is still exactly what its seed (seed + i) gives alone.
    prompt = (
        "def shared_prefill(a, b):\n    return a * b - a\n\n\ndef other(a, b):\n"  # no other test sends it
    )
    body = {"prompt": prompt, "max_tokens": 12, "n": 4, "temperature": 1.0, "seed": 21, "ignore_eos": True}
    stack.wait_idle()
    before = prefill_hit_tokens(stack)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", stack.url + "/v1/completions", json=streamed, timeout=60) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    prompt_len = events[-1]["usage"]["prompt_tokens"]
    # One choice computed the prompt's full blocks; the other three found them cached (each
    # choice computes only the last, partial block). Computed four times, nothing would be hit.
    full_blocks = (prompt_len - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert prefill_hit_tokens(stack) - before == 3 * full_blocks
    order = [c["index"] for e in events for c in e["choices"] if c["text"]]
    assert sorted(set(order)) == [0, 1, 2, 3]
    # They run at once: another choice starts before the first one to stream has ended (run one
    # after another, each would end before the next began). Which choice starts second depends on
    # whose KV reaches the decode worker first, so no particular one is named.
    first = order[0]
    first_ends = len(order) - 1 - order[::-1].index(first)
    assert min(order.index(i) for i in range(4) if i != first) < first_ends
    texts = {i: "".join(c["text"] for e in events for c in e["choices"] if c["index"] == i) for i in range(4)}
    for i in range(4):
        alone = post(stack, "/v1/completions", {**body, "n": 1, "seed": 21 + i}).json()
        assert alone["choices"][0]["text"] == texts[i]
    stack.wait_idle()


@pytest.mark.parametrize(
    ("body", "status", "needle", "param"),
    [
        ({"prompt": "x", "bogus": 1}, 400, "Unrecognized request argument supplied: bogus", "bogus"),
        ({"prompt": "x", "temperature": -2}, 400, "temperature", None),
        ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist", "model"),
        ({"prompt": "x", "max_tokens": 1000}, 400, "context window", "max_tokens"),
        ({"prompt": "x", "n": 99}, 400, "n:", "n"),
        ({"prompt": ""}, 400, "prompt", "prompt"),
        # Past the router's int32/int64 wire types (found by tests/gateway/test_schemathesis.py).
        ({"prompt": "x", "min_tokens": 2**31}, 400, "min_tokens", "min_tokens"),
        ({"prompt": "x", "seed": 2**63}, 400, "seed", "seed"),
        ({"prompt": [5, 2**31]}, 400, "prompt", None),
        ({"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids", None),
    ],
)
def test_errors_in_openai_shape(stack, body, status, needle, param):
    r = post(stack, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] and err["code"] == status
    if param:
        assert err["param"] == param
    assert r.headers["x-request-id"]


def test_a_prompt_beyond_the_kv_pool_is_a_400_naming_the_limit(stack):
    # The checkpoint allows 4096 positions, but each engine's KV pool holds only blocks * block size
    # tokens: that is the context window the gateway advertises and enforces.
    limit = stack.blocks * BLOCK_SIZE
    assert limit < 4096
    models = httpx.get(stack.url + "/v1/models", timeout=10).json()["data"]
    assert models[0]["max_model_len"] == limit
    start = time.monotonic()
    r = post(stack, "/v1/completions", {"prompt": [5] * (limit + 88), "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert str(limit) in err["message"] and err["param"] == "prompt"
    assert time.monotonic() - start < 10  # at once, not after retries or an admission timeout
    ok = post(stack, "/v1/completions", {"prompt": [5] * 20, "max_tokens": 4, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4  # still serving
    stack.wait_idle()


def test_chat_text_parts_join_into_the_message(stack):
    # (A part the model cannot read is refused: tests/gateway/test_api_edges.py.)
    parts = [{"type": "text", "text": "add "}, {"type": "text", "text": "two numbers"}]
    with_parts = post(stack, "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": parts}], "max_tokens": 2})  # fmt: skip
    plain = post(stack, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "add two numbers"}], "max_tokens": 2})  # fmt: skip
    assert with_parts.status_code == plain.status_code == 200, with_parts.text
    assert with_parts.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    # A text part whose text is not a string is the client's mistake (it was a 500).
    bad = post(stack, "/v1/chat/completions",
               {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("messages.0.content")


def test_body_limit_models_health_metrics(stack):
    r = post(stack, "/v1/completions", {"prompt": "x" * 30_000})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    models = httpx.get(stack.url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    assert httpx.get(stack.url + "/health").json()["status"] == "ok"
    text = httpx.get(stack.url + "/metrics").text
    assert "pdserve_gateway_requests_total" in text and 'endpoint="completions"' in text


def _cancelled(stack) -> float:
    labels = {"policy": "cache_aware", "outcome": "cancelled"}
    return stack.router_metrics.get_sample_value("pdserve_router_requests_total", labels) or 0.0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "def f():"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "def f():"}]}),
    ],
    ids=["completions", "chat"],
)
def test_client_disconnect_mid_stream_frees_blocks(stack, path, body):
    # The tiny model can write all 200 tokens before a hang-up reaches the router on a loaded
    # machine (then there is nothing left to cancel), so a few attempts are allowed; one of them
    # must show the router cancelling the call and every attempt must leave the workers idle.
    for _attempt in range(5):
        before = _cancelled(stack)
        with httpx.stream("POST", stack.url + path, timeout=60,
                          json={**body, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:  # fmt: skip
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                choice = json.loads(line[len("data: ") :])["choices"][0]
                if choice.get("text") or choice.get("delta", {}).get("content"):
                    break  # hang up once tokens flow (chat's first event, the role, comes before any)
        stack.wait_idle()
        # The router saw the call cancelled: the request was cut off, it did not just run to its end.
        deadline = time.monotonic() + 5
        while _cancelled(stack) != before + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        if _cancelled(stack) == before + 1:
            return
    raise AssertionError("no attempt was cancelled: every request ran to its end despite the hang-up")


def test_metrics_include_every_workers_metrics(stack):
    assert post(stack, "/v1/completions", {"prompt": "def f", "max_tokens": 2}).status_code == 200
    text = httpx.get(stack.url + "/metrics").text
    assert "pdserve_gateway_requests_total" in text
    workers = stack.worker_ids()
    assert len(workers) == 2
    for worker in workers:
        assert f'pdserve_kv_blocks_total{{worker="{worker}"}} {float(stack.blocks)}' in text
    # One exposition: each family once, its workers' samples under it (Prometheus rejects repeats).
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)) and text.count("# TYPE pdserve_kv_blocks_total gauge") == 1
    assert "no metrics from workers" not in text


def test_api_key_is_enforced(stack, moe_checkpoint):
    tok = stack.tok
    config = GatewayConfig(router_address="127.0.0.1:1", model_name="tiny", tokenizer_path=str(moe_checkpoint),
                           max_model_len=256, api_key="sekret")  # fmt: skip
    from fastapi.testclient import TestClient

    with TestClient(create_app(config, tokenizer=tok)) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_metrics_without_a_router_still_serve_the_gateways_own(stack, moe_checkpoint):
    config = GatewayConfig(router_address="127.0.0.1:1", model_name="tiny", tokenizer_path=str(moe_checkpoint),
                           max_model_len=256, metrics_timeout_s=2.0)  # fmt: skip
    from fastapi.testclient import TestClient

    with TestClient(create_app(config, tokenizer=stack.tok)) as client:
        r = client.get("/metrics")
    assert r.status_code == 200
    assert "pdserve_gateway_ttft_seconds" in r.text and "pdserve_kv_blocks_total" not in r.text
    assert "# pdserve: worker metrics unavailable, router at 127.0.0.1:1" in r.text
