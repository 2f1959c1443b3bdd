"""The OpenAI-compatible FastAPI app: the app factory, its middleware and its routes.

Stateless: it tokenizes (chat template included) in its own thread pool, calls the router's
`Generate` over gRPC, and turns the token stream into OpenAI responses or server-sent events
(gateway/serving.py). A client that hangs up mid-stream cancels the gRPC call, which aborts the
request on its workers.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.gateway.admin import add_admin_routes
from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.dashboard import add_dashboard_routes
from pdserve.gateway.errors import APIError
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.metrics_cache import SharedFetch
from pdserve.gateway.prompt_tokenizer import PromptTokenizer
from pdserve.gateway.protocol import (
    LONE_SURROGATE,
    PROMPT_KINDS,
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
)
from pdserve.gateway.request_body import RequestBodyLimits
from pdserve.gateway.router_client import RouterClient, RouterConnection
from pdserve.gateway.serving import OpenAIServingChat, OpenAIServingCompletion
from pdserve.gateway.serving_responses import OpenAIServingResponses
from pdserve.proto.bearer import matches

__all__ = ["APIError", "GatewayConfig", "create_app"]

log = logging.getLogger("pdserve.gateway")

# The `endpoint` label of the request counter: a route's name, "other" for any unknown path (so
# that a scan of random paths cannot grow the label set).
ENDPOINT_OF_PATH = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/responses": "responses",
    "/v1/models": "models",
    "/health": "health",
    "/metrics": "metrics",
}


def endpoint_of(path: str) -> str:
    """The request counter's `endpoint` label for `path`."""
    if path.startswith("/admin/"):
        return "admin"
    if path == "/dashboard" or path.startswith("/dashboard/"):
        return "dashboard"
    return "models" if path.startswith("/v1/models/") else ENDPOINT_OF_PATH.get(path, "other")


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

    pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="pdserve-tokenizer")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, lifespan=lifespan)
    connection = RouterConnection(config.router_address, config.api_key, router)
    tok = tokenizer or load_tokenizer(config.tokenizer_path)
    metrics = app.state.metrics = GatewayMetrics()
    prompts = PromptTokenizer(tok, pool, config, metrics)
    # Added first, so it runs inside the request checks: an unauthorized body is never read.
    app.add_middleware(RequestBodyLimits, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    add_request_checks(app, config, metrics)
    add_error_handlers(app)
    add_cluster_routes(app, config, connection, metrics, registries)
    add_admin_routes(app, config, connection)
    add_dashboard_routes(app, config, connection)
    add_generation_routes(
        app,
        OpenAIServingCompletion(config, connection, tok, metrics, prompts),
        OpenAIServingChat(config, connection, tok, metrics, prompts),
        OpenAIServingResponses(config, connection, tok, metrics, prompts),
    )
    return app


def add_request_checks(app: FastAPI, config: GatewayConfig, metrics: GatewayMetrics) -> None:
    """Middleware: a request id on every response, the API key, every response counted by status
    (a stream counts its own outcome: its status line is always 200), and an OpenAI-shaped 500
    for anything unforeseen (the log keeps its details under the request id)."""
    app.add_middleware(RequestChecks, config=config, metrics=metrics)


class RequestChecks:
    """`add_request_checks`'s middleware, plain ASGI: a streamed body's chunks go straight to the
    server (Starlette's `BaseHTTPMiddleware` passed each through one more task and memory stream,
    about 6% of the serving process's CPU under `bench serve`, docs/DECISIONS.md 2026-12-05)."""

    def __init__(self, app: ASGIApp, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    def unauthorized(self, path: str, headers: Headers) -> bool:
        if not self.config.api_key or not path.startswith("/v1/"):
            return False
        return not matches(headers.get("authorization", ""), self.config.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid  # what `request.state.request_id` reads
        endpoint = endpoint_of(scope["path"])
        if self.unauthorized(scope["path"], headers):
            self.metrics.requests.labels(endpoint, "401").inc()
            refusal = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "authentication_error")  # fmt: skip
            await refusal.response(rid)(scope, receive, send)
            return
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                response_headers = MutableHeaders(scope=message)
                response_headers["X-Request-Id"] = rid
                if not response_headers.get("content-type", "").startswith("text/event-stream"):
                    self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: %s %s failed", rid, scope["method"], scope["path"])
            if started:  # the status line is out: nothing left to answer with
                raise
            self.metrics.requests.labels(endpoint, "500").inc()
            message = f"the server could not answer request {rid}; it is logged under that id"
            await APIError(500, message, "internal_error").response(rid)(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Validation errors, unknown paths and methods, and `APIError`s as OpenAI-shaped bodies."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return validation_api_error(exc.errors()[0]).response(request.state.request_id)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            error = APIError(404, f"Invalid URL ({where}): no such endpoint")
        elif exc.status_code == 405:
            allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "")
            error = APIError(405, f"Method not allowed ({where}); this endpoint takes {allowed}")
        else:
            error = APIError(exc.status_code, str(exc.detail))
        response = error.response(request.state.request_id)
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response(request.state.request_id)


def validation_api_error(err: dict) -> APIError:
    """A 400 for pydantic's first complaint about the body, `param` naming the field."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and p not in PROMPT_KINDS]
    if err.get("type") == LONE_SURROGATE:  # found anywhere in the body: its path is in the context
        return APIError(400, err["msg"], param=err["ctx"]["param"])
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "cannot be parsed")
        at = f" (at character {loc[0]})" if loc else ""
        return APIError(400, f"the request body is not valid JSON: {reason}{at}")
    if not loc:  # the body as a whole: missing, or JSON that is not an object
        return APIError(400, f"the request body must be a JSON object ({err.get('msg')})")
    param = ".".join(loc)
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    return APIError(400, f"{param}: {err.get('msg')}", param=param)


def add_cluster_routes(
    app: FastAPI,
    config: GatewayConfig,
    router: RouterConnection,
    metrics: GatewayMetrics,
    registries: tuple[CollectorRegistry, ...],
) -> None:
    """/health, /metrics and /v1/models."""

    @app.get("/health")
    async def health(request: Request):
        try:
            state = await router.client().cluster_state()
        except grpc.RpcError as e:
            # gRPC's details name addresses and library internals: the log keeps them, not the answer.
            log.warning("request %s: the router is unavailable: %s", request.state.request_id, e.details())
            message = f"the router is unavailable to the gateway ({e.code().name})"
            raise APIError(503, message, "service_unavailable") from e
        alive = sum(w.alive for w in state.workers)
        return {"status": "ok" if alive else "no_workers", "workers": alive, "model": config.model_name}

    async def fetch_worker_metrics() -> str:
        workers = await router.client().worker_metrics(config.metrics_timeout_s)
        if workers.unreachable:
            return workers.text + f"# pdserve: no metrics from workers {', '.join(workers.unreachable)}\n"
        return workers.text

    worker_metrics = SharedFetch(fetch_worker_metrics, config.metrics_cache_s)

    @app.get("/metrics")
    async def prometheus():
        # The gateway's and router's own metrics are read fresh; only the workers' fan-out is shared.
        text = "".join(generate_latest(r).decode() for r in (metrics.registry, *registries))
        try:
            text += await worker_metrics.get()
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


def add_generation_routes(
    app: FastAPI,
    completion: OpenAIServingCompletion,
    chat: OpenAIServingChat,
    responses: OpenAIServingResponses,
) -> None:
    """/v1/completions, /v1/chat/completions and /v1/responses."""

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await completion.create_completion(body, request.state.request_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat.create_chat_completion(body, request.state.request_id)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request):
        return await responses.create_response(body, request.state.request_id)
