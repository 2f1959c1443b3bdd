"""More gateways over the reliability stack's router, and a raw HTTP/1.1 client for what httpx
will not send (a body that never ends, headers a byte at a time)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from pdserve.gateway.app import create_app
from tests.gateway.stack import GatewayStack, served


@contextmanager
def gateway(stack: GatewayStack, **changes: Any) -> Iterator[str]:
    """Serves one more gateway over `stack`'s router, its config changed by `changes`; yields its URL."""
    config = replace(stack.config, **changes)
    with served(create_app(config, tokenizer=stack.tok), config) as url:
        yield url


def connect(url: str, timeout_s: float = 20.0) -> socket.socket:
    """A TCP connection to the gateway at `url`; every receive gives up after `timeout_s`."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def response_of(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body) of one HTTP/1.1 response with a Content-Length."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    return int(lines[0].split()[1]), headers, json.loads(body[: int(headers["content-length"])])
