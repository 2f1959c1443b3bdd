"""The OpenAI-compatible FastAPI app.

Stateless: it tokenizes (chat template included), calls the router's `Generate` over gRPC,
and turns the token stream into OpenAI responses or server-sent events. A client that hangs up
mid-stream cancels the gRPC call, which aborts the request on its workers.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from pdserve.gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from pdserve.gateway.reasoning import THINK_START, ReasoningSplitter
from pdserve.gateway.router_client import HTTP_OF_GRPC, RouterClient
from pdserve.proto import pdserve_pb2

log = logging.getLogger("pdserve.gateway")


@dataclass
class GatewayConfig:
    """What the gateway serves and its limits (the same names as `pdserve up` flags)."""

    router_address: str
    model_name: str  # the id clients send as "model"
    tokenizer_path: str
    max_model_len: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 32768
    default_max_tokens: int = 256
    request_timeout_s: float = 600.0
    metrics_timeout_s: float = 3.0  # the router asks every worker (2 s each, in parallel) for /metrics


class APIError(Exception):
    """An error returned in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self, request_id: str) -> JSONResponse:
        body = {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }
        return JSONResponse(body, status_code=self.status, headers={"X-Request-Id": request_id})


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdserve_gateway_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "pdserve_gateway_request_seconds", "Time to the last byte", ["endpoint"], registry=r
        )
        self.first_token = Histogram("pdserve_gateway_ttft_seconds", "Time to the first token", registry=r)


