"""Continuous batching: which requests compute how many tokens this step.

One rule covers prompt prefill, chunked prefill, decode, speculative verification and
recompute: a request is owed `num_tokens + len(spec_token_ids) - num_computed_tokens` tokens.
Running requests are served first (in arrival order), then waiting ones (first come, first
served) while the step's token budget, the sequence limit and the KV pool allow. When a running
request cannot get a block, the most recently arrived running request is preempted: its blocks
are freed and it recomputes later (cheaply, since its full blocks usually stay in the prefix cache).

After the forward pass, `postprocess` ends the step: it appends each request's emitted tokens,
checks them for a stop, and finishes or parks the requests that are done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.stats import EngineCounters

# What sampling emitted for one request this step: its tokens and their logprobs (or Nones).
Emitted = tuple[list[int], list[Any]]


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
    """Owns the engine's requests (waiting, running, prefilled); decides each step's batch and
    applies its results.

    `max_model_len` and `eos_token_ids` end requests in `postprocess`; `counters` (the engine's)
    takes the step's token counts; `on_finish(request_id)` runs for each request that leaves.
    """

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        *,
        max_model_len: int | None = None,
        eos_token_ids: Collection[int] = (),
        counters: EngineCounters | None = None,
        on_finish: Callable[[str], None] | None = None,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.counters = counters if counters is not None else EngineCounters()
        self.on_finish = on_finish
        self.requests: dict[str, Request] = {}  # every request not yet finished, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        """Queues a new request behind the waiting ones."""
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Adds a request whose blocks are already allocated and filled (a KV import)."""
        self.requests[request.request_id] = request
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def remove(self, request: Request) -> None:
        """Takes a request out of the queues (finished, aborted or parked); its blocks are the caller's."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def finish(self, request: Request, reason: str | None = None) -> None:
        """Takes a request out of the engine: queues, blocks, and whatever `on_finish` keeps.

        `reason` ("abort") overrides the finish reason; without it the request keeps its own.
        """
        self.remove(request)
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        request.status = RequestStatus.FINISHED
        if reason is not None:
            request.finish_reason = reason
        if self.on_finish is not None:
            self.on_finish(request.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> ScheduledBatch:
        """This step's batch: running requests first, then waiting ones while room lasts."""
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
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Moves waiting requests into the batch, first come first served, while room lasts.

        A request whose next uncached block another running request is computing right now (a
        request's n choices, or a burst sharing a system prompt) waits for that block to be
        cached instead of computing it a second time; the requests behind it go ahead.
        """
        if not self.waiting:
            return
        computing = self._blocks_being_computed()
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cached = self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            start = len(cached) * self.kv.block_size if cached else req.num_computed_tokens
            if req.num_computed_tokens == 0 and self._next_block_is_computing(req, len(cached), computing):
                deferred.append(self.waiting.popleft())
                continue
            n = min(req.num_tokens - start, budget)
            if not self.kv.allocate(req, start + n, cached):
                break
            self.waiting.popleft()
            req.num_computed_tokens = start
            if not req.scheduled_once:
                req.num_cached_tokens = start
                lo, hi = req.context_cache_tokens
                req.num_context_cached_tokens = max(0, min(start, hi) - lo)
                req.scheduled_once = True
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
            if computing is not None:
                computing.update(req.block_hashes[len(cached) : req.num_prompt_tokens // self.kv.block_size])
        self.waiting.extendleft(reversed(deferred))  # they keep their place at the head

    def _blocks_being_computed(self) -> set[int] | None:
        """Hashes of the prompt blocks running requests are computing and have not cached yet
        (None without prefix caching: nothing could be shared)."""
        if not self.kv.enable_prefix_caching:
            return None
        bs = self.kv.block_size
        return {
            h
            for r in self.running
            if r.num_computed_tokens < r.num_prompt_tokens
            for h in r.block_hashes[r.num_cached_blocks : r.num_prompt_tokens // bs]
        }

    def _next_block_is_computing(self, req: Request, num_cached: int, computing: set[int] | None) -> bool:
        # find_cached_prefix has hashed the request's full blocks; the last token always computes.
        if not computing or num_cached >= (req.num_tokens - 1) // self.kv.block_size:
            return False
        return req.block_hashes[num_cached] in computing

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.mtp_hidden = None
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ after the forward pass

    def postprocess(
        self, batch: ScheduledBatch, num_logits: list[int], emitted: dict[str, Emitted]
    ) -> list[RequestDelta]:
        """Applies a step's results: progress for every request, tokens for those that sampled.

        `num_logits[i]` is how many logit rows request i had (0: a prompt chunk that emits
        nothing yet; k + 1: k guesses verified); `emitted` holds what the sampling ones emit.
        """
        deltas = []
        c = self.counters
        for req, n, m in zip(batch.requests, batch.num_tokens, num_logits):
            if m == 0:
                req.num_computed_tokens += n
                self.kv.cache_computed_blocks(req)
                continue
            tokens, logprobs = emitted[req.request_id]
            guesses = len(req.spec_token_ids)
            req.spec_token_ids = []
            # KV is valid through the last accepted guess; later slots are rolled back.
            req.num_computed_tokens += n - guesses + len(tokens) - 1
            if not req.output_token_ids:
                c.prompt_tokens_total += req.num_prompt_tokens
                c.prefix_cache_queried_tokens += req.num_prompt_tokens
                c.prefix_cache_hit_tokens += req.num_cached_tokens
                c.context_cache_hit_tokens += req.num_context_cached_tokens
            if guesses:
                c.spec_accepted_tokens += len(tokens) - 1
                c.spec_emitted_tokens += len(tokens)
                c.spec_verifications += 1
            deltas.append(self._append_tokens(req, tokens, logprobs))
        return deltas

    def _append_tokens(self, req: Request, tokens: list[int], logprobs: list[Any]) -> RequestDelta:
        """Emits tokens in order until one ends the request; builds the step's delta for it."""
        text = ""
        emitted: list[int] = []
        emitted_lps: list[Any] = []
        for token, lp in zip(tokens, logprobs):
            req.append_token(token)
            self.counters.generation_tokens_total += 1
            emitted.append(token)
            if lp is not None:
                req.logprobs.append(lp)
                emitted_lps.append(lp)
            stopped_on = None
            if req.detokenizer is not None:
                step = req.detokenizer.add_tokens([token])
                text += step.new_text
                stopped_on = step.stopped_on
            self._check_stop(req, token, stopped_on)
            if req.finished:
                break
        if req.finished and req.detokenizer is not None and not isinstance(req.stop_reason, str):
            # Text held back in case it began a stop string is final now.
            text += req.detokenizer.flush()
        # The accepted guesses are tokens now, so their full blocks can enter the prefix cache.
        req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
        self.kv.cache_computed_blocks(req)
        kv_ready = False
        if req.finished:
            self.finish(req)
        else:
            # Blocks set aside for rejected guesses go back to the pool.
            self.kv.trim(req, req.num_tokens)
            if req.prefill_only:
                # Park it: blocks stay allocated until export_kv + release_exported.
                self.remove(req)
                req.status = RequestStatus.PREFILLED
                kv_ready = True
        return RequestDelta(
            request_id=req.request_id,
            new_token_ids=emitted,
            new_text=text,
            new_logprobs=emitted_lps or None,
            finished=req.finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_context_cached_tokens=req.num_context_cached_tokens,
            kv_ready=kv_ready,
        )

    def _check_stop(self, req: Request, token: int, stopped_on: str | None) -> None:
        """Marks the request finished when `token` (or the text it completed) ends it."""
        p = req.params
        n_out = len(req.output_token_ids)
        reason: str | None = None
        stop_reason: str | int | None = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop_reason = "stop", token
            elif stopped_on is not None:
                reason, stop_reason = "stop", stopped_on
        out_of_room = self.max_model_len is not None and req.num_tokens >= self.max_model_len
        if reason is None and (n_out >= req.max_tokens or out_of_room):
            reason = "length"
        if reason is not None:
            req.status = RequestStatus.FINISHED
            req.finish_reason = reason
            req.stop_reason = stop_reason
