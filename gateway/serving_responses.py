"""Serving /v1/responses (OpenAI's Responses API, the basic text case) on the chat path.

A request is answered as the chat completion of the same messages (`ResponsesRequest.chat_request`):
rendered by the chat template, checked and generated exactly as chat does. Only the answer's
shape differs: a `response` object whose output is an assistant message item (after a reasoning
item when the template opened ERNIE's thinking section), or, streamed, its events
(`response.created`, ..., `response.output_text.delta`, ..., `response.completed`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi.responses import JSONResponse

from pdserve.gateway.errors import APIError
from pdserve.gateway.protocol import BodyFieldError, ResponsesRequest
from pdserve.gateway.reasoning import ReasoningSplitter
from pdserve.gateway.serving import Generation, OpenAIServingChat, StartedChunks


def response_usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict[str, Any]:
    """The Responses API's `usage` object."""
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}  # fmt: skip


class ResponseObject:
    """One response's `response` object and its items, whole or as they grow."""

    def __init__(self, body: ResponsesRequest, gen: Generation, model: str) -> None:
        self.body, self.model = body, model
        self.id, self.created = f"resp_{gen.request_id}", gen.created
        self.message_id, self.reasoning_id = f"msg_{gen.request_id}", f"rs_{gen.request_id}"

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The assistant message item."""
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": content if status != "in_progress" else []}  # fmt: skip

    def reasoning(self, text: str, status: str) -> dict[str, Any]:
        """The reasoning item: the text of the thinking section."""
        return {"type": "reasoning", "id": self.reasoning_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []}  # fmt: skip

    def output(self, reasoning: str, text: str, status: str) -> list[dict[str, Any]]:
        """The whole output: a reasoning item if there was any, then the message."""
        items = [self.reasoning(reasoning, status)] if reasoning else []
        return [*items, self.message(text, status)]

    def response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The `response` object; `status` is "in_progress", "completed" or "incomplete"
        (stopped at max_output_tokens)."""
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": False, "previous_response_id": None,
            "reasoning": None, "store": False, "temperature": b.temperature,
            "text": {"format": fmt or {"type": "text"}}, "tool_choice": "none", "tools": [],
            "top_p": b.top_p, "truncation": "disabled", "usage": usage, "user": b.user,
            "metadata": b.metadata or {},
        }  # fmt: skip


def status_of(finish: str | None) -> str:
    """A response's status from its choice's engine finish reason."""
    return "incomplete" if finish == "length" else "completed"


class ResponseEvents:
    """A streamed response's events: items opened as their first text arrives, deltas, and the
    closing events of each, each event numbered (`sequence_number`)."""

    def __init__(self, shape: ResponseObject) -> None:
        self.shape = shape
        self.seq = 0
        self.texts = {"reasoning": "", "message": ""}
        self.open: str | None = None  # the item receiving deltas
        self.items: list[dict[str, Any]] = []  # the finished items

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def start(self) -> list[dict[str, Any]]:
        """`response.created` and `response.in_progress`."""
        opening = self.shape.response("in_progress", [])
        return [self.event("response.created", response=opening),
                self.event("response.in_progress", response=opening)]  # fmt: skip

    def feed(self, reasoning: str, text: str) -> list[dict[str, Any]]:
        """The events of generated `reasoning` and `text` (content), in that order."""
        out = []
        for kind, piece in (("reasoning", reasoning), ("message", text)):
            if not piece:
                continue
            if self.open != kind:
                out += self.close() + self.open_item(kind)
            self.texts[kind] += piece
            index = len(self.items)
            if kind == "message":
                out.append(self.event("response.output_text.delta", item_id=self.shape.message_id,
                                      output_index=index, content_index=0, delta=piece, logprobs=[]))  # fmt: skip
            else:
                out.append(self.event("response.reasoning_text.delta", item_id=self.shape.reasoning_id,
                                      output_index=index, content_index=0, delta=piece))  # fmt: skip
        return out

    def open_item(self, kind: str) -> list[dict[str, Any]]:
        self.open = kind
        index = len(self.items)
        if kind == "reasoning":
            return [self.event("response.output_item.added", output_index=index,
                               item=self.shape.reasoning("", "in_progress"))]  # fmt: skip
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self.event("response.output_item.added", output_index=index,
                           item=self.shape.message("", "in_progress")),
                self.event("response.content_part.added", item_id=self.shape.message_id, output_index=index,
                           content_index=0, part=part)]  # fmt: skip

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        """The closing events of the open item (none when no item is open)."""
        kind, self.open = self.open, None
        if kind is None:
            return []
        index, text = len(self.items), self.texts[kind]
        if kind == "reasoning":
            item = self.shape.reasoning(text, status)
            self.items.append(item)
            return [self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                               content_index=0, text=text),
                    self.event("response.output_item.done", output_index=index, item=item)]  # fmt: skip
        item = self.shape.message(text, status)
        self.items.append(item)
        return [self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=item["id"], output_index=index,
                           content_index=0, part=item["content"][0]),
                self.event("response.output_item.done", output_index=index, item=item)]  # fmt: skip

    def finish(self, status: str, usage: dict[str, Any]) -> list[dict[str, Any]]:
        """The closing events: the message's (an empty one when no text came), `response.completed`
        (or `response.incomplete`)."""
        out = [] if self.open == "message" else self.close(status) + self.open_item("message")
        out += self.close(status)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*out, self.event(kind, response=self.shape.response(status, self.items, usage))]


