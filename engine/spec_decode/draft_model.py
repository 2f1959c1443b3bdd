"""`DraftModelProposer`: a small model with the target's vocabulary guesses the next k tokens.

The draft has its own weights, paged KV pool with prefix caching and runner (built as an
`Engine` of its own), driven here step by step rather than through a scheduler. Each request has a shadow sequence in that
engine: before guessing, the shadow takes the target's new tokens (its KV stays valid through
the guesses the target accepted, so rejected ones roll back by a counter), then one pass catches
the draft's cache up (the whole prompt the first time, on a decode worker after a KV import
too) and yields the first guess, and k - 1 single-token passes yield the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch


@dataclass(frozen=True)
class DraftModel:
    """What the proposer drives of the draft: its runner, its block manager, its context window."""

    runner: ModelRunner
    kv: KVCacheManager
    max_model_len: int


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftModelProposer:
    """Greedy guesses from a draft model (built by the caller, never stepped on its own)."""

    def __init__(self, draft: DraftModel) -> None:
        self.draft = draft
        self._shadows: dict[str, Request] = {}

    def _sync(self, req: Request, k: int) -> Request | None:
        """The request's shadow, holding the target's tokens and blocks for k more; None if no room."""
        kv = self.draft.kv
        shadow = self._shadows.get(req.request_id)
        if shadow is None:
            shadow = Request(req.request_id, list(req.prompt_token_ids), SamplingParams(), 0, arrival=-1)
            self._shadows[req.request_id] = shadow
        # The shadow's tokens are the target's as of the last sync; its KV also holds the guesses
        # fed since, valid as far as the target accepted them.
        synced = shadow.num_tokens
        accepted = _common_prefix(shadow.spec_token_ids, req.all_token_ids[synced:])
        shadow.spec_token_ids = []
        shadow.all_token_ids.extend(req.all_token_ids[synced:])
        valid = min(shadow.num_computed_tokens, synced + accepted)
        shadow.num_computed_tokens = min(valid, shadow.num_tokens - 1)
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
        # Pass 1 catches each shadow up to its last token; later passes feed one guess each (the
        # runner reads a shadow's guesses from its spec_token_ids, after its real tokens).
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
                shadow.spec_token_ids.append(token)
                if len(shadow.spec_token_ids) < k:
                    next_batch.requests.append(shadow)
                    next_batch.num_tokens.append(1)
            wanted = [k for s, k in zip(batch.requests, wanted) if len(s.spec_token_ids) < k]
            batch = next_batch
            step += 1
        for req in requests:
            shadow = self._shadows.get(req.request_id)
            req.spec_token_ids = list(shadow.spec_token_ids) if shadow in shadows else []

    def forget(self, request_id: str) -> None:
        """Frees a finished request's shadow blocks."""
        shadow = self._shadows.pop(request_id, None)
        if shadow is not None:
            self.draft.kv.free(shadow)
