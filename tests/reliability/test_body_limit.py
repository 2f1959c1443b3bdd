"""Issue 26, item 1: the body limit counts the bytes actually read, whatever the transfer encoding.

A chunked body (no Content-Length) used to be read whole before any check: 100 MB froze every
endpoint for minutes. Now the reading stops at the limit with a 413, and the server serves others
meanwhile and after.
"""

from __future__ import annotations

import httpx

from tests.reliability.gateways import connect, gateway, read_until_closed, response_of

LIMIT = 64 * 1024
SMALL = {"prompt": "def f", "max_tokens": 2}


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_chunked_body_that_never_ends_gets_413_at_the_limit_and_others_are_served(stack):
    with gateway(stack, max_body_bytes=LIMIT) as url:
        sock = connect(url)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: big-upload\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = chunk(b" " * 16 * 1024)
        sock.sendall(piece * 2)  # half the limit: the upload is under way
        assert httpx.post(url + "/v1/completions", json=SMALL, timeout=60).status_code == 200
        sock.sendall(piece * 3)  # past the limit, and still no last chunk: only counting can stop it
        status, headers, body = response_of(read_until_closed(sock))
        sock.close()
        assert status == 413 and body["error"]["code"] == 413, body
        assert (
            f"the limit is {LIMIT}" in body["error"]["message"]
            or f"over {LIMIT} bytes" in body["error"]["message"]
        )
        assert headers["connection"] == "close" and headers["x-request-id"] == "big-upload"
        assert httpx.post(url + "/v1/completions", json=SMALL, timeout=60).status_code == 200


def test_httpx_streaming_100_mb_chunked_is_stopped_after_about_the_limit(stack):
    pieces = 0

    def body():
        nonlocal pieces
        for _ in range(100):  # 100 MB, made only as fast as the server takes it
            pieces += 1
            yield b" " * 2**20

    with gateway(stack, max_body_bytes=LIMIT) as url:
        r = httpx.post(url + "/v1/completions", content=body(), timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        # The server stopped reading at the limit: the client could not hand over more than the
        # sockets' buffers hold (a few MB), far from the 100 MB it had.
        assert pieces < 20, pieces
        assert httpx.post(url + "/v1/completions", json=SMALL, timeout=60).status_code == 200


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(stack):
    with gateway(stack, max_body_bytes=LIMIT) as url:
        sock = connect(url)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (100 * 2**20)
        )
        status, _, body = response_of(read_until_closed(sock))
        sock.close()
        assert (
            status == 413
            and body["error"]["message"] == f"request body is {100 * 2**20} bytes; the limit is {LIMIT}"
        )
