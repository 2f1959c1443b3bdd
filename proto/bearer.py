"""The cluster's one credential on the wire: `Authorization: Bearer KEY`.

HTTP clients send it to the gateway as a header, and the gateway (and `pdserve status`) send it to
the router as gRPC call metadata of the same name and form, so both ends check it here.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

# gRPC metadata keys are lower case; HTTP header names are case-insensitive.
AUTHORIZATION = "authorization"


def bearer(key: str) -> str:
    """The header or metadata value that presents `key`."""
    return f"Bearer {key}"


def call_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata a call to the router carries (none without a key)."""
    return () if key is None else ((AUTHORIZATION, bearer(key)),)


def presented(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The `authorization` value a call carries ("" without one)."""
    for name, value in metadata or ():
        if name == AUTHORIZATION:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return ""


def matches(credential: str, key: str) -> bool:
    """Whether `credential` (a header or metadata value) presents `key`.

    Constant time in the credential's content: a caller cannot find the key a character at a time
    by timing refusals.
    """
    return hmac.compare_digest(credential.encode("utf-8", "surrogatepass"), bearer(key).encode())
