"""Issue 26, item 2: clients cannot supply a chat template (a 300-byte template of nested loops
stalled every endpoint for 8 s); other `chat_template_kwargs` still fill the template's variables."""

from __future__ import annotations

import httpx
import pytest

NESTED_LOOPS = "{% for a in range(9999) %}{% for b in range(9999) %}{{ a }}{% endfor %}{% endfor %}"
MESSAGES = [{"role": "user", "content": "def f"}]


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, **body}, timeout=60
    )


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("chat_template", NESTED_LOOPS, "client-supplied chat templates are not accepted"),
        ("tokenize", True, "is set by the server"),
        ("add_generation_prompt", False, "is set by the server"),
        ("tools", [{"type": "function"}], "is set by the server"),
        ("messages", [], "is set by the server"),
    ],
)
def test_a_key_that_replaces_the_template_or_changes_the_call_is_refused_by_name(stack, key, value, says):
    r = chat(stack.url, chat_template_kwargs={key: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == f"chat_template_kwargs.{key}" and says in error["message"]


def test_template_variables_still_reach_the_template(stack):
    # The stack's template opens a thinking section when enable_thinking is set.
    thinking = chat(stack.url, chat_template_kwargs={"enable_thinking": True, "custom_variable": "x"})
    assert thinking.status_code == 200, thinking.text
    plain = chat(stack.url, chat_template_kwargs={"enable_thinking": False})
    assert plain.status_code == 200, plain.text
    # "<think>\n" adds prompt tokens: the variable was rendered, not dropped.
    assert thinking.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]
