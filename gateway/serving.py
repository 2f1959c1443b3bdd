"""Serving completions and chat completions: from a validated request body to OpenAI's response.

Shaped like vLLM's `serving_chat.py`: each endpoint turns its body into a `Generation` (prompt
token ids and sampling per choice), and `OpenAIServing` answers it either as server-sent events
(`stream_generator`) or as one JSON body (`full_generator`). The endpoints differ only in how a
prompt is made and how a choice looks; the rest is shared here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from pdserve.engine.guided_grammar import GuidedDecodingError, check_guided
from pdserve.engine.sampling_params import GuidedDecoding, SamplingParamsError
from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.errors import APIError
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.prompt_tokenizer import PromptTokenizer
from pdserve.gateway.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice, SamplingFields
from pdserve.gateway.reasoning import THINK_START, ReasoningSplitter
from pdserve.gateway.router_client import HTTP_OF_GRPC, RouterConnection
from pdserve.gateway.tool_calls import ToolCallReader, ToolCallStream, full_tool_calls, required_schema
from pdserve.proto import pdserve_pb2

log = logging.getLogger("pdserve.gateway")


# A token a grammar (or a stop) masked out has logprob -inf, which JSON cannot carry: it is sent as
# this floor instead, as OpenAI-compatible servers do (vLLM's serving layer uses the same value).
LOGPROB_FLOOR = -9999.0


def finite_logprob(logprob: float) -> float:
    """`logprob` as JSON can carry it: -inf (and NaN, never expected) become `LOGPROB_FLOOR`."""
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


@dataclass
class Generation:
    """One request's work: a prompt and sampling per choice, and what its answer needs to know."""

    request_id: str
    body: SamplingFields
    prompt_tokens: int  # usage's prompt_tokens
    choices: list[tuple[list[int], pdserve_pb2.SamplingParams]]
    # Chat only: None when reasoning is not split out, else whether the prompt opened it.
    in_reasoning: bool | None = None
    # Chat with tools: reads tool calls out of each choice's content (None: no tools).
    tool_reader: ToolCallReader | None = None
    # Completions with echo: each choice's prompt text, sent before its completion.
    echo: list[str] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    start: float = field(default_factory=time.perf_counter)

    def choice_request_id(self, index: int) -> str:
        """The router's request id for choice `index` (the request's own when it has one choice)."""
        return f"{self.request_id}-{index}" if len(self.choices) > 1 else self.request_id

    def choice_group(self, index: int) -> str | None:
        """The router's prefill group of choice `index`: the n choices of one prompt prefill on one
        worker, which computes their prompt once (None when the prompt has one choice)."""
        n = getattr(self.body, "n", 1) or 1
        return f"{self.request_id}/{index // n}" if n > 1 else None

    def split(self, text: str, splitter: ReasoningSplitter, final: bool) -> tuple[str, str]:
        """(reasoning, content) of generated `text`."""
        if self.in_reasoning is None:
            return "", text
        return splitter.feed(text, final=final)

    def finish_reason(self, finish: str | None, has_tool_calls: bool) -> str | None:
        """OpenAI's finish reason: "tool_calls" when a choice that stopped by itself called tools
        the model chose (auto or required); a function named in `tool_choice` stops with "stop",
        as OpenAI answers it, its call still in the message."""
        named = self.tool_reader is not None and self.tool_reader.mode == "named"
        return "tool_calls" if has_tool_calls and finish == "stop" and not named else finish


@dataclass
class Collected:
    """A generation's choices read whole (`OpenAIServing.collect`), and its usage."""

    texts: list[list[str]]  # each choice's text pieces, in order
    logprobs: list[list[pdserve_pb2.TokenLogprob]]
    finish: list[str | None]  # each choice's engine finish reason
    tokens: int = 0  # completion tokens of all choices
    cached: int = 0
    from_redis: int = 0

    def text(self, index: int) -> str:
        """Choice `index`'s whole generated text."""
        return "".join(self.texts[index])


def choice_samplings(base: pdserve_pb2.SamplingParams, n: int) -> list[pdserve_pb2.SamplingParams]:
    """n choices = n requests; seeded ones get seed+i so they differ yet stay reproducible."""
    out = []
    for i in range(n):
        p = pdserve_pb2.SamplingParams()
        p.CopyFrom(base)
        if base.HasField("seed"):
            # Wrapped into int64, the wire's type: a seed near its top is valid for every choice.
            p.seed = (base.seed + i + 2**63) % 2**64 - 2**63
        out.append(p)
    return out


