"""What the gateway serves and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GatewayConfig:
    """What the gateway serves and its limits (the same names as `pdserve up` settings)."""

    router_address: str
    model_name: str  # the id clients send as "model"
    tokenizer_path: str
    max_model_len: int
    # The cluster's key: HTTP clients must send it, and the gateway presents it to the router.
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)  # /admin routes; off without it
    max_body_bytes: int = 4 * 1024 * 1024  # counted as the body is read, whatever its transfer encoding
    max_tokens_limit: int = 32768
    default_max_tokens: int = 256
    request_timeout_s: float = 600.0
    metrics_timeout_s: float = 3.0  # the router asks every worker (2 s each, in parallel) for /metrics
    # How long the workers' merged metrics are reused: scrapes within it (and concurrent ones) share
    # one fan-out to every worker.
    metrics_cache_s: float = 1.0
    # Threads that render chat templates and tokenize long prompts, so the event loop (shared with
    # the router under `pdserve up`) never waits on them (short ones: `prompt_tokenizer.INLINE_CHARS`).
    tokenizer_threads: int = 2
    # A bound on the characters one token covers: a prompt longer than max_model_len times this
    # cannot fit the context window, and is refused before it is tokenized.
    max_chars_per_token: int = 32
    # Connection timeouts: idle between requests, until a request's headers are complete (from the
    # connection's start or the previous response), and until its body is complete (from its headers).
    keep_alive_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 16 * 1024  # a request line and headers (gateway/http_server.py enforces it)

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt text tokenized: longer cannot fit the context window."""
        return self.max_model_len * self.max_chars_per_token
