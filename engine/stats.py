"""The engine's counters and the load snapshot built from them (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


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


@dataclass
class RankLoad:
    """One rank of an expert-parallel group: its KV pool, its queues, and the token slots its
    experts computed since start (its own tokens' and other ranks')."""

    rank: int
    pid: int  # its process
    kv_blocks_total: int
    kv_blocks_free: int
    num_running: int
    num_waiting: int
    expert_tokens: int = 0
    rss_bytes: int = 0  # its process's resident memory (the worker's RSS counts it)


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
    ranks: list[RankLoad] = field(default_factory=list)  # an expert-parallel group's, by rank

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


# Fields of a group's stats that are not the ranks' sum: the ranks step together, so the group's
# step count and step time are each rank's (the slowest's), not their total.
_GROUP_MAX_FIELDS = ("num_steps", "last_step_seconds", "step_seconds_total")


def summed_stats(per_rank: list[EngineStats]) -> EngineStats:
    """One expert-parallel group's stats from its ranks': queues, KV blocks and token counts
    summed, step counts and times the slowest rank's, the ranks' own lines kept in `ranks`."""
    values: dict[str, object] = {}
    for f in fields(EngineStats):
        column = [getattr(s, f.name) for s in per_rank]
        if f.name == "ranks":
            values[f.name] = [line for lines in column for line in lines]
        elif f.name == "context_cache":
            values[f.name] = _summed_context_cache([c for c in column if c is not None])
        elif f.name in _GROUP_MAX_FIELDS:
            values[f.name] = max(column)
        else:
            values[f.name] = sum(column)
    return EngineStats(**values)  # type: ignore[arg-type]


def _summed_context_cache(per_rank: list[ContextCacheStats]) -> ContextCacheStats | None:
    if not per_rank:
        return None
    values: dict[str, object] = {}
    for f in fields(ContextCacheStats):
        column = [getattr(c, f.name) for c in per_rank]
        if f.name == "available":
            values[f.name] = all(column)
        elif f.name == "fetch_seconds":
            values[f.name] = [s for seconds in column for s in seconds]
        else:
            values[f.name] = sum(column)
    return ContextCacheStats(**values)  # type: ignore[arg-type]
