"""Continuous batching: which requests compute how many tokens this step.

One rule covers prompt prefill, chunked prefill, decode, speculative verification and
recompute: a request is owed `num_tokens + len(spec_token_ids) - num_computed_tokens` tokens.
Running requests are served first (in arrival order), then waiting ones (first come, first
served) while the step's token budget, the sequence limit and the KV pool allow. When a running
request cannot get a block, the most recently arrived running request is preempted: its blocks
are freed and it recomputes later (cheaply, since its full blocks usually stay in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """This step's work: `num_tokens[i]` new tokens for `requests[i]`."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    """Owns the waiting queue and the running set; decides each step's batch."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Adds a request whose blocks are already allocated and filled (a KV import)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def remove(self, request: Request) -> None:
        """Takes a request out of the queues (finished or aborted); its blocks are the caller's."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_scheduled_tokens - req.num_computed_tokens, budget)
            # Guesses that do not fit in the budget are dropped, never half-verified.
            del req.spec_token_ids[max(0, req.num_computed_tokens + n - req.num_tokens) :]
            while not self.kv.allocate(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # `req` preempted itself: nothing after it can run either
        # Admitting new work in a step that had to preempt would just thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cached = self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            start = len(cached) * self.kv.block_size if cached else req.num_computed_tokens
            n = min(req.num_tokens - start, budget)
            if not self.kv.allocate(req, start + n, cached):
                break
            self.waiting.popleft()
            req.num_computed_tokens = start
            if not req.scheduled_once:
                req.num_cached_tokens = start
                req.scheduled_once = True
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.mtp_hidden = None
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