def sse_event(event: dict[str, Any]) -> bytes:
    """One server-sent event named by its type, as the Responses API sends them."""
    return f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"


# The chat body's fields that a Responses body names otherwise (most specific first).
RESPONSES_NAMES = (
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
)


def in_responses_terms(error: APIError) -> APIError:
    """A chat path's error about the body, its field named as the Responses body names it."""
    for chat, responses in RESPONSES_NAMES:
        if error.param is not None and error.param.startswith(chat):
            param = responses + error.param[len(chat) :]
            return APIError(error.status, error.message.replace(chat, responses), error.type, param)
    return error


class OpenAIServingResponses(OpenAIServingChat):
    """POST /v1/responses: the chat path with the Responses API's request and answer shapes."""

    endpoint = "responses"

    async def create_response(self, body: ResponsesRequest, request_id: str):
        """The response to a validated Responses body."""
        try:
            chat = body.chat_request()
        except BodyFieldError as e:
            raise APIError(400, str(e), param=e.param) from e
        try:
            gen = await self.chat_generation(chat, request_id)
        except APIError as e:
            raise in_responses_terms(e) from e
        shape = ResponseObject(body, gen, self.config.model_name)
        if body.stream:
            chunks = await StartedChunks.start(self.timed_chunks(gen))
            return self.event_stream(gen, self.response_stream(gen, shape, chunks), chunks)
        got = await self.collect(gen)
        reasoning, text = gen.split(got.text(0), ReasoningSplitter(bool(gen.in_reasoning)), True)
        status = status_of(got.finish[0])
        usage = response_usage(gen.prompt_tokens, got.tokens, got.cached)
        self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - gen.start)
        return JSONResponse(shape.response(status, shape.output(reasoning, text, status), usage),
                            headers={"X-Request-Id": gen.request_id})  # fmt: skip

    async def response_stream(
        self, gen: Generation, shape: ResponseObject, chunks: StartedChunks
    ) -> AsyncIterator[bytes]:
        """The response's events as `chunks` (`timed_chunks` of `gen`, started) come; an error is
        the stream's last event."""
        events, splitter = ResponseEvents(shape), ReasoningSplitter(bool(gen.in_reasoning))
        tokens, cached, finish = 0, 0, None
        try:
            for event in events.start():
                yield sse_event(event)
            async with aclosing(chunks):
                async for _, chunk in chunks:
                    tokens += len(chunk.token_ids)
                    if chunk.finished:
                        finish, cached = chunk.finish_reason, chunk.usage.cached_tokens
                    reasoning, text = gen.split(chunk.text, splitter, final=chunk.finished)
                    for event in events.feed(reasoning, text):
                        yield sse_event(event)
            for event in events.finish(status_of(finish), response_usage(gen.prompt_tokens, tokens, cached)):
                yield sse_event(event)
            self.metrics.requests.labels(self.endpoint, "200").inc()
        except APIError as e:
            error = events.event("error", code=str(e.status), message=e.message, param=e.param)
            yield sse_event(error)
            self.metrics.requests.labels(self.endpoint, str(e.status)).inc()
        finally:
            self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - gen.start)
