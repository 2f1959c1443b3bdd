"""Prometheus metrics of one worker: KV transfers, role switches, queues, cache and speculation.

Each worker owns a `WorkerMetrics` (its own registry, no process-global state); the
controller and the gateway collect the text exposition through `Worker.metrics()`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdserve.engine import EngineStats
from pdserve.roles.process_usage import ProcessUsage

# Transfers span ~1 ms (one block, same host) to seconds (long prompts, slow links).
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The context cache's counters (ContextCacheStats field -> metric name suffix and help).
CONTEXT_CACHE_COUNTERS = {
    "hit_blocks": "KV blocks found in Redis and loaded into the pool",
    "miss_blocks": "KV blocks asked of Redis and not found",
    "bytes_read": "KV bytes loaded from Redis",
    "bytes_written": "KV bytes written to Redis",
    "blocks_written": "KV blocks written to Redis",
    "evictions": "KV blocks the memory budget dropped from Redis",
    "rejected": "Values refused (another model's, truncated, corrupt) and deleted",
    "write_drops": "KV blocks not written (queue full or Redis down)",
    "errors": "Redis calls of the context cache that failed",
    "fetch_timeouts": "Lookups not answered within timeout_s (the request computed its prefix)",
}


class WorkerMetrics:
    """The metric families a worker updates; labelled by worker id and (for transfers) direction."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.registry = CollectorRegistry()
        r = self.registry
        self.kv_transfer_bytes = Counter(
            "pdserve_kv_transfer_bytes", "KV bytes moved between workers", ["worker", "direction"], registry=r
        )
        self.kv_transfer_seconds = Histogram(
            "pdserve_kv_transfer_seconds",
            "Time to move one request's KV",
            ["worker", "direction"],
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.kv_transfer_failures = Counter(
            "pdserve_kv_transfer_failures",
            "KV transfers that failed or timed out",
            ["worker", "direction"],
            registry=r,
        )
        self.role_switches = Counter(
            "pdserve_worker_role_switches",
            "Role changes of this worker (the controller's pdserve_role_switches_total has their reasons)",
            ["worker", "from_role", "to_role"],
            registry=r,
        )
        self.role = Gauge(
            "pdserve_worker_role", "1 for the worker's current role", ["worker", "role"], registry=r
        )
        self.requests_waiting = Gauge("pdserve_requests_waiting", "Requests queued", ["worker"], registry=r)
        self.requests_running = Gauge(
            "pdserve_requests_running", "Requests in the batch", ["worker"], registry=r
        )
        self.pending_sends = Gauge(
            "pdserve_kv_pending_sends", "Prefilled requests whose KV has not left", ["worker"], registry=r
        )
        self.kv_blocks_free = Gauge(
            "pdserve_kv_blocks_free", "Free KV blocks (incl. evictable)", ["worker"], registry=r
        )
        self.kv_blocks_total = Gauge(
            "pdserve_kv_blocks_total", "KV blocks in the pool", ["worker"], registry=r
        )
        self.prefix_hit_tokens = Gauge(
            "pdserve_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache",
            ["worker"],
            registry=r,
        )
        self.guided_tokens = Gauge(
            "pdserve_guided_tokens",
            "Tokens emitted under a grammar (guided decoding)",
            ["worker"],
            registry=r,
        )
        self.guided_seconds = Gauge(
            "pdserve_guided_seconds",
            "Step time spent on grammars: token masks, guesses cut, matchers advanced",
            ["worker"],
            registry=r,
        )
        self.grammars_compiling = Gauge(
            "pdserve_grammars_compiling", "Guided requests waiting for their grammar", ["worker"], registry=r
        )
        self.grammar_cache_size = Gauge(
            "pdserve_grammar_cache_size", "Compiled grammars kept", ["worker"], registry=r
        )
        self.prefix_queried_tokens = Gauge(
            "pdserve_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            ["worker"],
            registry=r,
        )

        self.spec_proposed = Counter(
            "pdserve_spec_decode_proposed_tokens", "Tokens guessed by the proposer", ["worker"], registry=r
        )
        self.spec_accepted = Counter(
            "pdserve_spec_decode_accepted_tokens",
            "Guessed tokens the target model accepted",
            ["worker"],
            registry=r,
        )
        self.spec_emitted = Counter(
            "pdserve_spec_decode_emitted_tokens",
            "Tokens emitted by verification steps (accepted guesses + one per step)",
            ["worker"],
            registry=r,
        )
        self.spec_acceptance_rate = Gauge(
            "pdserve_spec_decode_acceptance_rate",
            "Accepted / proposed tokens, since start",
            ["worker"],
            registry=r,
        )
        self.spec_mean_accepted_length = Gauge(
            "pdserve_spec_decode_mean_accepted_length",
            "Tokens emitted per verification step, since start (1.0: guessing never paid)",
            ["worker"],
            registry=r,
        )
        self.engine_steps = Counter(
            "pdserve_engine_steps", "Engine steps (forward passes) run", ["worker"], registry=r
        )
        self.engine_busy_seconds = Counter(
            "pdserve_engine_busy_seconds",
            "Seconds the engine spent in steps (its rate: the share of time the engine computes)",
            ["worker"],
            registry=r,
        )
        # Counters that follow an engine total (an EngineStats field), and the totals last seen.
        self._totals = (
            (self.spec_proposed, "spec_proposed_tokens"), (self.spec_accepted, "spec_accepted_tokens"),
            (self.spec_emitted, "spec_emitted_tokens"), (self.engine_steps, "num_steps"),
            (self.engine_busy_seconds, "step_seconds_total"),
        )  # fmt: skip
        self._totals_seen = [0.0] * len(self._totals)
        self.resident_memory = Gauge(
            "pdserve_worker_resident_memory_bytes",
            "The worker process's resident memory",
            ["worker"],
            registry=r,
        )
        self.open_fds = Gauge(
            "pdserve_worker_open_fds",
            "File descriptors the worker process holds open",
            ["worker"],
            registry=r,
        )
        self.threads = Gauge(
            "pdserve_worker_threads", "Threads of the worker process", ["worker"], registry=r
        )
        self.context_cache = {
            name: Counter(f"pdserve_context_cache_{name}", text, ["worker"], registry=r)
            for name, text in CONTEXT_CACHE_COUNTERS.items()
        }
        self._context_cache_seen: dict[str, int] = {}
        self.context_cache_fetch_seconds = Histogram(
            "pdserve_context_cache_fetch_seconds",
            "One lookup of a prompt's blocks in Redis (one round trip, the values included)",
            ["worker"],
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.context_cache_available = Gauge(
            "pdserve_context_cache_available",
            "1 while Redis answers the context cache",
            ["worker"],
            registry=r,
        )
        self.context_cache_fetching = Gauge(
            "pdserve_context_cache_fetching",
            "New requests waiting for their prefix's lookup in Redis (the engine steps the others)",
            ["worker"],
            registry=r,
        )
        self.context_cache_hit_tokens = Gauge(
            "pdserve_context_cache_hit_tokens",
            "Prompt tokens loaded from the Redis context cache (part of the prefix cache's hits)",
            ["worker"],
            registry=r,
        )
        self.kv_channels_open = Gauge(
            "pdserve_kv_channels_open",
            "KV transfer channels with a communicator (sockets, a thread) on this worker",
            ["worker"],
            registry=r,
        )

    def engine_stats(self, stats: EngineStats, pending_sends: int, usage: ProcessUsage) -> None:
        """Refreshes the queue, cache, speculation and process families from one snapshot."""
        w = self.worker_id
        self.resident_memory.labels(w).set(usage.rss_bytes)
        self.open_fds.labels(w).set(usage.open_fds)
        self.threads.labels(w).set(usage.threads)
        self.requests_waiting.labels(w).set(stats.num_waiting)
        self.requests_running.labels(w).set(stats.num_running)
        self.pending_sends.labels(w).set(pending_sends)
        self.kv_blocks_free.labels(w).set(stats.kv_blocks_free)
        self.kv_blocks_total.labels(w).set(stats.kv_blocks_total)
        self.prefix_hit_tokens.labels(w).set(stats.prefix_cache_hit_tokens)
        self.prefix_queried_tokens.labels(w).set(stats.prefix_cache_queried_tokens)
        self.guided_tokens.labels(w).set(stats.guided_tokens_total)
        self.guided_seconds.labels(w).set(stats.guided_seconds_total)
        self.grammars_compiling.labels(w).set(stats.num_compiling_grammar)
        self.grammar_cache_size.labels(w).set(stats.grammar_cache_size)
        # The engine counts since start; the counters advance by what is new since the last look.
        for i, (counter, field) in enumerate(self._totals):
            total = getattr(stats, field)
            counter.labels(w).inc(max(0, total - self._totals_seen[i]))
            self._totals_seen[i] = total
        self.spec_acceptance_rate.labels(w).set(stats.spec_acceptance_rate)
        self.spec_mean_accepted_length.labels(w).set(stats.spec_mean_accepted_length)
        if stats.context_cache is not None:
            self._context_cache_stats(stats)

    def _context_cache_stats(self, stats: EngineStats) -> None:
        w, cc = self.worker_id, stats.context_cache
        assert cc is not None
        for name, counter in self.context_cache.items():
            now = getattr(cc, name)
            counter.labels(w).inc(max(0, now - self._context_cache_seen.get(name, 0)))
            self._context_cache_seen[name] = now
        for seconds in cc.fetch_seconds:  # each latency comes in one snapshot only
            self.context_cache_fetch_seconds.labels(w).observe(seconds)
        self.context_cache_available.labels(w).set(1 if cc.available else 0)
        self.context_cache_fetching.labels(w).set(stats.num_fetching_context)
        self.context_cache_hit_tokens.labels(w).set(stats.context_cache_hit_tokens)

    def kv_channels(self, open_channels: int) -> None:
        self.kv_channels_open.labels(self.worker_id).set(open_channels)

    def transfer(self, direction: str, nbytes: int, seconds: float) -> None:
        self.kv_transfer_bytes.labels(self.worker_id, direction).inc(nbytes)
        self.kv_transfer_seconds.labels(self.worker_id, direction).observe(seconds)

    def transfer_failed(self, direction: str) -> None:
        self.kv_transfer_failures.labels(self.worker_id, direction).inc()

    def set_role(self, old: str | None, new: str) -> None:
        for role in ("prefill", "decode", "both"):
            self.role.labels(self.worker_id, role).set(1 if role == new else 0)
        if old is not None:
            self.role_switches.labels(self.worker_id, old, new).inc()

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
