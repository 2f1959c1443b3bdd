"""The official `openai` Python client against the real stack (uvicorn, router, Ray workers)."""

from __future__ import annotations

from typing import Any

import pytest
from openai import OpenAI

from pdserve.engine import SamplingParams

MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "add two numbers"},
]
PROMPT = "def add(a, b):"
THINKING = {"chat_template_kwargs": {"enable_thinking": True}}


@pytest.fixture(scope="module")
def client(stack):
    with OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def chat_prompt(stack, **template_kwargs: Any) -> list[int]:
    """MESSAGES as the gateway tokenizes them."""
    text = stack.tok.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    return stack.tok(text, add_special_tokens=False)["input_ids"]


def offline(reference, prompt, **sampling: Any):
    """The offline engine's completion of `prompt` (text or token ids)."""
    return reference.generate([prompt], SamplingParams(**sampling))[0].outputs[0]


def test_chat_greedy_equals_the_offline_engine(client, stack, reference):
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt = chat_prompt(stack)
    want = offline(reference, prompt, temperature=0, max_tokens=8, ignore_eos=True)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 8)
    assert r.usage.total_tokens == len(prompt) + 8


def test_completion_greedy_equals_the_offline_engine(client, reference):
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    want = offline(reference, PROMPT, temperature=0, max_tokens=8, ignore_eos=True)
    assert r.object == "text_completion"
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len(
        reference.tokenizer(PROMPT)["input_ids"]
    )


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_chat_equals_the_whole_answer(client, include_usage):
    kw: dict[str, Any] = dict(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = client.chat.completions.create(**kw)
    if include_usage:
        kw["stream_options"] = {"include_usage": True}
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == 10
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    else:
        assert with_usage == []


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_completion_equals_the_whole_answer(client, include_usage):
    kw: dict[str, Any] = dict(
        model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kw)
    if include_usage:
        kw["stream_options"] = {"include_usage": True}
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1].usage.completion_tokens == 10
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    else:
        assert with_usage == []


def test_thinking_on_answers_in_reasoning_content(client, stack, reference):
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, extra_body=THINKING
    )
    want = offline(reference, chat_prompt(stack, enable_thinking=True), temperature=0, max_tokens=6)
    assert "</think>" not in want.text  # so all of it is reasoning
    message = r.choices[0].message
    assert message.reasoning_content == want.text and message.content == ""

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, extra_body=THINKING, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want.text
    assert "".join(d.content or "" for d in deltas) == ""


def test_thinking_off_has_no_reasoning_content(client, stack, reference):
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    want = offline(reference, chat_prompt(stack, enable_thinking=False), temperature=0, max_tokens=6)
    message = r.choices[0].message
    assert getattr(message, "reasoning_content", None) is None and message.content == want.text


def _stop_in(text: str) -> tuple[str, int]:
    """A short ASCII piece of `text` whose first occurrence is well inside it, and where that is."""
    for at in range(len(text) // 2, 0, -1):
        piece = text[at : at + 2]
        if len(piece) == 2 and piece.isascii() and piece.strip() and text.find(piece) == at:
            return piece, at
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_sequences_end_the_answer_before_them(client):
    kw: dict[str, Any] = dict(
        model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw).choices[0].text
    stop, at = _stop_in(full)
    r = client.completions.create(**kw, stop=[stop, "\x00never"])
    assert r.choices[0].text == full[:at] and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:at]

    chat = dict(
        model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    answer = client.chat.completions.create(**chat).choices[0].message.content
    stop, at = _stop_in(answer)
    r = client.chat.completions.create(**chat, stop=stop)
    assert r.choices[0].message.content == answer[:at] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client, reference):
    kw: dict[str, Any] = dict(
        model="tiny", prompt="x = ", max_tokens=8, temperature=1.0, seed=123, extra_body={"ignore_eos": True}
    )
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert first.choices[0].text == again.choices[0].text
    want = offline(reference, "x = ", temperature=1.0, seed=123, max_tokens=8, ignore_eos=True)
    assert first.choices[0].text == want.text  # the seed means the same thing offline and served

    chat: dict[str, Any] = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7, n=2)
    a, b = client.chat.completions.create(**chat), client.chat.completions.create(**chat)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
