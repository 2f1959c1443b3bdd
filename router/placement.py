"""`RouterPlacement`: the router's `Placement` (see `pdserve.roles.request_runner`).

Prefill worker: the deployment's policy over live, non-draining prefill workers, with each
one's cached prefix of this prompt from the index (hashed into blocks exactly as the engine
does). Decode worker: KV headroom and running load. Colocated (`both`) when the cluster has
no prefill/decode pair or the prompt is shorter than one KV block, where a transfer would cost
more than recomputing.
"""

from __future__ import annotations

import time
from dataclasses import replace

from pdserve.cluster.placement import NoWorkerError
from pdserve.engine.block_hash import hash_blocks
from pdserve.roles.handoff import WorkerRef
from pdserve.roles.request_runner import Route
from pdserve.router.cluster_view import ClusterView
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Candidate, PrefillPolicy, choose_decode
from pdserve.router.prefix_index import IndexUnavailable


class PlacedSinceReport:
    """Work this router sent to each worker that the worker's latest load report cannot show yet.

    Loads reach the router once per controller heartbeat; without this, every request of a
    burst sees the same numbers and lands on the same worker. Counts reset when a worker's
    report is newer than the one they were added on top of.
    """

    def __init__(self) -> None:
        self._report: dict[str, float] = {}
        self._prefill_tokens: dict[str, int] = {}
        self._blocks: dict[str, int] = {}

    def adjusted(self, worker):
        """The worker's load with what was placed on it since its report."""
        if self._report.get(worker.worker_id) != worker.last_heartbeat:
            self._report[worker.worker_id] = worker.last_heartbeat
            self._prefill_tokens.pop(worker.worker_id, None)
            self._blocks.pop(worker.worker_id, None)
        load = worker.load
        return replace(
            load,
            waiting_prefill_tokens=load.waiting_prefill_tokens
            + self._prefill_tokens.get(worker.worker_id, 0),
            kv_blocks_free=max(0, load.kv_blocks_free - self._blocks.get(worker.worker_id, 0)),
        )

    def add(self, worker_id: str, prefill_tokens: int = 0, blocks: int = 0) -> None:
        """Counts work just placed on a worker."""
        self._prefill_tokens[worker_id] = self._prefill_tokens.get(worker_id, 0) + prefill_tokens
        self._blocks[worker_id] = self._blocks.get(worker_id, 0) + blocks


class RouterPlacement:
    """Chooses routes from the cluster view with a prefill policy."""

    def __init__(
        self, view: ClusterView, policy: PrefillPolicy, block_size: int, metrics: RouterMetrics
    ) -> None:
        self.view = view
        self.policy = policy
        self.block_size = block_size
        self.metrics = metrics
        self.placed = PlacedSinceReport()

    async def choose(self, prompt_token_ids: list[int], avoid: set[str]) -> Route:
        start = time.perf_counter()
        workers = [w for w in self.view.workers if w.alive and not (w.load and w.load.draining)]
        prefills = _prefer_not(avoid, [w for w in workers if w.role == "prefill"])
        decodes = _prefer_not(avoid, [w for w in workers if w.role == "decode"])
        boths = _prefer_not(avoid, [w for w in workers if w.role == "both"])
        short = len(prompt_token_ids) < self.block_size
        if prefills and decodes and not (short and boths):
            cached = await self._cached_blocks(prompt_token_ids, [w.worker_id for w in prefills])
            chosen = self.policy.choose(
                [
                    Candidate(w.worker_id, self.placed.adjusted(w), cached.get(w.worker_id, 0))
                    for w in prefills
                    if w.load
                ],
                len(prompt_token_ids),
            )
            decode_candidates = [Candidate(w.worker_id, self.placed.adjusted(w)) for w in decodes if w.load]
            # None means no room anywhere: take the emptiest, and the runner's admission waits for room.
            decode = choose_decode(decode_candidates, len(prompt_token_ids)) or max(
                decode_candidates, key=lambda c: c.load.kv_blocks_free
            )
            hit_tokens = min(cached.get(chosen.worker_id, 0) * self.block_size, len(prompt_token_ids))
            self.placed.add(chosen.worker_id, prefill_tokens=len(prompt_token_ids) - hit_tokens)
            self.placed.add(decode.worker_id, blocks=-(-(len(prompt_token_ids) + 1) // self.block_size))
            self.metrics.decision_seconds.observe(time.perf_counter() - start)
            self.metrics.index_hit_tokens.inc(hit_tokens)
            return Route(_ref(prefills, chosen.worker_id), _ref(decodes, decode.worker_id))
        if boths:
            cached = await self._cached_blocks(prompt_token_ids, [w.worker_id for w in boths])
            chosen = self.policy.choose(
                [
                    Candidate(w.worker_id, self.placed.adjusted(w), cached.get(w.worker_id, 0))
                    for w in boths
                    if w.load
                ],
                len(prompt_token_ids),
            )
            hit_tokens = min(cached.get(chosen.worker_id, 0) * self.block_size, len(prompt_token_ids))
            self.placed.add(chosen.worker_id, prefill_tokens=len(prompt_token_ids) - hit_tokens)
            self.metrics.decision_seconds.observe(time.perf_counter() - start)
            return Route(None, _ref(boths, chosen.worker_id))
        raise NoWorkerError("no live prefill+decode pair and no 'both' worker")

    async def failed(self, worker_id: str) -> None:
        await self.view.controller.report_failure.remote(worker_id)

    async def _cached_blocks(self, prompt: list[int], worker_ids: list[str]) -> dict[str, int]:
        if not self.view.index_available or len(prompt) < self.block_size:
            return {}
        try:
            return await self.view.index.longest_prefix(hash_blocks(prompt, self.block_size), worker_ids)
        except IndexUnavailable:
            return {}  # the view notices and logs it on its next round


def _prefer_not(avoid: set[str], workers: list) -> list:
    return [w for w in workers if w.worker_id not in avoid] or workers


def _ref(workers: list, worker_id: str) -> WorkerRef:
    w = next(w for w in workers if w.worker_id == worker_id)
    return WorkerRef(w.worker_id, w.handle, w.endpoint)
