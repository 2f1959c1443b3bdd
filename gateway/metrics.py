"""The gateway's own Prometheus metrics (the workers' come through the router)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    """Requests by endpoint and status, time to the last byte, time to the first token, and the
    prompts being rendered or tokenized (or waiting for a tokenizer thread)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdserve_gateway_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "pdserve_gateway_request_seconds", "Time to the last byte", ["endpoint"], registry=r
        )
        self.first_token = Histogram("pdserve_gateway_ttft_seconds", "Time to the first token", registry=r)
        self.prompts_in_tokenizer = Gauge(
            "pdserve_gateway_prompts_in_tokenizer",
            "Prompts being rendered or tokenized, or waiting for a tokenizer thread",
            registry=r,
        )
