"""`RouterPlacement`: the router's `Placement` (see `pdserve.router.request_runner`).

Prefill worker: the deployment's policy over live, non-draining prefill workers, with each
one's cached prefix of this prompt from the index (hashed into blocks exactly as the engine
does). Decode worker: KV headroom and running load. Colocated (`both`) when the cluster has
no prefill/decode pair or the prompt is shorter than one KV block, where a transfer would cost
more than recomputing.

Conditional disaggregation: the chosen decode worker computes the prompt itself, with no prefill
worker and no transfer, when at most `local_prefill_tokens` of the prompt are missing from its
prefix cache or the context cache (a short prompt, or the next turn of a conversation it holds),
and it has room for the prompt now (counting what was placed there since its last report).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pdserve.engine.block_hash import hash_blocks
from pdserve.roles.handoff import WorkerRef
from pdserve.router.cluster_view import ClusterView
from pdserve.router.context_cache_view import ContextCacheView
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Candidate, PrefillPolicy, choose_decode
from pdserve.router.prefix_index import IndexUnavailable
from pdserve.router.request_runner import Route

if TYPE_CHECKING:
    from pdserve.cluster.controller import WorkerInfo


# How long a request group's prefill worker is remembered, and how many groups at most.
GROUP_TTL_S = 30.0
MAX_GROUPS = 10_000


class NoWorkerError(RuntimeError):
    """No live worker of a needed role."""


def prefer_not(avoid: set[str], workers: list) -> list:
    """Workers not in `avoid`, or all of them when every one is to be avoided."""
    return [w for w in workers if w.worker_id not in avoid] or workers


# A request placed this long before a load report was measured is taken to be in it: the time from
# the router's choice to the worker's engine holding the request (a feed-link message and a queue hop;
# milliseconds here, more across machines whose clocks differ by a few ms).
IN_TRANSIT_S = 0.05


@dataclass(eq=False)  # a charge is one route's: settled by identity
class Charge:
    """Work counted against one worker for one route until its load reports show it."""

    worker_id: str
    placed_at: float  # wall-clock seconds (the workers' reports carry the same clock)
    prefill_tokens: int = 0
    blocks: int = 0


class PlacedSinceReport:
    """Work this router sent to each worker that the worker's latest load report cannot show yet.

    Loads reach the router once per controller heartbeat; without this, every request of a
    burst sees the same numbers and lands on the same worker. A charge lasts until its route's
    prefill is over (`settle`) or until a report measured after it arrives (that report shows
    whatever of it is still queued). Only charges placed before the report's measurement are
    dropped: a report measured just before a burst must not hide the burst.
    """

    def __init__(self) -> None:
        self._charges: dict[str, list[Charge]] = {}

    def _pending(self, worker) -> list[Charge]:
        """The worker's charges its latest report does not show (older ones are dropped here)."""
        charges = self._charges.get(worker.worker_id)
        if not charges:
            return []
        seen_until = worker.load.measured_at - IN_TRANSIT_S
        if charges[0].placed_at < seen_until:
            charges[:] = [c for c in charges if c.placed_at >= seen_until]
        return charges

    def adjusted(self, worker):
        """The worker's load with what was placed on it since its report."""
        pending = self._pending(worker)
        load = worker.load
        if not pending:
            return load  # the common case: nothing placed since the report, no copy needed
        return replace(
            load,
            waiting_prefill_tokens=load.waiting_prefill_tokens + sum(c.prefill_tokens for c in pending),
            kv_blocks_free=max(0, load.kv_blocks_free - sum(c.blocks for c in pending)),
        )

    def charge(self, worker, prefill_tokens: int = 0, blocks: int = 0) -> Charge:
        """Counts work just placed on a worker (seen through `adjusted` first)."""
        charge = Charge(worker.worker_id, time.time(), prefill_tokens, blocks)
        self._charges.setdefault(worker.worker_id, []).append(charge)
        return charge

    def settle(self, charge: Charge) -> None:
        """Takes a charge back (its prefill is over), if a report has not dropped it already."""
        charges = self._charges.get(charge.worker_id, [])
        if charge in charges:
            charges.remove(charge)


class PrefillGroups:
    """Which prefill worker (and, under `_decode_group`'s key, which decode worker) each recent
    request group went to (see `Placement.choose`).

    A group's requests arrive within milliseconds of each other, so an entry lives
    `GROUP_TTL_S`; at most `MAX_GROUPS` are kept (the oldest go first).
    """

    def __init__(self) -> None:
        self._worker: dict[str, tuple[str, float]] = {}  # group -> (worker id, expiry), oldest first

    def worker_of(self, group: str | None, now: float) -> str | None:
        entry = self._worker.get(group) if group else None
        return entry[0] if entry is not None and entry[1] > now else None

    def remember(self, group: str | None, worker_id: str, now: float) -> None:
        if not group:
            return
        self._worker.pop(group, None)
        self._worker[group] = (worker_id, now + GROUP_TTL_S)
        while len(self._worker) > MAX_GROUPS or next(iter(self._worker.values()))[1] <= now:
            del self._worker[next(iter(self._worker))]


