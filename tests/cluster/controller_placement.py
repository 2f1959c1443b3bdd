"""Least-load placement over the controller's live workers, for tests of the request path.

It needs nothing but the controller, so the runner's fault handling is tested without the
router's index, policies and charges (`pdserve.router.placement.RouterPlacement` is the real one).
"""

from __future__ import annotations

from pdserve.router.placement import NoWorkerError, prefer_not
from pdserve.router.request_runner import Route


class ControllerPlacement:
    """Chooses the least-loaded prefill worker and the decode worker with the most free blocks."""

    def __init__(self, controller) -> None:
        self.controller = controller  # ActorHandle of a Controller

    async def choose(self, prompt_token_ids: list[int], avoid: set[str], group: str | None = None) -> Route:
        workers = await self.controller.workers.remote()
        prefills = prefer_not(avoid, [w for w in workers if w.role == "prefill"])
        decodes = prefer_not(avoid, [w for w in workers if w.role == "decode"])
        boths = prefer_not(avoid, [w for w in workers if w.role == "both"])
        if prefills and decodes:
            p = min(prefills, key=lambda w: (w.load.waiting_prefill_tokens if w.load else 0, w.worker_id))
            d = max(decodes, key=lambda w: (w.load.kv_blocks_free if w.load else 0, w.worker_id))
            return Route(p.ref(), d.ref())
        if boths:
            b = min(
                boths, key=lambda w: (w.load.num_running + w.load.num_waiting if w.load else 0, w.worker_id)
            )
            return Route(None, b.ref())
        raise NoWorkerError("no live prefill+decode pair and no 'both' worker; check `pdserve status`")

    async def decode_target(self, num_tokens: int, avoid: set[str]):
        """The serving decode worker with the most free blocks outside `avoid`, if it has room."""
        workers = await self.controller.workers.remote()
        decodes = [w for w in workers if w.role == "decode" and w.worker_id not in avoid and w.load]
        decodes = [
            w
            for w in decodes
            if not w.load.draining and w.load.kv_blocks_free * w.load.block_size > num_tokens
        ]
        return max(decodes, key=lambda w: (w.load.kv_blocks_free, w.worker_id)).ref() if decodes else None

    async def failed(self, worker_id: str) -> None:
        await self.controller.report_failure.remote(worker_id)

    def settled(self, route: Route) -> None:
        """Nothing to do: this placement keeps no count of its own."""