class StartedChunks:
    """A stream's `(choice, chunk)` iterator whose first chunk is already being fetched, so the
    request is with the router (placed, and on its way to a worker) before the response sends
    its status line and opening events; the engine starts meanwhile, on its own core.

    Iterate it once. `aclose` ends it, fetched or not (a client gone before the stream began).
    """

    def __init__(self, chunks: AsyncIterator[tuple[int, pdserve_pb2.GenerateChunk]]) -> None:
        self._chunks = chunks
        self._first: asyncio.Future | None = asyncio.ensure_future(self._next())

    @classmethod
    async def start(cls, chunks: AsyncIterator[tuple[int, pdserve_pb2.GenerateChunk]]) -> StartedChunks:
        """Starts fetching the first chunk and lets it run until it waits: the router has the request."""
        started = cls(chunks)
        await asyncio.sleep(0)
        return started

    async def _next(self) -> tuple[int, pdserve_pb2.GenerateChunk] | None:
        return await anext(self._chunks, None)  # None at the end: a task cannot raise StopAsyncIteration

    def __aiter__(self) -> StartedChunks:
        return self

    async def __anext__(self) -> tuple[int, pdserve_pb2.GenerateChunk]:
        if self._first is not None:
            first, self._first = self._first, None
            item = await first
        else:
            item = await self._next()
        if item is None:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        if self._first is not None:  # never read: stop the fetch before closing what it runs
            first, self._first = self._first, None
            first.cancel()
            await asyncio.wait([first])
            with suppress(BaseException):
                first.exception()  # retrieved, whatever it was: nobody else will read it
        await self._chunks.aclose()  # type: ignore[attr-defined]


