"""/v1/responses (the basic text case) through the official `openai` client, on the real stack.

The Responses API is served on the chat path, so every answer is compared token for token with
the chat completion of the same messages under greedy decoding.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI

from pdserve.gateway.protocol import ResponsesRequest
from pdserve.gateway.serving import Generation
from pdserve.gateway.serving_responses import ResponseEvents, ResponseObject

INSTRUCTIONS = "You write Python."
QUESTION = "add two numbers"


@pytest.fixture(scope="module")
def client(stack):
    with OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def chat(client, messages, max_tokens):
    return client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=max_tokens, temperature=0
    )


def test_a_response_equals_the_chat_completion_of_the_same_messages(client):
    want = chat(
        client, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}], 12
    )
    r = client.responses.create(
        model="tiny", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=12, temperature=0
    )
    assert r.object == "response" and r.model == "tiny" and r.id.startswith("resp_")
    assert r.output_text == want.choices[0].message.content
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == r.status
    assert (r.usage.input_tokens, r.usage.output_tokens) == (
        want.usage.prompt_tokens,
        want.usage.completion_tokens,
    )
    assert r.usage.total_tokens == want.usage.total_tokens
    finished = {"length": ("incomplete", "max_output_tokens"), "stop": ("completed", None)}
    reason = r.incomplete_details.reason if r.incomplete_details else None
    assert (r.status, reason) == finished[want.choices[0].finish_reason]
    assert r.instructions == INSTRUCTIONS and r.max_output_tokens == 12


def test_input_items_are_the_conversation(client):
    conversation = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": QUESTION},
    ]
    want = chat(client, conversation, 10)
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say "},
                                                         {"type": "input_text", "text": "hi."}]},
        # An earlier response's output item, fed back as it came (id, status, annotations).
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "hi", "annotations": []}]},
        {"role": "user", "content": QUESTION},
    ]  # fmt: skip
    r = client.responses.create(model="tiny", input=items, max_output_tokens=10, temperature=0)
    assert r.output_text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens


def test_a_streamed_response_has_the_events_and_text_of_the_whole_one(client):
    kw = dict(model="tiny", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=12, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    last = events[-1].response
    assert last.output_text == whole.output_text and last.status == whole.status
    assert last.usage.output_tokens == whole.usage.output_tokens and last.id == events[0].response.id


def test_a_json_schema_text_format_constrains_the_output(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    fmt = {"format": {"type": "json_schema", "name": "count", "schema": schema, "strict": True}}
    r = client.responses.create(
        model="tiny", input="Count as JSON.", text=fmt, max_output_tokens=40, temperature=0
    )
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema" and r.status == "completed"


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "/v1/chat/completions"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "not stored"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "not supported"),
        ({"store": True}, "store", "store: false"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input.0.type",
         "'function_call_output' items"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
         "input.0.content.0", "'input_image' part"),
        ({"input": [{"content": "hi"}]}, "input.0.role", "needs a role"),
        ({"seed_of_luck": 1}, "seed_of_luck", "Unrecognized request argument"),
        # Errors of the chat path name the Responses body's fields.
        ({"max_output_tokens": 10**6}, "max_output_tokens", "max_output_tokens is 1000000"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
         "text.format.schema", "text.format.schema"),
    ],
)  # fmt: skip
def test_what_is_not_served_is_a_400_naming_the_field(client, extra, param, words):
    body = {"model": "tiny", "input": QUESTION, "max_output_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/responses", body=body, cast_to=object)
    assert e.value.body["param"] == param and words in e.value.body["message"]


def test_reasoning_streams_as_its_own_item_before_the_message():
    body = ResponsesRequest(input="q")
    events = ResponseEvents(ResponseObject(body, Generation("r1", None, 3, []), "tiny"))
    out = events.start() + events.feed("let me ", "") + events.feed("think", "") + events.feed("", "42")
    out += events.finish("completed", {"output_tokens": 3})
    kinds = [e["type"] for e in out]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    final = out[-1]["response"]["output"]
    assert [i["type"] for i in final] == ["reasoning", "message"]
    assert final[0]["content"][0]["text"] == "let me think" and final[1]["content"][0]["text"] == "42"
    assert out[-1]["response"]["usage"] == {"output_tokens": 3}
