"""The gateway over real HTTP (uvicorn) → real gRPC router → real Ray workers."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn

from pdserve.cluster.controller import ControllerConfig, start_controller
from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.gateway.app import GatewayConfig, create_app
from pdserve.router.server import RouterConfig
from tests.router.test_server import RouterThread, free_port

BLOCKS = 128
# ERNIE 4.5's turn layout (begin-of-sentence, "User: "/"Assistant: ", thinking switch), small.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: {{ m.content }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: "
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def stack(ray_session, moe_checkpoint):
    engine = EngineConfig(
        model=str(moe_checkpoint),
        dtype="float32",
        block_size=4,
        num_threads=1,
        progress=False,
        kv_cache_blocks=BLOCKS,
    )
    controller = start_controller(
        ControllerConfig(engine, prefill=1, decode=1), name="pdserve-controller-gw-test"
    )
    ray_session.get(controller.start.remote())
    router = RouterThread(controller, RouterConfig(port=0))
    tok = load_tokenizer(moe_checkpoint)
    tok.chat_template = TEMPLATE
    config = GatewayConfig(
        router_address=f"127.0.0.1:{router.router.port}", model_name="tiny", tokenizer_path=str(moe_checkpoint),
        max_model_len=256, max_body_bytes=20_000, api_key=None,
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, tokenizer=tok), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "controller": controller, "tok": tok, "ray": ray_session}
    server.should_exit = True
    thread.join(5)
    router.stop()
    ray_session.get(controller.shutdown.remote())
    ray_session.kill(controller)


@pytest.fixture(scope="module")
def reference(moe_checkpoint):
    return LLM(str(moe_checkpoint), dtype="float32", block_size=4, progress=False)


def post(stack, path, body, **kw):
    return httpx.post(stack["url"] + path, json=body, timeout=60, **kw)


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_idle(stack, timeout_s=15):
    ray, controller = stack["ray"], stack["controller"]
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [ray.get(w.handle.load.remote()) for w in ray.get(controller.workers.remote())]
        if all(lo.kv_blocks_free == BLOCKS and not lo.num_running for lo in loads):
            return
        assert time.monotonic() < deadline, loads
        time.sleep(0.1)


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
    with httpx.stream("POST", stack["url"] + "/v1/completions", timeout=60,
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


@pytest.mark.parametrize(
    ("body", "status", "needle", "param"),
    [
        ({"prompt": "x", "bogus": 1}, 400, "Unrecognized request argument supplied: bogus", "bogus"),
        ({"prompt": "x", "temperature": -2}, 400, "temperature", None),
        ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist", "model"),
        ({"prompt": "x", "max_tokens": 1000}, 400, "context window", "max_tokens"),
        ({"prompt": "x", "n": 99}, 400, "n:", "n"),
        ({"prompt": ""}, 400, "prompt", "prompt"),
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


def test_body_limit_models_health_metrics(stack):
    r = post(stack, "/v1/completions", {"prompt": "x" * 30_000})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    models = httpx.get(stack["url"] + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    assert httpx.get(stack["url"] + "/health").json()["status"] == "ok"
    text = httpx.get(stack["url"] + "/metrics").text
    assert "pdserve_gateway_requests_total" in text and 'endpoint="completions"' in text


def test_client_disconnect_mid_stream_frees_blocks(stack):
    with httpx.stream("POST", stack["url"] + "/v1/completions", timeout=60,
                      json={"prompt": "def f():", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first event
    wait_idle(stack)


def test_api_key_is_enforced(stack, moe_checkpoint):
    tok = stack["tok"]
    config = GatewayConfig(router_address="127.0.0.1:1", model_name="tiny", tokenizer_path=str(moe_checkpoint),
                           max_model_len=256, api_key="sekret")  # fmt: skip
    from fastapi.testclient import TestClient

    with TestClient(create_app(config, tokenizer=tok)) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