def create_app(
    config: GatewayConfig,
    router: RouterClient | None = None,
    tokenizer=None,
    registries: tuple[CollectorRegistry, ...] = (),
) -> FastAPI:
    """The gateway app; `router`/`tokenizer` are built from `config` when not given.

    `registries`: more Prometheus registries to serve on /metrics (the router's, when it runs
    in the same process under `pdserve up`).
    """
    from pdserve.engine.tokenizer import load_tokenizer

    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    clients: list[RouterClient] = [router] if router else []

    def router_client() -> RouterClient:
        # Made on first use: a grpc.aio channel belongs to the event loop that creates it.
        if not clients:
            clients.append(RouterClient(config.router_address))
        return clients[0]

    tok = tokenizer or load_tokenizer(config.tokenizer_path)
    metrics = GatewayMetrics()
    app.state.metrics = metrics

    @app.middleware("http")
    async def request_id_auth_and_size(request: Request, call_next):
        rid = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        request.state.request_id = rid
        authorized = request.headers.get("authorization", "") == f"Bearer {config.api_key}"
        if config.api_key and request.url.path.startswith("/v1/") and not authorized:
            return APIError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error"
            ).response(rid)
        length = request.headers.get("content-length")
        if length and int(length) > config.max_body_bytes:
            return APIError(
                413, f"request body is {length} bytes; the limit is {config.max_body_bytes}"
            ).response(rid)
        response = await call_next(request)
        response.headers["X-Request-Id"] = rid
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        if err.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        return APIError(400, message, param=param).response(request.state.request_id)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response(request.state.request_id)

    @app.get("/health")
    async def health():
        try:
            state = await router_client().cluster_state()
        except grpc.RpcError as e:
            raise APIError(503, f"router unreachable at {config.router_address}: {e.details()}",
                           "service_unavailable") from e  # fmt: skip
        alive = sum(w.alive for w in state.workers)
        return {"status": "ok" if alive else "no_workers", "workers": alive, "model": config.model_name}

    @app.get("/metrics")
    async def prometheus():
        text = "".join(generate_latest(r).decode() for r in (metrics.registry, *registries))
        try:
            workers = await router_client().worker_metrics(config.metrics_timeout_s)
            text += workers.text
            if workers.unreachable:
                text += f"# pdserve: no metrics from workers {', '.join(workers.unreachable)}\n"
        except grpc.RpcError as e:
            # The gateway's own metrics matter most when the router is down: serve them regardless.
            router = f"router at {config.router_address}: {e.code().name}"
            text += f"# pdserve: worker metrics unavailable, {router}\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
             "max_model_len": config.max_model_len}
        ]}  # fmt: skip

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != config.model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {config.model_name!r}",
                           param="model")  # fmt: skip
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "pdserve"}

    def check_model(body: SamplingFields) -> None:
        if body.model not in (None, config.model_name):
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {config.model_name!r}",
                           param="model")  # fmt: skip

    def sampling(body: SamplingFields, max_tokens: int | None, prompt_len: int, logprobs: int | None):
        room = config.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context window is "
                                f"{config.max_model_len}", param="messages" if isinstance(body, ChatCompletionRequest) else "prompt")  # fmt: skip
        if max_tokens is not None and max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; the server allows at most {config.max_tokens_limit}",
                           param="max_tokens")  # fmt: skip
        wanted = max_tokens if max_tokens is not None else config.default_max_tokens
        if max_tokens is not None and prompt_len + max_tokens > config.max_model_len:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                f"window of {config.max_model_len}", param="max_tokens")  # fmt: skip
        p = pdserve_pb2.SamplingParams(
            max_tokens=min(wanted, room), min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
            stop=[body.stop] if isinstance(body.stop, str) else (body.stop or []),
            stop_token_ids=body.stop_token_ids or [],
        )  # fmt: skip
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):  # fmt: skip
            value = getattr(body, name)
            if value is not None:
                setattr(p, name, value)
        if logprobs is not None:
            p.logprobs = logprobs
        return p

    def choice_samplings(base: pdserve_pb2.SamplingParams, n: int) -> list[pdserve_pb2.SamplingParams]:
        # n choices = n requests; seeded ones get seed+i so they differ yet stay reproducible.
        out = []
        for i in range(n):
            p = pdserve_pb2.SamplingParams()
            p.CopyFrom(base)
            if base.HasField("seed"):
                p.seed = base.seed + i
            out.append(p)
        return out

    async def run(rid: str, prompt: list[int], p) -> AsyncIterator[pdserve_pb2.GenerateChunk]:
        try:
            async for chunk in router_client().generate(rid, prompt, p, config.request_timeout_s):
                yield chunk
        except grpc.aio.AioRpcError as e:
            status, kind = HTTP_OF_GRPC.get(e.code(), (500, "internal_error"))
            raise APIError(status, e.details() or str(e.code()), kind) from e

    def usage(prompt_tokens: int, completion: int, cached: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip

    def logprobs_of(chunk, chat: bool) -> Any:
        if not chunk.logprobs:
            return None
        items = []
        for lp in chunk.logprobs:
            text = tok.decode([lp.token_id])
            top = [{"token": tok.decode([t.token_id]), "logprob": t.logprob} for t in lp.top]
            items.append(
                {"token": text, "logprob": lp.logprob, "top_logprobs": top, "bytes": list(text.encode())}
            )
        if chat:
            return {"content": items}
        return {"tokens": [i["token"] for i in items], "token_logprobs": [i["logprob"] for i in items],
                "top_logprobs": [{t["token"]: t["logprob"] for t in i["top_logprobs"]} for i in items]}  # fmt: skip

    def sse(obj: Any) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    async def respond(request: Request, endpoint: str, body: SamplingFields, prompt: list[int],
                      p, chat: bool, in_reasoning: bool | None):  # fmt: skip
        rid = request.state.request_id
        created = int(time.time())
        obj_id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        samplings = choice_samplings(p, body.n)
        start = time.perf_counter()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        kind = "chat.completion" if chat else "text_completion"

        def choice(index: int, text: str, reasoning: str, finish: str | None, chunk, delta: bool):
            if chat:
                msg: dict[str, Any] = {"role": "assistant", "content": text}
                if in_reasoning is not None:
                    msg["reasoning_content"] = reasoning or None
                if delta:
                    msg = {k: v for k, v in msg.items() if v}
                out = {"index": index, ("delta" if delta else "message"): msg, "finish_reason": finish}
            else:
                out = {"index": index, "text": text, "finish_reason": finish}
            out["logprobs"] = logprobs_of(chunk, chat) if chunk is not None else None
            return out

        if body.stream:

            async def events():
                totals = [0] * body.n
                cached = 0
                try:
                    first = True
                    for i, sp in enumerate(samplings):
                        splitter = ReasoningSplitter(bool(in_reasoning))
                        if chat:
                            yield sse({"id": obj_id, "object": "chat.completion.chunk", "created": created,
                                       "model": config.model_name,
                                       "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None}]})  # fmt: skip
                        async for chunk in run(f"{rid}-{i}" if body.n > 1 else rid, prompt, sp):
                            if first:
                                metrics.first_token.observe(time.perf_counter() - start)
                                first = False
                            totals[i] += len(chunk.token_ids)
                            if chunk.finished:
                                cached = max(cached, chunk.usage.cached_tokens)
                            reasoning, text = (splitter.feed(chunk.text, final=chunk.finished)
                                               if in_reasoning is not None else ("", chunk.text))  # fmt: skip
                            finish = chunk.finish_reason or None if chunk.finished else None
                            if not (text or reasoning or finish or chunk.logprobs):
                                continue
                            yield sse({"id": obj_id, "object": f"{kind}.chunk" if chat else kind,
                                       "created": created, "model": config.model_name,
                                       "choices": [choice(i, text, reasoning, finish, chunk, True)]})  # fmt: skip
                    if include_usage:
                        yield sse({"id": obj_id, "object": f"{kind}.chunk" if chat else kind, "created": created,
                                   "model": config.model_name, "choices": [],
                                   "usage": usage(len(prompt), sum(totals), cached)})  # fmt: skip
                    yield b"data: [DONE]\n\n"
                    metrics.requests.labels(endpoint, "200").inc()
                except APIError as e:
                    yield sse(
                        {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}
                    )
                    metrics.requests.labels(endpoint, str(e.status)).inc()
                finally:
                    metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Request-Id": rid})

        choices, total, cached = [], 0, 0
        for i, sp in enumerate(samplings):
            texts, lps, finish = [], [], None
            async for chunk in run(f"{rid}-{i}" if body.n > 1 else rid, prompt, sp):
                texts.append(chunk.text)
                lps.extend(chunk.logprobs)
                total += len(chunk.token_ids)
                if chunk.finished:
                    finish = chunk.finish_reason
                    cached = max(cached, chunk.usage.cached_tokens)
            full = "".join(texts)
            reasoning, content = ("", full)
            if in_reasoning is not None:
                reasoning, content = ReasoningSplitter(bool(in_reasoning)).feed(full, final=True)
            merged = pdserve_pb2.GenerateChunk(logprobs=lps)
            choices.append(choice(i, content, reasoning, finish, merged if lps else None, False))
        metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return JSONResponse(
            {"id": obj_id, "object": kind, "created": created, "model": config.model_name,
             "choices": choices, "usage": usage(len(prompt), total, cached)},
            headers={"X-Request-Id": rid},
        )  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        prompt = body.prompt if isinstance(body.prompt, list) else tok(body.prompt)["input_ids"]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        log.info("request %s: completion, %d prompt tokens", request.state.request_id, len(prompt))
        p = sampling(body, body.max_tokens, len(prompt), body.logprobs)
        return await respond(request, "completions", body, prompt, p, chat=False, in_reasoning=None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body)
        if getattr(tok, "chat_template", None) is None:
            raise APIError(400, f"model {config.model_name!r} has no chat template; use /v1/completions")
        thinking = body.enable_thinking()
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        kwargs.update({k: v for k, v in (body.chat_template_kwargs or {}).items() if k != "enable_thinking"})
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as e:  # jinja errors: a message the template cannot render
            raise APIError(
                400, f"messages cannot be rendered by the chat template: {e}", param="messages"
            ) from e
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        log.info("request %s: chat, %d prompt tokens", request.state.request_id, len(prompt))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        p = sampling(body, body.max_completion_tokens or body.max_tokens, len(prompt), logprobs)
        # Reasoning is split out when thinking was asked for, or the template opened the section.
        in_reasoning = text.rstrip().endswith(THINK_START)
        split = in_reasoning if thinking is None else (thinking or in_reasoning)
        return await respond(request, "chat", body, prompt, p, chat=True,
                             in_reasoning=in_reasoning if split else None)  # fmt: skip

    return app
