"""The OpenAI-compatible FastAPI app: the app factory, its middleware and its routes.

Stateless: it tokenizes (chat template included), calls the router's `Generate` over gRPC,
and turns the token stream into OpenAI responses or server-sent events (gateway/serving.py).
A client that hangs up mid-stream cancels the gRPC call, which aborts the request on its workers.
"""

from __future__ import annotations

import uuid

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest

from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.errors import APIError
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.gateway.router_client import RouterClient, RouterConnection
from pdserve.gateway.serving import OpenAIServingChat, OpenAIServingCompletion

__all__ = ["APIError", "GatewayConfig", "create_app"]


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
    connection = RouterConnection(config.router_address, router)
    tok = tokenizer or load_tokenizer(config.tokenizer_path)
    metrics = app.state.metrics = GatewayMetrics()
    add_request_checks(app, config)
    add_error_handlers(app)
    add_cluster_routes(app, config, connection, metrics, registries)
    add_generation_routes(
        app,
        OpenAIServingCompletion(config, connection, tok, metrics),
        OpenAIServingChat(config, connection, tok, metrics),
    )
    return app


def add_request_checks(app: FastAPI, config: GatewayConfig) -> None:
    """Middleware: a request id on every response, the API key, the body size limit."""

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


def add_error_handlers(app: FastAPI) -> None:
    """Request validation errors and `APIError`s as OpenAI-shaped bodies."""

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


def add_cluster_routes(
    app: FastAPI,
    config: GatewayConfig,
    router: RouterConnection,
    metrics: GatewayMetrics,
    registries: tuple[CollectorRegistry, ...],
) -> None:
    """/health, /metrics and /v1/models."""

    @app.get("/health")
    async def health():
        try:
            state = await router.client().cluster_state()
        except grpc.RpcError as e:
            raise APIError(503, f"router unreachable at {config.router_address}: {e.details()}",
                           "service_unavailable") from e  # fmt: skip
        alive = sum(w.alive for w in state.workers)
        return {"status": "ok" if alive else "no_workers", "workers": alive, "model": config.model_name}

    @app.get("/metrics")
    async def prometheus():
        text = "".join(generate_latest(r).decode() for r in (metrics.registry, *registries))
        try:
            workers = await router.client().worker_metrics(config.metrics_timeout_s)
            text += workers.text
            if workers.unreachable:
                text += f"# pdserve: no metrics from workers {', '.join(workers.unreachable)}\n"
        except grpc.RpcError as e:
            # The gateway's own metrics matter most when the router is down: serve them regardless.
            text += (
                f"# pdserve: worker metrics unavailable, router at {config.router_address}: {e.code().name}\n"
            )
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


def add_generation_routes(app: FastAPI, completion: OpenAIServingCompletion, chat: OpenAIServingChat) -> None:
    """/v1/completions and /v1/chat/completions."""

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await completion.create_completion(body, request.state.request_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat.create_chat_completion(body, request.state.request_id)