def usage(prompt_tokens: int, completion: int, cached: int, from_redis: int = 0) -> dict[str, Any]:
    """OpenAI's `usage` object; `cached_tokens` is the total, split into the worker's own prefix
    cache (`local_cached_tokens`) and the Redis context cache (`redis_cached_tokens`)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "local_cached_tokens": cached - from_redis,
                                      "redis_cached_tokens": from_redis}}  # fmt: skip


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON (orjson: UTF-8 out, no escaping, one call
    for what `json.dumps` and `str.encode` took per streamed chunk)."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class OpenAIServing:
    """What completions and chat share: checks, the router call, the streaming and full answers.

    Subclasses name their endpoint and response objects and say how one choice looks.
    """

    endpoint: str  # the metrics label
    object_kind: str  # a full response's "object"
    chunk_kind: str  # a streamed event's "object"
    id_prefix: str

    def __init__(
        self, config: GatewayConfig, router: RouterConnection, tokenizer: Any, metrics: GatewayMetrics,
        prompts: PromptTokenizer,
    ) -> None:  # fmt: skip
        self.config, self.router, self.tokenizer, self.metrics = config, router, tokenizer, metrics
        self.prompts = prompts  # tokenizes and renders off the event loop

    def check_model(self, body: SamplingFields) -> None:
        """404 unless the body names this server's model (or none)."""
        if body.model not in (None, self.config.model_name):
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", param="model")  # fmt: skip

    def guided(
        self, body: SamplingFields, tools: tuple[GuidedDecoding, str] | None = None
    ) -> GuidedDecoding | None:
        """The body's guided decoding (or the tools'), checked by the engine's rules: a bad schema,
        regex or grammar is a 400 naming the field, before any worker sees it."""
        try:
            asked = body.guided_decoding()
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0]) from e
        if asked is not None and tools is not None:
            raise APIError(400, f"{asked[1]} cannot constrain the output while {tools[1]} does",
                           param=asked[1].split(".")[0])  # fmt: skip
        asked = asked or tools
        if asked is None:
            return None
        guided, param = asked
        try:
            check_guided(guided)
        except GuidedDecodingError as e:
            raise APIError(400, f"{param}: {e}", param=param) from e
        return guided

    def sampling(
        self, body: SamplingFields, max_tokens: int | None, prompt_len: int, logprobs: int | None,
        prompt_param: str, guided: GuidedDecoding | None = None,
    ) -> pdserve_pb2.SamplingParams:  # fmt: skip
        """The router's sampling for the body, its max_tokens checked against the context window
        and its values by the engine's rules; `prompt_param` names the prompt in errors."""
        limit, window = self.config.max_tokens_limit, self.config.max_model_len
        room = window - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context window is {window}",
                           param=prompt_param)  # fmt: skip
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}; the server allows at most {limit}",
                           param="max_tokens")  # fmt: skip
        if max_tokens is not None and prompt_len + max_tokens > window:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                f"window of {window}", param="max_tokens")  # fmt: skip
        wanted = max_tokens if max_tokens is not None else self.config.default_max_tokens
        try:
            return body.to_sampling_proto(min(wanted, room), logprobs, guided)
        except SamplingParamsError as e:
            raise APIError(400, str(e), param=e.field) from e

    async def generate(self, gen: Generation, index: int) -> AsyncIterator[pdserve_pb2.GenerateChunk]:
        """The router's chunks for choice `index`; its gRPC errors become `APIError`s."""
        prompt, sampling = gen.choices[index]
        request_id = gen.choice_request_id(index)
        stream = self.router.client().generate(
            request_id,
            prompt,
            sampling,
            self.config.request_timeout_s,
            gen.choice_group(index),
        )
        try:
            async for chunk in stream:
                yield chunk
        except grpc.aio.AioRpcError as e:
            if e.code() in HTTP_OF_GRPC:  # the router's own message for callers
                status, kind = HTTP_OF_GRPC[e.code()]
                raise APIError(status, e.details() or e.code().name, kind) from e
            # Anything else (UNKNOWN carries a Python exception's class and text): the log keeps it.
            log.error("request %s: the router answered %s: %s", request_id, e.code().name, e.details())
            message = f"request {request_id} failed inside the server; it is logged under that id"
            raise APIError(500, message, "internal_error") from e
        finally:
            if hasattr(stream, "aclose"):  # an in-process call (router.local_call): end it now, as
                await stream.aclose()  # a gRPC call ends when it is dropped

    async def choice_chunks(self, gen: Generation) -> AsyncIterator[tuple[int, pdserve_pb2.GenerateChunk]]:
        """(choice index, chunk) as they come, every choice running at once (the n choices of a
        prompt share its prefill, see `Generation.choice_group`). The first error ends them all;
        closing the iterator cancels the choices still running (and so their requests)."""
        if len(gen.choices) == 1:
            async for chunk in self.generate(gen, 0):
                yield 0, chunk
            return
        arrivals: asyncio.Queue[tuple[int, pdserve_pb2.GenerateChunk | Exception | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for chunk in self.generate(gen, index):
                    arrivals.put_nowait((index, chunk))
                arrivals.put_nowait((index, None))
            except Exception as e:  # APIError: reported by the reader, which stops the others
                arrivals.put_nowait((index, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(gen.choices))]
        try:
            running = len(tasks)
            while running:
                index, item = await arrivals.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    running -= 1
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def timed_chunks(self, gen: Generation) -> AsyncIterator[tuple[int, pdserve_pb2.GenerateChunk]]:
        """`choice_chunks` of a stream, its time to the first chunk observed."""
        first = True
        async with aclosing(self.choice_chunks(gen)) as chunks:
            async for i, chunk in chunks:
                if first:
                    self.metrics.first_token.observe(time.perf_counter() - gen.start)
                    first = False
                yield i, chunk

    def logprobs(self, chunk: pdserve_pb2.GenerateChunk | None) -> Any:
        """The choice's `logprobs` for the tokens of `chunk` (None without any)."""
        if chunk is None or not chunk.logprobs:
            return None
        decode = self.tokenizer.decode
        items = []
        for lp in chunk.logprobs:
            text = decode([lp.token_id])
            top = [{"token": decode([t.token_id]), "logprob": finite_logprob(t.logprob)} for t in lp.top]
            items.append(
                {"token": text, "logprob": finite_logprob(lp.logprob), "top_logprobs": top,
                 "bytes": list(text.encode())}
            )  # fmt: skip
        return self.format_logprobs(items)

    def format_logprobs(self, items: list[dict[str, Any]]) -> Any:
        """The endpoint's `logprobs` object from one item per token (each item in chat's shape)."""
        raise NotImplementedError

    def choice(
        self, gen: Generation, index: int, text: str, reasoning: str, finish: str | None,
        chunk: pdserve_pb2.GenerateChunk | None, delta: bool, tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """One entry of "choices": a streamed increment (`delta`) or a whole answer (`tool_calls`:
        the calls read from it, or their deltas)."""
        raise NotImplementedError

    def choice_start(self, gen: Generation, index: int) -> dict[str, Any] | None:
        """A streamed event that opens choice `index` before its tokens (none by default)."""
        return None

    def event(self, gen: Generation, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """One streamed event."""
        return {"id": self.response_id(gen), "object": self.chunk_kind, "created": gen.created,
                "model": self.config.model_name, "choices": choices, **extra}  # fmt: skip

    def response_id(self, gen: Generation) -> str:
        """The response's "id" (every event of a stream shares it)."""
        return f"{self.id_prefix}-{gen.request_id}"

    async def respond(self, gen: Generation) -> StreamingResponse | JSONResponse:
        """The answer to `gen`: server-sent events if the body asked to stream, else one JSON body."""
        if gen.body.stream:
            chunks = await StartedChunks.start(self.timed_chunks(gen))
            return self.event_stream(gen, self.stream_generator(gen, chunks), chunks)
        return await self.full_generator(gen)

    @staticmethod
    def event_stream(
        gen: Generation, events: AsyncIterator[bytes], chunks: StartedChunks
    ) -> StreamingResponse:
        """`events` as server-sent events; `chunks` (what they are made of) is closed when the
        response ends, even one that never began (its client left first)."""
        return StreamingResponse(events, media_type="text/event-stream", headers={"X-Request-Id": gen.request_id},
                                 background=BackgroundTask(chunks.aclose))  # fmt: skip

    async def stream_generator(self, gen: Generation, chunks: StartedChunks) -> AsyncIterator[bytes]:
        """Server-sent events of `chunks` (`timed_chunks` of `gen`, started): every choice's opening,
        then the choices' increments as they come (the choices run at once), usage if asked for, `[DONE]`.

        The status line is already sent, so an error is the stream's last event (and the stream
        counts its own outcome: the middleware only sees the 200).
        """
        totals, cached, from_redis = [0] * len(gen.choices), 0, 0
        splitters = [ReasoningSplitter(bool(gen.in_reasoning)) for _ in gen.choices]
        tools = [ToolCallStream(gen.tool_reader) for _ in gen.choices] if gen.tool_reader else None
        try:
            for i in range(len(gen.choices)):
                opening = self.choice_start(gen, i)
                if opening is not None:
                    yield sse(opening)
            async with aclosing(chunks):
                async for i, chunk in chunks:
                    totals[i] += len(chunk.token_ids)
                    if chunk.finished:
                        cached = max(cached, chunk.usage.cached_tokens)
                        from_redis = max(from_redis, chunk.usage.context_cached_tokens)
                    reasoning, text = gen.split(chunk.text, splitters[i], final=chunk.finished)
                    calls = None
                    if tools is not None:
                        text, calls = tools[i].feed(text, chunk.finished)
                    finish = chunk.finish_reason or None if chunk.finished else None
                    finish = gen.finish_reason(finish, tools is not None and bool(tools[i].ids))
                    if text or reasoning or finish or chunk.logprobs or calls:
                        choice = self.choice(gen, i, text, reasoning, finish, chunk, True, calls)
                        yield sse(self.event(gen, [choice]))
            body = gen.body
            if body.stream_options and body.stream_options.include_usage:
                yield sse(
                    self.event(gen, [], usage=usage(gen.prompt_tokens, sum(totals), cached, from_redis))
                )
            yield b"data: [DONE]\n\n"
            self.metrics.requests.labels(self.endpoint, "200").inc()
        except APIError as e:
            yield sse(e.body())
            self.metrics.requests.labels(self.endpoint, str(e.status)).inc()
        finally:
            self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - gen.start)

    async def collect(self, gen: Generation) -> Collected:
        """Every choice of `gen` whole: its text, logprobs and finish reason, and the usage."""
        n = len(gen.choices)
        out = Collected([[] for _ in range(n)], [[] for _ in range(n)], [None] * n)
        async with aclosing(self.choice_chunks(gen)) as chunks:
            async for i, chunk in chunks:
                out.texts[i].append(chunk.text)
                out.logprobs[i].extend(chunk.logprobs)
                out.tokens += len(chunk.token_ids)
                if chunk.finished:
                    out.finish[i] = chunk.finish_reason
                    out.cached = max(out.cached, chunk.usage.cached_tokens)
                    out.from_redis = max(out.from_redis, chunk.usage.context_cached_tokens)
        return out

    async def full_generator(self, gen: Generation) -> JSONResponse:
        """One JSON body with every choice whole."""
        got = await self.collect(gen)
        choices = []
        for i in range(len(gen.choices)):
            reasoning, content = gen.split(got.text(i), ReasoningSplitter(bool(gen.in_reasoning)), True)
            merged = pdserve_pb2.GenerateChunk(logprobs=got.logprobs[i]) if got.logprobs[i] else None
            calls = None
            if gen.tool_reader is not None:
                content, calls = full_tool_calls(gen.tool_reader, content)
            if gen.echo is not None:
                content = gen.echo[i] + content
            reason = gen.finish_reason(got.finish[i], bool(calls))
            choices.append(self.choice(gen, i, content, reasoning, reason, merged, False, calls))
        self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - gen.start)
        return JSONResponse(
            {"id": self.response_id(gen), "object": self.object_kind, "created": gen.created,
             "model": self.config.model_name, "choices": choices,
             "usage": usage(gen.prompt_tokens, got.tokens, got.cached, got.from_redis)},
            headers={"X-Request-Id": gen.request_id},
        )  # fmt: skip


class OpenAIServingCompletion(OpenAIServing):
    """POST /v1/completions."""

    endpoint = "completions"
    object_kind = chunk_kind = "text_completion"
    id_prefix = "cmpl"

    async def create_completion(self, body: CompletionRequest, request_id: str):
        """The response to a validated completions body.

        A batch of prompts is answered as OpenAI does: choice `k * n + i` is prompt k's i-th.
        """
        self.check_model(body)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported: prompt logprobs are not computed; "
                                "drop one of them", param="echo")  # fmt: skip
        guided = self.guided(body)
        choices, prompt_tokens, echo = [], 0, []
        for k, text_or_ids in enumerate(body.prompts()):
            param = f"prompt.{k}" if body.is_batch else "prompt"
            prompt = (
                text_or_ids
                if isinstance(text_or_ids, list)
                else await self.prompts.encode(text_or_ids, param)
            )
            if not prompt:
                raise APIError(400, f"{param} is empty", param=param)
            sampling = self.sampling(body, body.max_tokens, len(prompt), body.logprobs, param, guided)
            choices += [(prompt, p) for p in choice_samplings(sampling, body.n)]
            prompt_tokens += len(prompt)
            if body.echo:
                text = text_or_ids if isinstance(text_or_ids, str) else self.tokenizer.decode(text_or_ids)
                echo += [text] * body.n
        log.info("request %s: completion, %d prompt tokens", request_id, prompt_tokens)
        gen = Generation(request_id, body, prompt_tokens, choices, echo=echo if body.echo else None)
        return await self.respond(gen)

    def format_logprobs(self, items: list[dict[str, Any]]) -> Any:
        return {"tokens": [i["token"] for i in items], "token_logprobs": [i["logprob"] for i in items],
                "top_logprobs": [{t["token"]: t["logprob"] for t in i["top_logprobs"]} for i in items]}  # fmt: skip

    def choice(self, gen, index, text, reasoning, finish, chunk, delta, tool_calls=None):
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": self.logprobs(chunk)}

    def choice_start(self, gen: Generation, index: int) -> dict[str, Any] | None:
        """With echo, the choice's prompt text before its completion."""
        if gen.echo is None:
            return None
        return self.event(
            gen, [{"index": index, "text": gen.echo[index], "finish_reason": None, "logprobs": None}]
        )


class OpenAIServingChat(OpenAIServing):
    """POST /v1/chat/completions, with ERNIE's thinking section split into `reasoning_content`."""

    endpoint = "chat"
    object_kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    async def create_chat_completion(self, body: ChatCompletionRequest, request_id: str):
        """The response to a validated chat body."""
        return await self.respond(await self.chat_generation(body, request_id))

    async def chat_generation(self, body: ChatCompletionRequest, request_id: str) -> Generation:
        """The work of a validated chat body: its messages through the chat template, its sampling
        checked (also the path of /v1/responses, which says its input as chat messages)."""
        self.check_model(body)
        reader, tool_guided = self.tool_calls(body)
        guided = self.guided(body, tool_guided)
        thinking = body.enable_thinking()
        text = await self.render(body, thinking)
        # The template adds text around each message: many short messages can make a long prompt.
        prompt = await self.prompts.encode(
            text, "messages", False, "the prompt the chat template made of messages"
        )
        log.info("request %s: chat, %d prompt tokens", request_id, len(prompt))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = self.sampling(body, max_tokens, len(prompt), logprobs, "messages", guided)
        # Reasoning is split out when thinking was asked for, or the template opened the section.
        in_reasoning = text.rstrip().endswith(THINK_START)
        split = in_reasoning if thinking is None else (thinking or in_reasoning)
        choices = [(prompt, p) for p in choice_samplings(sampling, body.n)]
        return Generation(request_id, body, len(prompt), choices, in_reasoning if split else None, reader)

    def tool_calls(
        self, body: ChatCompletionRequest
    ) -> tuple[ToolCallReader | None, tuple[GuidedDecoding, str] | None]:
        """How the answer's tool calls are read, and the grammar that forces them (when
        `tool_choice` is "required" or names a function); (None, None) without tools."""
        choice, tools = body.tool_choice, [t.function for t in body.tools or []]
        names = [f.name for f in tools]
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not among "
                                    f"the tools {names}", param="tool_choice")  # fmt: skip
            function = tools[names.index(choice.function.name)]
            schema = json.dumps(function.parameters or {"type": "object"})
            guided = (
                GuidedDecoding("json_schema", schema),
                f"tool_choice (the parameters of {function.name!r})",
            )
            return ToolCallReader("named", function.name), guided
        if choice == "required":
            if not tools:
                raise APIError(
                    400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice"
                )
            defs = [f.model_dump(exclude_none=True) for f in tools]
            schema = json.dumps(required_schema(defs, body.parallel_tool_calls))
            return ToolCallReader("required"), (GuidedDecoding("json_schema", schema), "tools")
        if not tools or choice == "none":
            return None, None
        return ToolCallReader("auto"), None

    async def render(self, body: ChatCompletionRequest, thinking: bool | None) -> str:
        """The prompt text: the messages through the model's chat template."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, f"model {self.config.model_name!r} has no chat template; use /v1/completions")
        for i, message in enumerate(body.messages):
            if unusable := message.unusable_part():
                where, what = unusable
                raise APIError(400, f"messages.{i}.{where}: {what} cannot be used; this model reads text only",
                               param=f"messages.{i}.{where}")  # fmt: skip
            # A template that does not write tool calls would drop them from the prompt unseen.
            if message.tool_calls and "tool_calls" not in self.tokenizer.chat_template:
                raise APIError(400, f"messages.{i}.tool_calls: tool calls cannot be used; this model's chat "
                                    "template does not render them", param=f"messages.{i}.tool_calls")  # fmt: skip
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        kwargs.update({k: v for k, v in (body.chat_template_kwargs or {}).items() if k != "enable_thinking"})
        messages = [m.for_template() for m in body.messages]
        # tool_choice "none" keeps the tools out of the prompt: the model is not to call any.
        tools = (
            [t.model_dump(exclude_none=True) for t in body.tools or []] if body.tool_choice != "none" else []
        )
        return await self.prompts.render_chat(messages, kwargs, tools or None)

    def format_logprobs(self, items: list[dict[str, Any]]) -> Any:
        return {"content": items}

    def choice(self, gen, index, text, reasoning, finish, chunk, delta, tool_calls=None):
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if gen.in_reasoning is not None:
            msg["reasoning_content"] = reasoning or None
        if tool_calls:
            msg["tool_calls"] = tool_calls
            msg["content"] = text or None
        if delta:
            msg = {k: v for k, v in msg.items() if v}
        return {"index": index, ("delta" if delta else "message"): msg, "finish_reason": finish,
                "logprobs": self.logprobs(chunk)}  # fmt: skip

    def choice_start(self, gen: Generation, index: int) -> dict[str, Any] | None:
        """The assistant role, before the choice's first tokens."""
        opening = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return self.event(gen, [opening])