class RouterPlacement:
    """Chooses routes from the cluster view with a prefill policy."""

    def __init__(
        self,
        view: ClusterView,
        policy: PrefillPolicy,
        block_size: int,
        metrics: RouterMetrics,
        local_prefill_tokens: int = 0,
        context_cache: ContextCacheView | None = None,
    ) -> None:
        """`context_cache`: where the served model's engines keep prefixes' KV, when they do."""
        self.view = view
        self.context_cache = context_cache
        self.policy = policy
        self.block_size = block_size
        self.metrics = metrics
        self.local_prefill_tokens = local_prefill_tokens
        self.placed = PlacedSinceReport()
        self.groups = PrefillGroups()
        # Workers a request found dead: skipped until the view drops them (ids are never reused)
        # or the controller finds them alive, so requests arriving meanwhile do not try them.
        self._dead: set[str] = set()

    async def choose(self, prompt_token_ids: list[int], avoid: set[str], group: str | None = None) -> Route:
        start = time.perf_counter()
        listed = self.view.workers
        self._dead &= {w.worker_id for w in listed}
        # Only workers with a load report: placement weighs loads (a worker still registering has none).
        workers = [
            w for w in listed if w.alive and w.load and w.load.serving and w.worker_id not in self._dead
        ]
        prefills = prefer_not(avoid, [w for w in workers if w.role == "prefill"])
        decodes = prefer_not(avoid, [w for w in workers if w.role == "decode"])
        boths = prefer_not(avoid, [w for w in workers if w.role == "both"])
        short = len(prompt_token_ids) < self.block_size
        if prefills and decodes and not (short and boths):
            hashes = self._hashes(prompt_token_ids)
            cached = await self._cached_blocks(hashes, [w.worker_id for w in prefills + decodes])
            in_redis = await self._context_blocks(hashes, len(prompt_token_ids))
            decode_candidates = [Candidate(w.worker_id, self.placed.adjusted(w)) for w in decodes]
            roomy = self._group_decode(group, decode_candidates, len(prompt_token_ids)) or choose_decode(
                decode_candidates, len(prompt_token_ids)
            )
            # None means no room anywhere: take the emptiest, and the runner's admission waits for room.
            decode = roomy or max(decode_candidates, key=lambda c: c.load.kv_blocks_free)
            self.groups.remember(_decode_group(group), decode.worker_id, time.monotonic())
            decode_w = _info(decodes, decode.worker_id)
            # Only with room: a local prefill allocates as it goes (no admission waits for it), so on
            # a full decode worker it would preempt the requests decoding there and evict the
            # prefix blocks it just loaded from the context cache before using them.
            if roomy is not None:
                local_route = self._local_prefill(decode_w, len(prompt_token_ids), cached, in_redis, start)
                if local_route is not None:
                    return local_route
            prefill_w, local, loaded = self._choose_cached(
                prefills, len(prompt_token_ids), group, cached, in_redis
            )
            charges = [
                self.placed.charge(prefill_w, prefill_tokens=len(prompt_token_ids) - local - loaded),
                self.placed.charge(decode_w, blocks=-(-(len(prompt_token_ids) + 1) // self.block_size)),
            ]
            self._observe(start, local)
            return Route(prefill_w.ref(), decode_w.ref(), charges)
        if boths:
            hashes = self._hashes(prompt_token_ids)
            cached = await self._cached_blocks(hashes, [w.worker_id for w in boths])
            in_redis = await self._context_blocks(hashes, len(prompt_token_ids))
            both_w, local, loaded = self._choose_cached(boths, len(prompt_token_ids), group, cached, in_redis)
            charges = [self.placed.charge(both_w, prefill_tokens=len(prompt_token_ids) - local - loaded)]
            self._observe(start, local)
            return Route(None, both_w.ref(), charges)
        raise NoWorkerError("no live prefill+decode pair and no 'both' worker")

    async def decode_target(self, num_tokens: int, avoid: set[str]) -> WorkerRef | None:
        """A serving decode worker, not in `avoid`, with room for `num_tokens` tokens of KV (or None)."""
        decodes = [
            w
            for w in self.view.workers
            if w.role == "decode" and w.alive and w.load and w.load.serving
            and w.worker_id not in avoid | self._dead
        ]  # fmt: skip
        chosen = choose_decode([Candidate(w.worker_id, self.placed.adjusted(w)) for w in decodes], num_tokens)
        return None if chosen is None else _info(decodes, chosen.worker_id).ref()

    async def failed(self, worker_id: str) -> None:
        """A worker a request found dead: not chosen again, and the controller checks it now."""
        self._dead.add(worker_id)
        if await self.view.controller.report_failure.remote(worker_id):
            self._dead.discard(worker_id)  # it answered the controller after all

    def settled(self, route: Route) -> None:
        for charge in route.charges or ():
            self.placed.settle(charge)
        route.charges = None  # settle once, however many chunks follow

    def _group_decode(
        self, group: str | None, candidates: list[Candidate], num_tokens: int
    ) -> Candidate | None:
        """The decode worker an earlier request of `group` went to, while it has room: the choices
        of one prompt (n > 1) then decode side by side there, and when the prompt is short enough to
        be computed there, it is computed once (its scheduler holds a request whose next block
        another is computing)."""
        worker_id = self.groups.worker_of(_decode_group(group), time.monotonic())
        same = [c for c in candidates if c.worker_id == worker_id]
        return choose_decode(same, num_tokens) if same else None

    def _local_prefill(
        self, decode_w: WorkerInfo, num_tokens: int, cached: dict[str, int], in_redis: int, start: float
    ) -> Route | None:
        """The route that has `decode_w` compute the prompt itself, when at most
        `local_prefill_tokens` of it are neither in its prefix cache nor in the context cache."""
        held = min(max(cached.get(decode_w.worker_id, 0), in_redis) * self.block_size, num_tokens)
        if num_tokens - held > self.local_prefill_tokens:
            return None
        self.metrics.local_prefills.inc()
        self._observe(start, min(cached.get(decode_w.worker_id, 0) * self.block_size, num_tokens))
        return Route(
            None,
            decode_w.ref(),
            [self.placed.charge(decode_w, blocks=-(-(num_tokens + 1) // self.block_size))],
        )

    def _choose_cached(
        self,
        workers: list[WorkerInfo],
        num_tokens: int,
        group: str | None,
        cached: dict[str, int],
        in_redis: int,
    ) -> tuple[WorkerInfo, int, int]:
        """The worker that computes the prompt, its own cached prompt tokens and the context
        cache's beyond them (it loads those): the group's worker if it is among `workers`, else
        the policy's pick. `cached`: blocks each worker holds; `in_redis`: leading blocks in the
        context cache."""
        now = time.monotonic()
        chosen_id = self.groups.worker_of(group, now)
        if chosen_id not in {w.worker_id for w in workers}:
            candidates = [
                Candidate(w.worker_id, self.placed.adjusted(w), cached.get(w.worker_id, 0), in_redis)
                for w in workers
            ]
            chosen_id = self.policy.choose(candidates, num_tokens).worker_id
        self.groups.remember(group, chosen_id, now)
        local = min(cached.get(chosen_id, 0) * self.block_size, num_tokens)
        loaded = max(0, min(in_redis * self.block_size, num_tokens) - local)
        self.metrics.context_cache_hit_tokens.inc(loaded)
        return _info(workers, chosen_id), local, loaded

    def _observe(self, start: float, hit_tokens: int) -> None:
        self.metrics.decision_seconds.observe(time.perf_counter() - start)
        self.metrics.index_hit_tokens.inc(hit_tokens)

    def _hashes(self, prompt: list[int]) -> list[int]:
        return hash_blocks(prompt, self.block_size) if len(prompt) >= self.block_size else []

    async def _cached_blocks(self, hashes: list[int], worker_ids: list[str]) -> dict[str, int]:
        if not self.view.index_available or not hashes:
            return {}
        try:
            return await self.view.index.longest_prefix(hashes, worker_ids)
        except IndexUnavailable:
            return {}  # the view notices and logs it on its next round

    async def _context_blocks(self, hashes: list[int], prompt_tokens: int) -> int:
        """Leading prompt blocks in the context cache (an engine loads at most those before the last token)."""
        if self.context_cache is None or not hashes:
            return 0
        return await self.context_cache.leading_blocks(hashes[: (prompt_tokens - 1) // self.block_size])


def _decode_group(group: str | None) -> str | None:
    """The key under which `PrefillGroups` remembers a group's decode worker (beside its prefill one)."""
    return None if group is None else f"decode:{group}"


def _info(workers: list, worker_id: str):
    return next(w for w in workers if w.worker_id == worker_id)
