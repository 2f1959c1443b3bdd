"""One serving stack for the gateway and router hardening suites (issue 26)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway.stack import GatewayStack, gateway_stack


@pytest.fixture(scope="package")
def stack(ray_session, moe_checkpoint) -> Iterator[GatewayStack]:
    """1 prefill + 1 decode worker (128 blocks of 4 tokens: a 512-token window), router, gateway."""
    with gateway_stack(ray_session, moe_checkpoint, name="pdserve-controller-reliability-test") as s:
        yield s
