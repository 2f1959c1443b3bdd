"""What the gateway serves and its limits."""

from __future__ import annotations

from dataclasses import dataclass


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
