"""`NgramProposer`: guesses by prompt lookup, copying what followed the last n tokens before."""

from __future__ import annotations

import numpy as np

from pdserve.engine.request import Request


class NgramProposer:
    """Finds the most recent earlier occurrence of the sequence's last n tokens (longest n first,
    from `max_n` down to `min_n`) and proposes the tokens that followed it. No model, no state:
    cheap, and strong wherever output repeats its context (code edits, quoting, retrieval)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: list[Request], ks: list[int]) -> None:
        for req, k in zip(requests, ks):
            req.spec_token_ids = self.lookup(req.all_token_ids, k)

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier match of the longest matching suffix."""
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            # Windows over all but the last token: each has at least one token after it.
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + k].tolist()
        return []

    def forget(self, request_id: str) -> None:
        """Nothing is kept per request."""
