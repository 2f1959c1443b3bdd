"""A real serving stack for tests: Ray workers, the gRPC router and the gateway under uvicorn."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from pdserve.cluster.controller import ControllerConfig, start_controller
from pdserve.engine import EngineConfig
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.gateway.app import GatewayConfig, create_app
from pdserve.gateway.http_server import server_config
from pdserve.router.config import RouterConfig
from tests.redis_server import spare_port
from tests.router.test_server import RouterThread

# ERNIE 4.5's turn layout (begin-of-sentence, "User: "/"Assistant: ", thinking switch), small.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: {{ m.content }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: "
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
)
BLOCK_SIZE = 4


@dataclass
class GatewayStack:
    """A running stack: where the gateway listens and handles to look behind it."""

    url: str
    controller: Any  # the Controller actor
    tok: Any  # the gateway's tokenizer (with TEMPLATE as its chat template)
    ray: Any  # the ray module, initialised
    blocks: int  # KV blocks per worker
    router_metrics: CollectorRegistry  # the router's own registry (not on this gateway's /metrics)
    config: GatewayConfig  # the gateway's (its router_address reaches the stack's router)

    def worker_ids(self) -> list[str]:
        return [w.worker_id for w in self.ray.get(self.controller.workers.remote())]

    def wait_idle(self, timeout_s: float = 15.0) -> None:
        """Waits until no worker runs a request and every KV block is free again."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.ray.get(self.controller.workers.remote())
            loads = [self.ray.get(w.handle.load.remote()) for w in workers]
            if all(lo.kv_blocks_free == self.blocks and not lo.num_running for lo in loads):
                return
            assert time.monotonic() < deadline, loads
            time.sleep(0.1)


@contextmanager
def served(app: Any, config: GatewayConfig | None = None) -> Iterator[str]:
    """Serves `app` under uvicorn on a free loopback port, with the connection limits of `config`
    (`GatewayConfig`'s defaults when None) as `pdserve up` does; yields its base URL."""
    port = spare_port()
    limits = config or GatewayConfig(router_address="", model_name="", tokenizer_path="", max_model_len=1)
    server = uvicorn.Server(server_config(app, limits, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the gateway did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


@contextmanager
def gateway_stack(
    ray, checkpoint: Path | str, *, name: str, blocks: int = 128, prefill: int = 1, decode: int = 1,
    both: int = 0, template: str | None = TEMPLATE, engine_args: dict[str, Any] | None = None,
    **gateway: Any,
) -> Iterator[GatewayStack]:  # fmt: skip
    """Starts workers on `checkpoint`, a router and a gateway (model id "tiny"); stops them after.

    `template`: the gateway's chat template (None: the model's own). `engine_args`: more
    `EngineConfig` fields for every worker. `gateway`: `GatewayConfig` fields to change
    (max_model_len defaults to the engines' own, as under `pdserve up`).
    """
    engine = EngineConfig(
        model=str(checkpoint), dtype="float32", block_size=BLOCK_SIZE, num_threads=1, progress=False,
        kv_cache_blocks=blocks, **(engine_args or {}),
    )  # fmt: skip
    controller = start_controller(
        ControllerConfig(engine, prefill=prefill, decode=decode, both=both), name=name
    )
    router = None
    try:
        ray.get(controller.start.remote())
        limits = ray.get(controller.served_model.remote())
        # Every prompt through the prefill worker: the tests measure that path (prefix hits,
        # prefill groups); conditional disaggregation has its own tests (tests/router/test_server.py).
        router = RouterThread(controller, RouterConfig(port=0, local_prefill_tokens=0))
        tok = load_tokenizer(limits.tokenizer_path)
        if template is not None:
            tok.chat_template = template
        config = GatewayConfig(
            **{"router_address": f"127.0.0.1:{router.router.port}", "model_name": "tiny",
               "tokenizer_path": limits.tokenizer_path, "max_model_len": limits.max_model_len, **gateway}
        )  # fmt: skip
        with served(create_app(config, tokenizer=tok), config) as url:
            yield GatewayStack(
                url, controller, tok, ray, blocks, router.router.service.metrics.registry, config
            )
    finally:
        if router is not None:
            router.stop()
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
