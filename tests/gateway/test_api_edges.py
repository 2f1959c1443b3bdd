"""The API's edges as a client meets them over HTTP (real stack: uvicorn, router, Ray workers):
bad sampling in a stream, content the model cannot read, batched prompts, malformed requests,
and the request counter."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from pdserve.gateway.app import GatewayConfig, create_app
from tests.gateway.stack import served

GREEDY: dict[str, Any] = {"max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(stack):
    with OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def post(url: str, path: str, body: Any, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == status and err["type"] and err["message"] and err["param"] == param
    return err


@pytest.mark.parametrize(("field", "value"), [("temperature", -1), ("top_p", 0), ("presence_penalty", 5)])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ],
    ids=["completions", "chat"],
)
def test_bad_sampling_in_a_stream_is_a_400_before_it_starts(stack, path, body, field, value):
    with httpx.stream("POST", stack.url + path, json={**body, field: value, "stream": True}, timeout=60) as r:
        r.read()
    err = assert_openai_error(r, 400, field)
    assert err["message"].startswith(field)  # the engine's own message, not the router's "sampling: …"


def test_the_openai_client_sees_bad_sampling_as_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", temperature=-1, stream=True)
    assert info.value.body["param"] == "temperature"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                      {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
         "messages.1.content.1"),
        ({"role": "assistant", "content": None,
          "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         "messages.1.tool_calls"),
    ],
    ids=["image part", "tool calls the template does not render"],
)  # fmt: skip
def test_content_the_model_cannot_read_is_refused_not_dropped(client, message, param):
    messages = [{"role": "system", "content": "You write Python."}, message]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert info.value.body["param"] == param and "cannot be used" in info.value.body["message"]


def test_a_batch_of_prompts_is_answered_prompt_by_prompt(client, stack):
    prompts = ["def add(a, b):", "import os"]
    alone = [client.completions.create(model="tiny", prompt=p, n=2, **GREEDY) for p in prompts]
    batch = client.completions.create(model="tiny", prompt=prompts, n=2, **GREEDY)
    # OpenAI's order: prompt k's i-th choice is choice k * n + i.
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [c.text for r in alone for c in r.choices]
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    assert batch.usage.completion_tokens == 4 * GREEDY["max_tokens"]

    ids = [stack.tok(p)["input_ids"] for p in prompts]
    as_ids = client.completions.create(model="tiny", prompt=ids, n=2, **GREEDY)
    assert [c.text for c in as_ids.choices] == [c.text for c in batch.choices]

    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="tiny", prompt=prompts, n=2, stream=True, **GREEDY):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in batch.choices}


def test_n_seeded_choices_at_the_top_of_the_seed_range(stack):
    body = {"prompt": "x", "n": 2, "seed": 2**63 - 1, "max_tokens": 2}
    r = post(stack.url, "/v1/completions", body)
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1], r.text


def test_an_empty_prompt_in_a_batch_is_named(stack):
    assert_openai_error(post(stack.url, "/v1/completions", {"prompt": ["x", ""]}), 400, "prompt.1")
    assert_openai_error(post(stack.url, "/v1/completions", {"prompt": [[5], []]}), 400, "prompt.1")


def test_malformed_json_unknown_paths_and_wrong_methods_get_openai_errors(stack):
    r = httpx.post(stack.url + "/v1/completions", content=b'{"prompt": "x",,}', timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert "not valid JSON" in assert_openai_error(r, 400, None)["message"]
    r = httpx.post(stack.url + "/v1/completions", content=b"[1, 2]", timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert "JSON object" in assert_openai_error(r, 400, None)["message"]
    assert "/v1/nowhere" in assert_openai_error(httpx.get(stack.url + "/v1/nowhere"), 404, None)["message"]
    r = httpx.get(stack.url + "/v1/chat/completions")
    assert "POST" in assert_openai_error(r, 405, None)["message"] and r.headers["allow"] == "POST"
    assert r.headers["x-request-id"]


def requests_counted(url: str) -> dict[tuple[str, str], float]:
    """The gateway's request counter by (endpoint, status), from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=60).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["pdserve_gateway_requests"].samples
    return {(s.labels["endpoint"], s.labels["status"]): s.value for s in samples if s.name.endswith("_total")}


def test_the_request_counter_counts_every_response_by_status(stack):
    before = requests_counted(stack.url)
    post(stack.url, "/v1/completions", {"prompt": "x", "temperature": -1})
    post(stack.url, "/v1/completions", {"prompt": "x" * 30_000})  # past the 20 kB body limit
    post(stack.url, "/v1/chat/completions", {"messages": []})
    httpx.get(stack.url + "/v1/nowhere")
    post(stack.url, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    with httpx.stream("POST", stack.url + "/v1/completions", timeout=60,
                      json={"prompt": "x", "max_tokens": 1, "stream": True}) as r:  # fmt: skip
        assert [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    after = requests_counted(stack.url)
    grown = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    # The /metrics scrape that read `before` is counted too.
    assert grown == {
        ("completions", "400"): 1, ("completions", "413"): 1, ("chat", "400"): 1, ("other", "404"): 1,
        ("completions", "200"): 2, ("metrics", "200"): 1,
    }  # fmt: skip


def test_the_request_counter_counts_refused_api_keys(stack, moe_checkpoint):
    config = GatewayConfig(router_address="127.0.0.1:1", model_name="tiny", tokenizer_path=str(moe_checkpoint),
                           max_model_len=256, api_key="sekret", metrics_timeout_s=1.0)  # fmt: skip
    with served(create_app(config, tokenizer=stack.tok), config) as url:
        assert_openai_error(post(url, "/v1/completions", {"prompt": "x"}), 401, None)
        assert requests_counted(url)[("completions", "401")] == 1
