"""Issue 26, item 14: a lone surrogate ("\\ud800", JSON-escaped) in any text field is a 400 naming
the field, never a plain-text 500 (the tokenizer, and any response echoing it, cannot encode it)."""

from __future__ import annotations

import httpx
import pytest

CHAT = '"messages": [{"role": "user", "content": "hi"}]'


def post_raw(url: str, path: str, body: str) -> httpx.Response:
    # Written by hand: json.dumps would escape the backslash of \ud800 and send plain text.
    return httpx.post(
        url + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=60
    )


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "def \\ud800 f", "max_tokens": 1}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt.1"),
        ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', "stop.0"),
        ("/v1/completions", '{"prompt": "x", "user": "\\ud83d"}', "user"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
            "messages.0.content.0.text",
        ),
        (
            "/v1/chat/completions",
            "{" + CHAT + ', "chat_template_kwargs": {"x": "\\ud800"}}',
            "chat_template_kwargs.x",
        ),
        ("/v1/chat/completions", "{" + CHAT + ', "metadata": {"\\ud800": 1}}', "metadata.\\ud800"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(stack, path, body, param):
    r = post_raw(stack.url, path, body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["param"] == param and "lone UTF-16 surrogate" in error["message"]


def test_a_whole_pair_is_text_and_bytes_that_are_not_utf8_are_a_400(stack):
    paired = post_raw(stack.url, "/v1/completions", '{"prompt": "def \\ud83d\\ude00 f", "max_tokens": 1}')
    assert paired.status_code == 200, paired.text
    raw = httpx.post(stack.url + "/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                     headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert raw.status_code == 400 and raw.headers["content-type"].startswith("application/json"), raw.text
