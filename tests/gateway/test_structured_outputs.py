"""Structured outputs and tool calls through the official `openai` client, on the real stack.

The stack serves the bundled demo model (its own tokenizer and chat template, which renders
tools in ERNIE 4.5's format) on one prefill and one decode worker, so every guided request also
crosses the prefill->decode handoff. The demo model cannot choose tools: constrained decoding
makes it call them (named or required tool_choice), and a guided choice scripts its answer where
a test needs it to "decide" in auto mode.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.gateway.stack import gateway_stack

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "kind", "age", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def stack(ray_session):
    with gateway_stack(
        ray_session, "demo", name="pdserve-controller-guided-test", blocks=256, template=None
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    with OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_json_schema_output_validates_for_50_seeded_requests(client, stack):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}

    def ask(seed: int):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Describe a pet as JSON."}],
            response_format=fmt, temperature=1.0, seed=seed, n=5, max_tokens=80,
        )  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(0, 50, 5)))
    outputs = [c.message.content for r in answers for c in r.choices]
    assert len(outputs) == 50
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(outputs)) > 10  # sampled: the schema constrains, it does not pick one answer
    assert {c.finish_reason for r in answers for c in r.choices} == {"stop"}
    stack.wait_idle()


def test_json_object_regex_choice_and_grammar_on_completions(client):
    r = client.completions.create(model="tiny", prompt="A JSON object:", max_tokens=200, temperature=0.7,
                                  seed=1, extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    assert isinstance(json.loads(r.choices[0].text), dict)
    extras = [
        (
            {"guided_regex": "[0-9]{4}-[0-9]{2}"},
            lambda t: len(t) == 7 and t[4] == "-" and t.replace("-", "").isdigit(),
        ),
        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        (
            {"guided_grammar": 'root ::= "x" [0-9] [0-9]'},
            lambda t: len(t) == 3 and t[0] == "x" and t[1:].isdigit(),
        ),
    ]
    for extra, check in extras:
        r = client.completions.create(model="tiny", prompt="Answer:", max_tokens=20, temperature=1.0, seed=3,
                                      extra_body=extra)  # fmt: skip
        assert check(r.choices[0].text), (extra, r.choices[0].text)


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
         "response_format.json_schema.schema", "objectx"),
        ({"guided_regex": "[a-z]+("}, "guided_regex", "unclosed group"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 150}}, "logit_bias", "[-100, 100]"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex", "tools"),
    ],
)  # fmt: skip
def test_invalid_constraints_are_a_400_naming_the_field(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, extra_body=extra)
    assert e.value.body["param"] == param
    assert words in e.value.body["message"]


def test_a_named_tool_call_parses_every_time(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(6):
        r = client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, temperature=1.0, seed=seed,
            max_tokens=60,
        )  # fmt: skip
        c = r.choices[0]
        # OpenAI ends a call of the function tool_choice named with "stop", not "tool_calls".
        assert c.finish_reason == "stop" and c.message.content is None
        [call] = c.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_calls_use_the_given_tools_one_call_without_parallel(client):
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0,
            seed=seed, max_tokens=80, parallel_tool_calls=False,
        )  # fmt: skip
        [call] = r.choices[0].message.tool_calls
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def streamed_calls(client, **kw) -> tuple[str, dict[int, dict], str | None]:
    """(content, {index: {id, name, arguments}}, finish_reason) reassembled from a stream."""
    content, calls, finish = "", {}, None
    for event in client.chat.completions.create(model="tiny", stream=True, **kw):
        for c in event.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or d.id
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize(
    ("tool_choice", "reason"),
    [({"type": "function", "function": {"name": "get_weather"}}, "stop"), ("required", "tool_calls")],
)
def test_streamed_tool_calls_reassemble_to_the_non_streamed_arguments(client, tool_choice, reason):
    kw = dict(
        messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, temperature=1.0, seed=11, max_tokens=80
    )
    whole = client.chat.completions.create(model="tiny", **kw)
    content, calls, finish = streamed_calls(client, **kw)
    want = [(t.function.name, t.function.arguments) for t in whole.choices[0].message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == want
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert finish == whole.choices[0].finish_reason == reason and content == ""


SCRIPTED = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'


def test_auto_tool_calls_are_read_from_the_model_text_streamed_or_not(client):
    """The model 'decides' to call a tool: its text is scripted with a guided choice."""
    kw = dict(
        messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0, extra_body={"guided_choice": [SCRIPTED]}
    )
    r = client.chat.completions.create(model="tiny", **kw)
    msg = r.choices[0].message
    assert msg.content == "Let me check. " and r.choices[0].finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"})
    ]
    content, calls, finish = streamed_calls(client, **kw)
    assert content == "Let me check. " and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("get_weather", msg.tool_calls[0].function.arguments)
    ]
    # Without tools the same text is plain content.
    plain = client.chat.completions.create(model="tiny", **{**kw, "tools": None})
    assert plain.choices[0].message.content == SCRIPTED and not plain.choices[0].message.tool_calls


def test_a_conversation_with_tool_calls_and_results_renders_through_the_template(client, stack):
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]  # fmt: skip
    r = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], max_tokens=4, temperature=0
    )
    as_template = [*ASK, {**messages[1], "tool_calls": [{**messages[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]}, messages[2]]  # fmt: skip
    text = stack.tok.apply_chat_template(
        as_template, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>' in text
    )
    assert "<tool_output>\n18 C and sunny\n</tool_output>" in text and '"name": "get_weather"' in text
    assert r.usage.prompt_tokens == len(stack.tok(text, add_special_tokens=False)["input_ids"])


def test_free_requests_beside_guided_ones_get_exactly_their_tokens_alone(client):
    free = dict(model="tiny", prompt="def fibonacci(n):\n", max_tokens=24, temperature=0.8, seed=5)
    alone = client.completions.create(**free).choices[0].text
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}

    def guided(seed: int):
        return client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, seed=seed,
                                              temperature=1.0, max_tokens=80)  # fmt: skip

    with ThreadPoolExecutor(5) as pool:
        pending = [pool.submit(guided, s) for s in range(4)]
        mixed = pool.submit(lambda: client.completions.create(**free).choices[0].text)
        for p in pending:
            jsonschema.validate(json.loads(p.result().choices[0].message.content), SCHEMA)
        assert mixed.result() == alone


def test_logit_bias_and_echo(client, stack):
    plain = client.completions.create(model="tiny", prompt="Answer:", max_tokens=1, temperature=0)
    first = stack.tok(plain.choices[0].text, add_special_tokens=False)["input_ids"][0]
    target = 1000 if first != 1000 else 1001
    r = client.completions.create(model="tiny", prompt="Answer:", max_tokens=3, temperature=0,
                                  logit_bias={str(target): 100})  # fmt: skip
    assert r.choices[0].text == stack.tok.decode([target] * 3)
    echoed = client.completions.create(model="tiny", prompt="Answer:", max_tokens=1, temperature=0, echo=True)
    assert echoed.choices[0].text == "Answer:" + plain.choices[0].text
    streamed = "".join(
        e.choices[0].text
        for e in client.completions.create(
            model="tiny", prompt="Answer:", max_tokens=1, temperature=0, echo=True, stream=True
        )
        if e.choices
    )
    assert streamed == echoed.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Answer:", max_tokens=1, echo=True, logprobs=1)
    assert e.value.body["param"] == "echo"


def test_logprobs_of_tokens_a_grammar_masks_are_a_finite_floor_streamed_or_not(client):
    # The grammar allows one token at each step, so every other top token has logprob -inf,
    # which JSON cannot carry (the full response failed with a 500): sent as -9999.0 instead.
    extra = {"guided_choice": ["0"]}
    args = dict(model="tiny", messages=ASK, max_tokens=4, logprobs=True, top_logprobs=2, extra_body=extra)
    full = client.chat.completions.create(**args)
    assert full.choices[0].message.content == "0"
    tops = [t.logprob for item in full.choices[0].logprobs.content for t in item.top_logprobs]
    assert -9999.0 in tops and all(lp >= -9999.0 for lp in tops)
    streamed = [
        t.logprob
        for chunk in client.chat.completions.create(**args, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for item in chunk.choices[0].logprobs.content
        for t in item.top_logprobs
    ]
    # The second request finds the prompt in the prefix cache: the same values up to rounding.
    assert streamed == pytest.approx(tops, rel=1e-5)
