"""Issue 26, item 3: tokenizing and rendering run off the event loop, and a prompt longer than the
context window can hold (in characters) is refused before either starts.

A 3.9 MB prompt (inside the body limit) used to block every endpoint, the router's included,
for 8 s while it was tokenized on the shared event loop.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.reliability.gateways import gateway

# 3.2 MB of text: seconds of tokenizing, inside the 4 MiB default body limit.
HUGE = "def add(a, b):\n    return a + b\n" * 100_000


def prompts_in_tokenizer(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^pdserve_gateway_prompts_in_tokenizer (\S+)$", text, re.M).group(1))


def test_other_requests_complete_while_a_huge_prompt_is_tokenized(stack):
    # The character cap raised out of the way, so the huge prompt is really tokenized.
    with (
        gateway(stack, max_chars_per_token=10_000, tokenizer_threads=2) as url,
        ThreadPoolExecutor(1) as pool,
    ):
        huge = pool.submit(
            httpx.post, url + "/v1/completions", json={"prompt": HUGE, "max_tokens": 1}, timeout=120
        )
        deadline = time.monotonic() + 60
        while prompts_in_tokenizer(url) < 1:  # each look is itself served by the event loop
            assert not huge.done() and time.monotonic() < deadline, (
                "the huge prompt never reached the tokenizer"
            )
            time.sleep(0.02)
        ids = httpx.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}, timeout=60)
        chat = httpx.post(url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "def f"}], "max_tokens": 2})  # fmt: skip
        # Both answered while the huge prompt was still being tokenized: nothing waited for it.
        assert not huge.done()
        assert ids.status_code == 200 and chat.status_code == 200, (ids.text, chat.text)
        refused = huge.result()
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
    assert "context window is 512" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", lambda text: {"prompt": text}, "prompt"),
        ("/v1/completions", lambda text: {"prompt": ["def f", text]}, "prompt.1"),
        ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}]}, "messages"),
    ],
    ids=["completion", "batch", "chat"],
)
def test_a_prompt_longer_than_the_window_can_hold_is_refused_untokenized(stack, path, body, param):
    cap = stack.config.max_model_len * stack.config.max_chars_per_token  # 512 tokens * 32 characters
    r = httpx.post(stack.url + path, json={**body("x" * (cap + 1)), "max_tokens": 1}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"] == (
        f"{param} has {cap + 1} characters; at most {cap} can fit this model's context window of 512 tokens "
        "(32 characters per token at most)"
    )
    # Under the cap (and the chat template's additions) the prompt is tokenized, and refused by its tokens.
    r = httpx.post(stack.url + path, json={**body("x" * (cap - 100)), "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "context window is 512" in r.json()["error"]["message"], r.text


def test_many_short_messages_cannot_make_a_prompt_longer_than_the_window_can_hold(stack):
    # No message is long, but the template adds "User: " and a newline to each.
    cap = stack.config.max_model_len * stack.config.max_chars_per_token
    messages = [{"role": "user", "content": "x"}] * (cap // 8)
    r = httpx.post(
        stack.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages"
    assert error["message"].startswith("the prompt the chat template made of messages has ")
