"""`ExpertParallelGroup`: one MoE replica on N rank processes, driven like one `Engine`.

Each rank is a process with its own `Engine` (its own scheduler and paged KV cache: attention is
data parallel) holding its share of the routed experts (rank_process.py). The group places each
request on the rank with the fewest unfinished ones (KV arriving from elsewhere: the first such
rank with room) and forwards every later call about it to that rank; it steps all ranks together:
a rank with nothing to run still serves the others' dispatch rounds (see dispatch.py). Every wait
on a rank is bounded, and a rank that dies or fails takes the group down with a `GroupFailed`
naming it.

It offers what a cluster worker calls on `Engine` (roles/worker.py): requests, the PD hooks
(`reserve_kv`, `import_kv`, `export_kv`, ...), `stats` summed over the ranks with each rank's line
kept, `served_model`, and the prefix cache of the group: a block is cached when some rank holds
it (`cached_block_hashes`, and `on_cache_event` hears a block when its first rank stores it and
when its last rank drops it), and a new request goes to the rank holding the longest prefix of its
prompt unless that rank is `PREFIX_LOAD_SLACK` requests busier than the least-loaded one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from pdserve.engine.block_hash import hash_blocks
from pdserve.engine.block_pool import KVCacheEvent
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.expert_parallel.metrics import ExpertParallelMetrics
from pdserve.engine.expert_parallel.placement import ExpertPlacement, rank_imbalance
from pdserve.engine.expert_parallel.rank_process import GroupFailed, RankProcesses
from pdserve.engine.kv_handoff import KVPayload
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.stats import EngineStats, summed_stats

__all__ = ["ExpertParallelGroup", "GroupFailed"]

logger = logging.getLogger(__name__)

# How long a rank may take to load its share of the model before the group gives up on it.
START_TIMEOUT_S = 600.0
# A rank holding a prompt's prefix gets the request while it holds at most this many requests more
# than the least-loaded rank. The ranks step together, so a step lasts as long as the busiest
# rank's batch: a request or two more there costs a few rows, against recomputing a whole prefix;
# beyond that, a shared system prompt would pile every request on the rank that computed it first.
PREFIX_LOAD_SLACK = 2


class ExpertParallelGroup:
    """N ranks serving one MoE replica (`config.expert_parallel.size`), with `Engine`'s driving API:
    `tokenize`, `add_request`, `abort`, `has_unfinished`, `step`, `tokenizer`, and the PD hooks and
    stats a cluster worker uses. `name` labels its metrics (a worker passes its id);
    `on_cache_event` hears the group's prefix-cache changes, as `Engine`'s does, and `on_phase`
    what the ranks are doing while they start ("rank 0 loading weights 3/57, rank 1 ...")."""

    def __init__(
        self,
        config: EngineConfig,
        host: str = "127.0.0.1",
        name: str | None = None,
        on_cache_event: Callable[[KVCacheEvent], None] | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.size = config.expert_parallel.size
        store_prefix = f"ep-{uuid.uuid4().hex[:12]}"  # the rendezvous keys of this group alone
        self.name = name or store_prefix
        self.on_cache_event = on_cache_event
        self._rank_blocks: list[set[int]] = [set() for _ in range(self.size)]  # each rank's cached hashes
        self._holders: dict[int, int] = {}  # a cached hash -> how many ranks hold it
        phases = ["starting"] * self.size

        def rank_phase(rank: int, phase: str) -> None:
            phases[rank] = phase
            if on_phase is not None:
                on_phase(", ".join(f"rank {r} {p}" for r, p in enumerate(phases)))

        self.ranks = RankProcesses(
            config, store_prefix, host, START_TIMEOUT_S, self._rank_cache_events, rank_phase
        )
        self.placement: ExpertPlacement = self.ranks.placements[0]
        self.served_model, self.kv_block_shape, self.kv_dtype = self.ranks.call(0, "facts")
        self._rank_of: dict[str, int] = {}  # requests and reservations, by the rank holding them
        self._unfinished = [False] * self.size
        self._tokenizer = None
        self._rebalanced_at = time.monotonic()
        self.expert_tokens: dict[int, list[int]] = {}  # since the last rebalance, summed over ranks
        self.metrics = ExpertParallelMetrics(self.name)
        self.metrics.ranks.labels(self.name).set(self.size)
        self.metrics.placement_version.labels(self.name).set(self.placement.version)

    # ------------------------------------------------------------------ Engine's API

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from pdserve.engine.model_source import resolve_model
            from pdserve.engine.tokenizer import load_tokenizer

            source = resolve_model(self.config.model)
            if self.config.tokenizer or source.has_tokenizer:
                self._tokenizer = load_tokenizer(self.config.tokenizer or source.path)
        return self._tokenizer

    def tokenize(self, prompt) -> list[int]:
        return self.ranks.call(0, "engine_call", "tokenize", prompt)

    def add_request(
        self, request_id: str, ids: list[int], params: SamplingParams, *, prefill_only: bool = False
    ) -> None:
        """Queues a request on the rank holding the longest prefix of it, unless that rank is
        `PREFIX_LOAD_SLACK` requests busier than the least-loaded one (then by load)."""
        rank = self._by_prefix_then_load(ids)
        self.ranks.call(rank, "add_request", request_id, ids, params, prefill_only)
        self._rank_of[request_id] = rank
        self._unfinished[rank] = True

    def abort(self, request_id: str) -> bool:
        rank = self._rank_of.pop(request_id, None)
        return rank is not None and self.ranks.call(rank, "engine_call", "abort", request_id)

    def has_unfinished(self) -> bool:
        return any(self._unfinished)

    def step(self) -> list[RequestDelta]:
        """One step of every rank at once; the deltas of all of them."""
        interval = self.config.expert_parallel.rebalance_interval_s
        if interval is not None and time.monotonic() - self._rebalanced_at >= interval:
            self.rebalance()
        deltas = []
        for rank, (rank_deltas, unfinished) in enumerate(self.ranks.call_all("step")):
            self._unfinished[rank] = unfinished
            for delta in rank_deltas:
                if delta.finished:
                    self._rank_of.pop(delta.request_id, None)
            deltas.extend(rank_deltas)
        return deltas

    def request_ids(self) -> list[str]:
        """Every request the ranks hold (see `Engine.request_ids`)."""
        return [r for ids in self.ranks.call_all("engine_call", "request_ids") for r in ids]

    def unstarted_request_ids(self) -> list[str]:
        """Requests no token of which has been computed on any rank."""
        return [r for ids in self.ranks.call_all("engine_call", "unstarted_request_ids") for r in ids]

    # ------------------------------------------------------------------ the PD hooks

    def reserve_kv(self, request_id: str, num_tokens: int) -> bool:
        """Reserves blocks on the least-loaded rank with room; that rank imports and decodes the
        request. False when no rank has room."""
        for rank in self._by_load():
            if self.ranks.call(rank, "engine_call", "reserve_kv", request_id, num_tokens):
                self._rank_of[request_id] = rank
                return True
        return False

    def has_reservation(self, request_id: str) -> bool:
        return self._forward(request_id, "has_reservation", default=False)

    def cancel_reservation(self, request_id: str) -> bool:
        found = self._forward(request_id, "cancel_reservation", default=False)
        if found:
            self._rank_of.pop(request_id, None)
        return found

    def import_kv(self, payload: KVPayload) -> None:
        """Continues the request on the rank that reserved its blocks."""
        rank = self._rank_of.get(payload.request_id)
        if rank is None:
            raise KeyError(f"no reservation for request {payload.request_id!r}; call reserve_kv first")
        self.ranks.call(rank, "engine_call", "import_kv", payload)
        self._unfinished[rank] = True

    def export_kv(self, request_id: str) -> KVPayload:
        if request_id not in self._rank_of:
            raise KeyError(f"request {request_id!r} is not in this group")
        return self._forward(request_id, "export_kv")

    def release_exported(self, request_id: str) -> None:
        self._forward(request_id, "release_exported")
        self._rank_of.pop(request_id, None)

    def compile_grammar(self, params: SamplingParams) -> concurrent.futures.Future:
        """A done future: the rank importing a guided request compiles its grammar itself (the
        owner's thread may not call the ranks, and holds no tokenizer-bound compiler)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(None)
        return done

    def cached_block_hashes(self) -> list[int]:
        """Hashes of every block some rank holds in its prefix cache."""
        return list(self._holders)

    def stats(self) -> EngineStats:
        """The ranks' stats summed (see `summed_stats`), each rank's line in `ranks`."""
        return summed_stats(self.ranks.call_all("engine_stats"))

    # ------------------------------------------------------------------ balancing and stats

    def collect_expert_tokens(self) -> dict[int, list[int]]:
        """Adds the ranks' token counts per expert since the last call to `expert_tokens`."""
        for counts in self.ranks.call_all("take_expert_tokens"):
            self.metrics.add_expert_tokens(counts)
            for layer, per_expert in counts.items():
                total = self.expert_tokens.setdefault(layer, [0] * len(per_expert))
                for e, n in enumerate(per_expert):
                    total[e] += n
        return self.expert_tokens

    def imbalance(self, placement: ExpertPlacement | None = None) -> float:
        """max/mean tokens per rank for the counted tokens, under `placement` (default: current)."""
        return rank_imbalance(placement or self.placement, self.collect_expert_tokens())

    def rebalance(self) -> ExpertPlacement:
        """Re-places spare copies from the counted tokens: weights first, then the routing table,
        between steps; the counts start over."""
        new = self.placement.rebalanced(self.collect_expert_tokens())
        self.ranks.call_all("install", new)
        self.placement = new
        self.expert_tokens = {}
        self._rebalanced_at = time.monotonic()
        self.metrics.rebalances.labels(self.name).inc()
        self.metrics.placement_version.labels(self.name).set(new.version)
        logger.info("expert-parallel group %s rebalanced (placement v%d)", self.name, new.version)
        return new

    def rank_stats(self) -> list[dict[str, Any]]:
        """Per rank: peak RSS, seconds in dispatch/combine, rounds, rows moved, rows computed per
        MoE layer, step seconds."""
        return self.ranks.call_all("stats")

    def metrics_text(self) -> str:
        """The group's Prometheus metrics (see metrics.py), brought up to date from the ranks."""
        self.metrics.rank_stats(self.rank_stats())
        self.metrics.imbalance.labels(self.name).set(self.imbalance())
        return self.metrics.text()

    def close(self) -> None:
        """Stops the rank processes."""
        self.ranks.close()

    # ------------------------------------------------------------------ plumbing

    def _held(self) -> list[int]:
        """Requests each rank holds (running, waiting or reserved)."""
        load = [0] * self.size
        for rank in self._rank_of.values():
            load[rank] += 1
        return load

    def _by_load(self) -> list[int]:
        """Ranks from the fewest requests held to the most."""
        load = self._held()
        return sorted(range(self.size), key=lambda r: (load[r], r))

    def _by_prefix_then_load(self, ids: Any) -> int:
        """The rank for a new request of prompt `ids` (see `add_request`)."""
        load = self._held()
        if not isinstance(ids, list) or not any(self._rank_blocks):
            return self._by_load()[0]
        hashes = hash_blocks(ids, self.config.block_size)
        cached = [_leading(hashes, blocks) for blocks in self._rank_blocks]
        near = min(load) + PREFIX_LOAD_SLACK
        return min(range(self.size), key=lambda r: (load[r] > near, -cached[r], load[r], r))

    def _rank_cache_events(self, rank: int, events: list[KVCacheEvent]) -> None:
        """Folds one rank's cache changes into the group's: a block is the group's while any rank
        holds it, so only a first store and a last removal are the group's changes."""
        blocks, stored, removed = self._rank_blocks[rank], [], []
        for event in events:
            for h in event.stored:
                if h not in blocks:
                    blocks.add(h)
                    self._holders[h] = self._holders.get(h, 0) + 1
                    if self._holders[h] == 1:
                        stored.append(h)
            for h in event.removed:
                if h in blocks:
                    blocks.discard(h)
                    self._holders[h] -= 1
                    if not self._holders[h]:
                        del self._holders[h]
                        removed.append(h)
        if (stored or removed) and self.on_cache_event is not None:
            self.on_cache_event(KVCacheEvent(stored, removed))

    def _forward(self, request_id: str, method: str, *args, default: Any = None) -> Any:
        """`method(request_id, *args)` on the rank holding the request; `default` if none does."""
        rank = self._rank_of.get(request_id)
        if rank is None:
            return default
        return self.ranks.call(rank, "engine_call", method, request_id, *args)


def _leading(hashes: list[int], blocks: set[int]) -> int:
    """How many of a prompt's block hashes, from its first, a rank holds."""
    n = 0
    while n < len(hashes) and hashes[n] in blocks:
        n += 1
    return n
