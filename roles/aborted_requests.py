"""Request ids a worker was told to abort, remembered for calls about them that arrive later.

An abort races the calls of its request: the router may give up on a request while its
`reserve`, `prefill` or `decode` is still on the way to the worker, or half-way through it.
Each of those looks here at the moments where it would start holding something (blocks, an
outbox entry, a decode), so whichever arrives first, the request ends up holding nothing.
Request ids are unique cluster-wide (a retried attempt gets its own), so an old entry never
refuses a new request.
"""

from __future__ import annotations

from collections import OrderedDict

# A call racing its abort arrives within a transfer timeout; at thousands of cancels a second
# this many ids still cover minutes, in a few MB.
KEEP = 50_000


class AbortedRequests:
    """The last `keep` aborted request ids, oldest forgotten first."""

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        while len(self._ids) > self._keep:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids
