"""The gateway's HTTP server: uvicorn on httptools, with the gateway's connection timeouts and
header limits.

httptools (llhttp, in C) parses requests and uvicorn's httptools protocol frames responses
without h11's per-event Python objects: every streamed chunk crosses this layer, and on this
2-core machine h11 was ~5% of the serving process's samples (docs/DECISIONS.md, 2026-12-06).

uvicorn closes a connection only while it idles after a response (`timeout_keep_alive`), and any
byte received cancels even that: a connection that never sends, or sends its headers a byte at a
time, was held for ever. `HeaderLimitsProtocol` adds a deadline on each request's headers, and
the header size limit that uvicorn's httptools protocol lacks (h11 had one); the body's deadline
is `RequestBodyLimits`' (gateway/request_body.py).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pdserve.gateway.config import GatewayConfig

# What each header line adds to its name and value on the wire (": " and CRLF).
_HEADER_LINE_BYTES = 4


class HeaderTooLarge(ValueError):
    """A request's line and headers passed `max_header_bytes`: raised in a parser callback, which
    httptools turns into its parse error and uvicorn answers with a 400 (as h11's limit was)."""


class HeaderLimitsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers are not complete
    within `header_timeout_s` of the connection opening or of its previous response ending, and
    refusing (400, closed) a request whose line and headers pass `max_header_bytes`."""

    def __init__(self, *args: Any, header_timeout_s: float, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self._header_deadline: asyncio.TimerHandle | None = None
        self._in_head = True  # between requests or inside one's headers: bytes count as head
        self._head_bytes = 0  # bytes received while in the head (an upper bound on its size)
        self._head_size = 0  # the current request's line and headers as parsed (exact)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still no end of the headers: all of it was head (a header that never ends is caught
        # here, before the parser's buffer grows without bound).
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value) + _HEADER_LINE_BYTES)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_size = True, 0

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        # Armed only while no request runs, so this one starts now: its deadline is met.
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def on_response_complete(self) -> None:
        waiting = len(self.pipeline)
        self._arm()
        super().on_response_complete()
        if len(self.pipeline) < waiting:  # a pipelined request (headers complete) started
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _count(self, size: int) -> None:
        # The exact size, for headers that arrive whole in one read (data_received sees them
        # complete); raised through the parser, which uvicorn answers with a 400.
        self._head_size += size
        if self._head_size > self.max_header_bytes:
            raise HeaderTooLarge(f"request headers over {self.max_header_bytes} bytes")

    def _refuse(self) -> None:
        self.logger.warning("request headers over %d bytes; connection closed", self.max_header_bytes)
        self.send_400_response("Request headers too large.")

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
    protocol = functools.partial(
        HeaderLimitsProtocol,
        header_timeout_s=config.header_timeout_s,
        max_header_bytes=config.max_header_bytes,
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=protocol,  # type: ignore[arg-type]
        timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=drain_timeout_s,  # type: ignore[arg-type]
    )
