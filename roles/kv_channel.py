"""Who a KV transfer runs between: worker endpoints, channels and per-request tags.

Plain data without torch: the router and the controller hand these to workers, which move the
KV itself (see `kv_transfer`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


class TransferError(RuntimeError):
    """A KV transfer failed or timed out; both ends drop the channel's communicator."""


@dataclass(frozen=True)
class Endpoint:
    """How to reach a worker's transfer side: its id and the TCPStore it hosts for rendezvous."""

    worker_id: str
    host: str
    store_port: int


@dataclass(frozen=True)
class Channel:
    """One direction between two workers; a new `generation` after a failure means a new communicator."""

    sender: Endpoint
    receiver: Endpoint
    generation: int = 0

    @property
    def name(self) -> str:
        return f"kv:{self.sender.worker_id}->{self.receiver.worker_id}#{self.generation}"


def transfer_tag(request_id: str) -> int:
    """The tag both ends use for a request's transfer: request ids are unique cluster-wide."""
    return zlib.crc32(request_id.encode()) & 0x7FFFFFFF
