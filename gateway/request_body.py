"""Reading a request's body within the gateway's limits: at most `max_body_bytes`, within `body_timeout_s`.

An ASGI middleware reads the whole body before the app sees it, counting the bytes as they
arrive, so a chunked body (no Content-Length) is cut off at the limit just like a declared one,
and a client that sends its body slowly is cut off at the deadline. Either answer closes the
connection: the rest of that body is never read.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.gateway.errors import APIError


class BodyTooLarge(Exception):
    """More than the limit has arrived (or was declared)."""


class ClientLeft(Exception):
    """The client disconnected before its body was complete."""


class RequestBodyLimits:
    """ASGI middleware: the body read whole before the app runs, within a size and a time limit.

    Refusals are OpenAI-shaped: 413 past the size, 408 past the deadline, each with the request id
    the outer middleware put in the scope's state.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self.read(scope, receive)
        except BodyTooLarge as e:
            await self.refuse(APIError(413, str(e)), scope, receive, send)
            return
        except TimeoutError:
            message = f"the request body was not complete within {self.timeout_s:g} s (body_timeout_s)"
            await self.refuse(APIError(408, message, "timeout"), scope, receive, send)
            return
        except ClientLeft:
            return  # nobody to answer
        await self.app(scope, replay(body, receive), send)

    async def read(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body; BodyTooLarge as soon as more than the limit is declared or has arrived."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise BodyTooLarge(f"request body is {int(declared)} bytes; the limit is {self.max_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise BodyTooLarge(f"request body is over {self.max_bytes} bytes, the limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        """Answers `error` and closes the connection (the unread rest of the body goes with it)."""
        response = error.response(scope.get("state", {}).get("request_id", ""))
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body read already, then the client's own messages
    (a disconnect, which a streaming response listens for)."""
    given = False

    async def receive_after_body() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_after_body
