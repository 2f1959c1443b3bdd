"""Prefill/decode disaggregation: a request's KV leaves one engine and enters another.

The prefill side parks a `prefill_only` request once its first token is out; `export_kv`
copies its blocks and state into a `KVPayload` and `release_exported` frees them. The decode
side `reserve_kv`s blocks before the transfer starts and `import_kv`s the payload into them,
after which the request decodes like any other. A decoding request leaves the same way (live
migration: a decode worker switching role hands its running requests to other decode workers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.model_runner import KVCache
from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler


@dataclass
class KVPayload:
    """A prefilled request, ready to continue decoding on another engine.

    `kv` holds the request's own blocks only, [L, 2, n_blocks, block_size, KVH, D]; the rest
    is plain data, so the payload can cross a process boundary as is.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the first token, sampled by the prefill engine
    params: SamplingParams
    num_computed_tokens: int
    num_cached_tokens: int
    block_hashes: list[int]
    kv: torch.Tensor
    num_context_cached_tokens: int = 0
    generator_state: torch.Tensor | None = None  # so seeded sampling continues exactly
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # MTP speculation: pre-norm hidden states [n, H] of the last n computed positions, whose MTP
    # cache entries the decode side writes before its first guess (the rest travel in `kv`).
    mtp_hidden: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return int(self.kv.shape[2])


NewRequest = Callable[[str, list[int], SamplingParams], Request]


class KVHandoff:
    """The engine's export, reservation and import of requests' KV (see the module doc).

    Works on the engine's scheduler (its requests), block manager and KV cache; `new_request`
    builds an imported request as the engine builds any other, and `publish_events` tells the
    engine's listener about the prefix-cache changes an export or import made.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        kv: KVCacheManager,
        kv_cache: KVCache,
        max_model_len: int,
        hidden_size: int,
        new_request: NewRequest,
        publish_events: Callable[[], None],
    ) -> None:
        self.scheduler = scheduler
        self.kv = kv
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.hidden_size = hidden_size
        self.new_request = new_request
        self.publish_events = publish_events
        self._reservations: dict[str, Request] = {}  # block holders for KV on its way here

    # ------------------------------------------------------------------ prefill side

    def export_kv(self, request_id: str) -> KVPayload:
        """The KV blocks and state of a prefilled (prefill_only) request, or of a running one whose
        prompt is computed (it is decoding), as a plain payload; KeyError for any other.

        Called between steps, so the payload is the request exactly as the last step left it;
        guesses not yet verified are dropped (the importing engine proposes its own).
        """
        req = self.scheduler.requests.get(request_id)
        if req is None or not (
            req.status is RequestStatus.PREFILLED
            or (req.status is RequestStatus.RUNNING and req.num_computed_tokens >= req.num_prompt_tokens)
        ):
            raise KeyError(
                f"request {request_id!r} is neither prefilled nor decoding here; it cannot be exported"
            )
        n_blocks = -(-req.num_computed_tokens // self.kv.block_size)
        return KVPayload(
            request_id=request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids),
            params=req.params,
            num_computed_tokens=req.num_computed_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_context_cached_tokens=req.num_context_cached_tokens,
            block_hashes=list(req.block_hashes[: req.num_computed_tokens // self.kv.block_size]),
            kv=self.kv_cache.read_blocks(req.block_ids[:n_blocks]),
            generator_state=req.generator.get_state() if req.generator is not None else None,
            logprobs=list(req.logprobs),
            mtp_hidden=req.mtp_hidden,
        )

    def release_exported(self, request_id: str) -> None:
        """Frees a prefilled request's blocks once its KV has been handed over (or given up on)."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return
        self.scheduler.finish(req)
        self.publish_events()

    # ------------------------------------------------------------------ decode side

    def reserve_kv(self, request_id: str, num_tokens: int) -> bool:
        """Sets aside blocks for `num_tokens` tokens of KV that another engine will send.

        The decode side of a disaggregated request reserves before the prefill side sends, so
        no transfer ever lands in a full engine. False, changing nothing, when there is no room.
        """
        if request_id in self.scheduler.requests or request_id in self._reservations:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if num_tokens <= 0 or num_tokens >= self.max_model_len:
            raise ValueError(f"num_tokens must be in [1, {self.max_model_len}), got {num_tokens}")
        holder = Request(request_id, prompt_token_ids=[], params=SamplingParams(), max_tokens=0, arrival=-1)
        if not self.kv.allocate(holder, num_tokens):
            return False
        self._reservations[request_id] = holder
        return True

    def has_reservation(self, request_id: str) -> bool:
        return request_id in self._reservations

    @property
    def num_reserved_blocks(self) -> int:
        """Blocks held for KV that has not arrived yet."""
        return sum(len(holder.block_ids) for holder in self._reservations.values())

    def cancel_reservation(self, request_id: str) -> bool:
        """Returns a reservation's blocks to the pool; False if there was none."""
        holder = self._reservations.pop(request_id, None)
        if holder is None:
            return False
        self.kv.free(holder)
        return True

    @property
    def kv_block_shape(self) -> tuple[int, ...]:
        """Shape of one block's KV across layers, as `KVPayload.kv` holds it minus the block axis."""
        t = self.kv_cache.tensor
        return (t.shape[0], t.shape[1], *t.shape[3:])

    def import_kv(self, payload: KVPayload) -> None:
        """Continues decoding a request prefilled elsewhere: its KV goes into blocks here.

        Uses the blocks `reserve_kv` set aside for the request when there are any; otherwise
        allocates and raises RuntimeError when the pool cannot hold it (nothing changes then).
        """
        if payload.request_id in self.scheduler.requests:
            raise ValueError(f"request_id {payload.request_id!r} is already in use")
        req = self._restore_request(payload)
        holder = self._reservations.get(payload.request_id)
        if holder is not None and len(holder.block_ids) >= payload.num_blocks:
            del self._reservations[payload.request_id]
            req.block_ids = holder.block_ids
            if not self.kv.allocate(req, payload.num_computed_tokens):  # no-op unless it grew
                raise RuntimeError(f"no room to extend the reservation of {payload.request_id!r}")
        elif not self.kv.allocate(req, payload.num_computed_tokens):
            raise RuntimeError(
                f"no room for request {payload.request_id!r}: needs {payload.num_blocks} KV blocks, "
                f"{self.kv.num_free_blocks} free"
            )
        else:
            self.cancel_reservation(payload.request_id)
        self.kv_cache.write_blocks(req.block_ids[: payload.num_blocks], payload.kv)
        req.num_computed_tokens = payload.num_computed_tokens
        self.kv.cache_computed_blocks(req)
        self.scheduler.add_running(req)
        self.publish_events()

    def _restore_request(self, payload: KVPayload) -> Request:
        """A new request in the state the payload describes, blocks aside."""
        req = self.new_request(payload.request_id, list(payload.prompt_token_ids), payload.params)
        for t in payload.output_token_ids:
            req.append_token(t)
            if req.detokenizer is not None:
                # The prefill side streamed these tokens' text already; this only advances offsets.
                req.detokenizer.add_tokens([t])
        req.num_cached_tokens = payload.num_cached_tokens
        req.num_context_cached_tokens = payload.num_context_cached_tokens
        req.scheduled_once = True
        req.logprobs = list(payload.logprobs)
        if payload.generator_state is not None and req.generator is not None:
            req.generator.set_state(payload.generator_state)
        if payload.mtp_hidden is not None:
            t = self.kv_cache.tensor  # the engine's device and dtype
            req.mtp_hidden = payload.mtp_hidden.to(t.device, t.dtype).reshape(-1, self.hidden_size)
        return req
