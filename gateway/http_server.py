"""The gateway's HTTP server: uvicorn with the gateway's connection timeouts and header limit.

uvicorn closes a connection only while it idles after a response (`timeout_keep_alive`), and any
byte received cancels even that: a connection that never sends, or sends its headers a byte at a
time, was held for ever. `HeaderDeadlineProtocol` adds a deadline on each request's headers; the
body's deadline is `RequestBodyLimits`' (gateway/request_body.py).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pdserve.gateway.config import GatewayConfig


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    `header_timeout_s` of the connection opening or of its previous response ending."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete: its handling has started
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # first: a pipelined request may start (and disarm it) within the call below
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def server_config(
    app: Any, config: GatewayConfig, host: str, port: int, drain_timeout_s: float | None = None
) -> uvicorn.Config:
    """uvicorn's settings for serving the gateway `app` on host:port under `config`'s limits;
    when it is told to exit, responses in flight get `drain_timeout_s` (unset: as long as they
    take) before they are cut."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=functools.partial(HeaderDeadlineProtocol, header_timeout_s=config.header_timeout_s),  # type: ignore[arg-type]
        timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=config.max_header_bytes,
        timeout_graceful_shutdown=drain_timeout_s,  # type: ignore[arg-type]
    )
