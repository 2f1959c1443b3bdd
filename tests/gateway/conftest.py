"""One serving stack for all the gateway suites: starting Ray workers costs more than the tests."""

from __future__ import annotations

import pytest

from pdserve.engine import LLM
from tests.gateway.stack import BLOCK_SIZE, gateway_stack


@pytest.fixture(scope="package")
def stack(ray_session, moe_checkpoint):
    """1 prefill + 1 decode worker, the router, the gateway (20 kB body limit, no API key)."""
    with gateway_stack(
        ray_session, moe_checkpoint, name="pdserve-controller-gw-test", max_body_bytes=20_000
    ) as s:
        yield s


@pytest.fixture(scope="package")
def reference(moe_checkpoint):
    """The offline engine on the same checkpoint: what the stack's greedy outputs must equal."""
    return LLM(str(moe_checkpoint), dtype="float32", block_size=BLOCK_SIZE, progress=False)
