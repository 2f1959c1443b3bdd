"""`DraftModelProposer`: a small model with the target's vocabulary guesses the next k tokens.

The draft runs in its own `Engine` (weights, paged KV pool with prefix caching, runner), driven
here step by step rather than through its scheduler. Each request has a shadow sequence in that
engine: before guessing, the shadow is synced with the target's tokens (its KV stays valid up to
the first token that differs, so rejected guesses roll back by a counter), then one pass catches
the draft's cache up (the whole prompt the first time, on a decode worker after a KV import
too) and yields the first guess, and k - 1 single-token passes yield the rest.
"""

from __future__ import annotations

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftModelProposer:
    """Greedy guesses from a draft `Engine` (built by the caller, never stepped on its own)."""

    def __init__(self, draft) -> None:  # draft: pdserve.engine.Engine (a cycle to import here)
        self.draft = draft
        self._shadows: dict[str, Request] = {}

    def _sync(self, req: Request, k: int) -> Request | None:
        """The request's shadow, holding the target's tokens and blocks for k more; None if no room."""
        kv = self.draft.kv
        shadow = self._shadows.get(req.request_id)
        if shadow is None:
            shadow = Request(req.request_id, list(req.prompt_token_ids), SamplingParams(), 0, arrival=-1)
            self._shadows[req.request_id] = shadow
        valid = min(shadow.num_computed_tokens, _common_prefix(shadow.all_token_ids, req.all_token_ids))
        shadow.all_token_ids = list(req.all_token_ids)
        shadow.num_computed_tokens = min(valid, len(shadow.all_token_ids) - 1)
        if not shadow.block_ids:
            cached = kv.find_cached_prefix(shadow)
            shadow.num_computed_tokens = len(cached) * kv.block_size
            if not kv.allocate(shadow, shadow.num_tokens + k - 1, cached):
                self.forget(req.request_id)
                return None
        elif not kv.allocate(shadow, shadow.num_tokens + k - 1):
            self.forget(req.request_id)
            return None
        return shadow

    @torch.inference_mode()
    def propose(self, requests: list[Request], ks: list[int]) -> None:
        shadows: list[Request] = []
        wanted: list[int] = []
        for req, k in zip(requests, ks):
            if req.num_tokens + k > self.draft.max_model_len:
                continue
            shadow = self._sync(req, k)
            if shadow is not None:
                shadows.append(shadow)
                wanted.append(k)
        guesses: dict[str, list[int]] = {s.request_id: [] for s in shadows}
        # Pass 1 catches each shadow up to its last token; later passes feed one guess each.
        batch = ScheduledBatch(shadows, [s.num_tokens - s.num_computed_tokens for s in shadows])
        step = 0
        while batch.requests:
            out = self.draft.runner.execute(batch, [1] * len(batch), run_mtp=False)
            tokens = out.logits.argmax(dim=-1).tolist()
            next_batch = ScheduledBatch()
            for shadow, n, token, k in zip(batch.requests, batch.num_tokens, tokens, wanted):
                shadow.num_computed_tokens += n
                if step == 0:
                    # Only real tokens so far: their full blocks may enter the draft's prefix cache.
                    self.draft.kv.cache_computed_blocks(shadow)
                shadow.all_token_ids.append(token)
                guesses[shadow.request_id].append(token)
                if len(guesses[shadow.request_id]) < k:
                    next_batch.requests.append(shadow)
                    next_batch.num_tokens.append(1)
            wanted = [k for s, k in zip(batch.requests, wanted) if len(guesses[s.request_id]) < k]
            batch = next_batch
            step += 1
        for req in requests:
            req.spec_token_ids = guesses.get(req.request_id, [])

    def forget(self, request_id: str) -> None:
        """Frees a finished request's shadow blocks."""
        shadow = self._shadows.pop(request_id, None)
        if shadow is not None:
            self.draft.kv.free(shadow)
