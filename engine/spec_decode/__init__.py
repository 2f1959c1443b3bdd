"""Speculative decoding: proposers that guess tokens, and the lossless check of their guesses."""

from __future__ import annotations

from typing import Protocol

from pdserve.engine.request import Request
from pdserve.engine.spec_decode.config import SpeculativeConfig


class Proposer(Protocol):
    """Guesses up to `ks[i]` next tokens for `requests[i]`, into `request.spec_token_ids`."""

    def propose(self, requests: list[Request], ks: list[int]) -> None: ...

    def forget(self, request_id: str) -> None:
        """Drops whatever the proposer keeps for a request that has finished or was aborted."""


__all__ = ["Proposer", "SpeculativeConfig"]
