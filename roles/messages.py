"""Plain data that crosses the worker actor's boundary (Ray pickles these).

No torch here: the controller and the router read these without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pdserve.engine.outputs import RequestDelta, TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.stats import EngineStats
from pdserve.roles.process_usage import ProcessUsage

ROLES = ("prefill", "decode", "both")


@dataclass
class TokenChunk:
    """Tokens a request produced since the last chunk, as the router streams them on."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    num_context_cached_tokens: int = 0  # of num_cached_tokens, those loaded from the Redis context cache
    # Set on the last chunk a worker sends for a request it hands to another worker (live
    # migration): no tokens, and the state the next worker continues from (its KV follows).
    moved: Handoff | None = None

    def then(self, later: TokenChunk) -> TokenChunk:
        """This chunk and the `later` one of the same request as one (a reader that fell behind
        takes them together); `later` must not be a `moved` marker."""
        logprobs = (self.logprobs or []) + (later.logprobs or []) if self.logprobs or later.logprobs else None
        return TokenChunk(
            self.request_id, self.token_ids + later.token_ids, self.text + later.text, later.finished,
            later.finish_reason, later.stop_reason, later.num_prompt_tokens, self.num_cached_tokens, logprobs,
            self.num_context_cached_tokens,
        )  # fmt: skip

    @classmethod
    def from_delta(cls, delta: RequestDelta) -> TokenChunk:
        return cls(
            request_id=delta.request_id,
            token_ids=list(delta.new_token_ids),
            text=delta.new_text,
            finished=delta.finished,
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
            num_prompt_tokens=delta.num_prompt_tokens,
            num_cached_tokens=delta.num_cached_tokens,
            logprobs=delta.new_logprobs,
            num_context_cached_tokens=delta.num_context_cached_tokens,
        )


@dataclass
class Started:
    """A worker's answer to `generate` / `decode`: whether the request runs there now (its chunks
    follow on the worker's chunk feed, see `roles.chunk_feed`), or it moved on at once (`moved`:
    KV that arrived on a worker leaving the decode role), or neither (aborted before it started)."""

    running: bool
    moved: Handoff | None = None


@dataclass
class Handoff:
    """A prefilled (or decoding) request's state minus its KV tensor: what the receiving side needs
    to continue."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    num_computed_tokens: int
    num_cached_tokens: int
    block_hashes: list[int]
    num_blocks: int
    generator_state: object | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    mtp_hidden: object | None = None  # torch.Tensor [H] when the engines speculate with MTP
    num_context_cached_tokens: int = 0

    @classmethod
    def of(cls, payload: object) -> Handoff:
        """The handoff of an engine's `KVPayload`: everything but the KV tensor."""
        state = {f.name: getattr(payload, f.name) for f in fields(cls) if f.name != "num_blocks"}
        return cls(**state, num_blocks=payload.num_blocks)  # type: ignore[attr-defined]


@dataclass
class RoleSwitch:
    """What one worker's role switch did: how long it took, requests moved live to other decode
    workers (decode -> prefill) and prompts handed back to the router (prefill -> decode)."""

    worker_id: str
    from_role: str
    to_role: str
    seconds: float
    moved: int = 0
    handed_back: int = 0


@dataclass
class PrefillResult:
    """What a prefill worker returns: the first chunk, and the handoff unless it already finished."""

    first: TokenChunk
    handoff: Handoff | None


@dataclass
class WorkerLoad:
    """One worker's load report (controller and router read it)."""

    worker_id: str
    role: str
    num_waiting: int
    num_running: int
    num_pending_sends: int  # prefilled requests whose KV has not left yet
    kv_blocks_total: int
    kv_blocks_free: int
    block_size: int
    waiting_prefill_tokens: int
    last_step_seconds: float
    draining: bool
    spec_acceptance_rate: float = 0.0  # speculative decoding, since start (0 when it is off)
    spec_mean_accepted_length: float = 0.0
    prompt_tokens_computed: int = 0  # prompt tokens computed (not cached) since start, and the
    step_seconds_total: float = 0.0  # time steps took: between two reports, the prefill rate
    kv_blocks_reserved: int = 0  # held for KV on its way here (prompts not computed yet)
    kv_blocks_cached: int = 0  # the prefix cache's blocks (free ones included: reusable prefixes)
    rss_bytes: int = 0  # the worker process's footprint (ProcessUsage)
    open_fds: int = 0
    threads: int = 0
    pid: int = 0
    drained: bool = False  # an operator drained it: it takes no new work, finishes what it has
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in its prefix cache since start
    prefix_cache_hit_tokens: int = 0  # ... and found there
    kv_sent_bytes: dict[str, int] = field(default_factory=dict)  # KV bytes sent to each worker id
    # Wall-clock time the worker read these numbers (router placement: what a report can show).
    measured_at: float = 0.0

    @property
    def serving(self) -> bool:
        """Whether placement may give it new work (not switching role, not drained)."""
        return not (self.draining or self.drained)

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Prompt tokens found in its prefix cache per token looked up, since start (None before any)."""
        queried = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / queried if queried else None

    # The Redis context cache since start (0, and available, when it is off).
    context_cache_hit_tokens: int = 0
    context_cache_bytes_read: int = 0
    context_cache_bytes_written: int = 0
    context_cache_available: bool = True

    @classmethod
    def from_stats(
        cls,
        stats: EngineStats,
        *,
        worker_id: str,
        role: str,
        num_pending_sends: int,
        block_size: int,
        draining: bool,
        usage: ProcessUsage | None = None,
        drained: bool = False,
        kv_sent_bytes: dict[str, int] | None = None,
        measured_at: float = 0.0,
    ) -> WorkerLoad:
        """The report of a worker whose engine gave `stats`; the rest is the worker's own state."""
        cc = stats.context_cache
        return cls(
            worker_id=worker_id,
            role=role,
            num_waiting=stats.num_waiting,
            num_running=stats.num_running,
            num_pending_sends=num_pending_sends,
            kv_blocks_total=stats.kv_blocks_total,
            kv_blocks_free=stats.kv_blocks_free,
            block_size=block_size,
            waiting_prefill_tokens=stats.waiting_prefill_tokens,
            last_step_seconds=stats.last_step_seconds,
            draining=draining,
            spec_acceptance_rate=stats.spec_acceptance_rate,
            spec_mean_accepted_length=stats.spec_mean_accepted_length,
            prompt_tokens_computed=stats.prompt_tokens_total - stats.prefix_cache_hit_tokens,
            step_seconds_total=stats.step_seconds_total,
            kv_blocks_reserved=stats.kv_blocks_reserved,
            kv_blocks_cached=stats.kv_blocks_cached,
            rss_bytes=usage.rss_bytes if usage else 0,
            open_fds=usage.open_fds if usage else 0,
            threads=usage.threads if usage else 0,
            pid=usage.pid if usage else 0,
            drained=drained,
            prefix_cache_queried_tokens=stats.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=stats.prefix_cache_hit_tokens,
            kv_sent_bytes=dict(kv_sent_bytes or {}),
            measured_at=measured_at,
            context_cache_hit_tokens=stats.context_cache_hit_tokens,
            context_cache_bytes_read=cc.bytes_read if cc else 0,
            context_cache_bytes_written=cc.bytes_written if cc else 0,
            context_cache_available=cc.available if cc else True,
        )
