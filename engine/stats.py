"""The engine's counters and the load snapshot built from them (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineCounters:
    """Totals since start that the engine's steps add to (one object, owned by the engine)."""

    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    context_cache_hit_tokens: int = 0  # of those, tokens whose KV was loaded from Redis
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_steps: int = 0
    last_step_seconds: float = 0.0
    step_seconds_total: float = 0.0  # time spent in steps (busy time; a rate's denominator)
    # Speculative decoding: guesses made and accepted, tokens emitted by verification steps, and
    # how many (request, step) verifications there were.
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_emitted_tokens: int = 0
    spec_verifications: int = 0
    # Guided decoding: tokens emitted under a grammar, and the time the step spent on grammars
    # (filling and applying token masks, cutting guesses, advancing matchers).
    guided_tokens_total: int = 0
    guided_seconds_total: float = 0.0


@dataclass
class ContextCacheStats:
    """The Redis context cache's totals since start (`RedisBlockStore` owns and updates them)."""

    available: bool = True  # Redis answered the last call
    fetches: int = 0  # lookups that reached Redis (one round trip each)
    fetch_seconds_total: float = 0.0
    hit_blocks: int = 0  # blocks found and loaded into the pool
    miss_blocks: int = 0  # blocks asked for and not found (the run ends at the first)
    bytes_read: int = 0
    blocks_written: int = 0
    bytes_written: int = 0
    evictions: int = 0  # blocks the memory budget dropped from Redis
    rejected: int = 0  # values refused (another model's, truncated, corrupt) and deleted
    write_drops: int = 0  # blocks not written (queue full, or Redis down)
    errors: int = 0  # calls that failed
    fetch_timeouts: int = 0  # lookups not answered within timeout_s (the request computed instead)
    # Fetch latencies since the previous snapshot (each reported once, for a histogram).
    fetch_seconds: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class EngineStats(EngineCounters):
    """A snapshot of the engine's load and counters (read by workers and metrics): the counters
    as they stood, and the queues and KV pool at that moment."""

    num_waiting: int
    num_running: int
    num_prefilled: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_cached: int
    kv_blocks_reserved: int  # set aside for KV on its way here (PD hand-offs not yet arrived)
    num_preemptions: int
    waiting_prefill_tokens: int
    num_compiling_grammar: int = 0  # guided requests waiting for their grammar to compile
    grammar_cache_size: int = 0  # compiled grammars kept
    num_fetching_context: int = 0  # new requests waiting for their prefix's lookup in Redis
    context_cache: ContextCacheStats | None = None  # None: the context cache is off

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_proposed_tokens if self.spec_proposed_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens emitted per verification (accepted guesses + 1); 1.0 means guessing never paid."""
        return self.spec_emitted_tokens / self.spec_verifications if self.spec_verifications else 0.0
