"""The context cache: a KV tier in Redis behind the engine's prefix cache.

Blocks go out when they have been used `min_reuse` times (computing a block is its first use,
each prefix-cache hit one more) or, with `min_reuse` 0, when they leave the pool. A new request,
after its local prefix lookup, asks Redis for the blocks that follow in one round trip, on a fetch
thread (`begin_fetch`: the engine keeps stepping the other requests meanwhile); once the answer is
in, `finish_fetch` loads what was found into free blocks of the pool, registered in the prefix
cache, so the scheduler then finds them like any cached block (a prefill worker does this before its KV handoff, so decode
workers receive the full KV as before). Output is the same whichever way a block arrived: the
bytes are the pool's own, all layers (the MTP layer's included), in its dtype.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.block_pool import KVCacheEvent
from pdserve.engine.context_cache_config import ContextCacheConfig, namespace
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.model_runner import KVCache
from pdserve.engine.redis_block_store import BlockCodec, RedisBlockStore
from pdserve.engine.request import Request
from pdserve.engine.stats import ContextCacheStats

log = logging.getLogger(__name__)

# Block hashes remembered for use counts and as already written (oldest forgotten first).
MAX_TRACKED = 200_000
# How many bytes of each weights file go into the model's identity (its start and its end).
FINGERPRINT_BYTES = 1 << 16


@dataclass(frozen=True)
class KVLayout:
    """What a block's bytes mean: a block from another layout must never be loaded."""

    num_layers: int  # KV layers of the pool, the MTP layer's included
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str


def model_identity(
    name: str, weights_dir: Path | None, load_format: str, seed: int, hf_overrides: dict, layout: KVLayout
) -> str:
    """A digest of the model (its weights' fingerprint) and the KV layout: the namespace of its blocks."""
    h = hashlib.blake2b(digest_size=16)
    h.update(
        json.dumps([name, load_format, hf_overrides, vars(layout)], sort_keys=True, default=str).encode()
    )
    if load_format == "dummy" or weights_dir is None:
        h.update(f"dummy-weights-seed:{seed}".encode())  # the seed alone makes the random weights
    else:
        for path in sorted([weights_dir / "config.json", *weights_dir.glob("*.safetensors")]):
            if not path.exists():
                continue
            size = path.stat().st_size
            h.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                h.update(f.read(FINGERPRINT_BYTES))
                f.seek(max(0, size - FINGERPRINT_BYTES))
                h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


@dataclass
class PendingFetch:
    """A request's lookup in Redis, in flight on the store's fetch thread."""

    hashes: list[int]  # the blocks asked for, in prefix order
    future: concurrent.futures.Future  # of the payloads of the leading run found
    started: float  # time.monotonic() when it was asked

    @property
    def done(self) -> bool:
        return self.future.done()


class ContextCache:
    """Moves full KV blocks between the engine's pool and Redis (see the module doc)."""

    def __init__(
        self, config: ContextCacheConfig, identity: str, kv: KVCacheManager, kv_cache: KVCache
    ) -> None:
        self.config = config
        self.identity = identity
        self.ns = namespace(identity)
        self.kv = kv
        self.kv_cache = kv_cache
        t = kv_cache.tensor
        self._block_shape = (t.shape[0], t.shape[1], *t.shape[3:])
        payload = t[:, :, 0].numel() * t.element_size()
        self.store = RedisBlockStore(config, self.ns, BlockCodec(bytes.fromhex(identity), payload))
        self._uses: OrderedDict[int, int] = OrderedDict()
        self._written: OrderedDict[int, float] = OrderedDict()  # hash -> when written or loaded
        if config.min_reuse == 0:
            kv.pool.on_evict = self._write_evicted

    # ------------------------------------------------------------------ reading

    def begin_fetch(self, request: Request) -> PendingFetch | None:
        """Starts the lookup in Redis of the blocks after the request's local prefix hit, on the
        store's fetch thread; None when there is nothing to ask (or Redis is known down).

        The engine holds the request until `fetch.done` and then calls `finish_fetch`. Never
        raises: whatever goes wrong here, the request computes its prefix.
        """
        try:
            hashes = self._prefix_hashes(request)
            local = self._local_run(hashes)
            self._note_uses(hashes[:local])
            # No more than the pool could take now (what it takes at admission is checked then).
            missing = hashes[local:][: self.kv.pool.num_free]
            if not missing or not self.store.reachable:
                return None
            return PendingFetch(missing, self.store.fetch_async(missing), time.monotonic())
        except Exception:
            log.exception(
                "context cache: looking up the prefix of %s failed; it is computed", request.request_id
            )
            self.store.count_error()
            return None

    def expired(self, fetch: PendingFetch) -> bool:
        """Whether the lookup has run past `timeout_s` (Redis slow): the request stops waiting."""
        return time.monotonic() - fetch.started > self.config.timeout_s

    def finish_fetch(self, request: Request, fetch: PendingFetch) -> None:
        """Loads what the lookup found into free blocks of the pool, registered in the prefix cache.

        They land as free, cached blocks (evicted last), which the scheduler finds at admission;
        `request.context_cache_tokens` records which prompt tokens came from Redis. A lookup not
        done yet is given up (counted as a timeout). Never raises; the pool is left consistent.
        """
        if not fetch.future.done():
            fetch.future.cancel()
            self.store.count_timeout()
            log.warning(
                "context cache: the lookup for %s took over %.2f s; its prefix is computed",
                request.request_id, self.config.timeout_s,
            )  # fmt: skip
            return
        try:
            payloads = fetch.future.result()
            if payloads:
                self._load(request, dict(zip(fetch.hashes, payloads)))
        except Exception:
            log.exception(
                "context cache: loading the prefix of %s failed; it is computed", request.request_id
            )
            self.store.count_error()

    def _prefix_hashes(self, request: Request) -> list[int]:
        """The hashes of the request's full prompt blocks that a cache hit may cover."""
        self.kv.update_block_hashes(request)
        return request.block_hashes[: (request.num_tokens - 1) // self.kv.block_size]

    def _local_run(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` the pool's prefix cache holds."""
        for i, h in enumerate(hashes):
            if self.kv.pool.lookup(h) is None:
                return i
        return len(hashes)

    def _load(self, request: Request, fetched: dict[int, memoryview]) -> None:
        """Copies the fetched blocks that continue the request's local prefix (as it stands now:
        other requests may have cached or evicted blocks during the lookup) into the pool."""
        pool, bs = self.kv.pool, self.kv.block_size
        hashes = self._prefix_hashes(request)
        local = [pool.lookup(h) for h in hashes[: self._local_run(hashes)]]
        wanted = []
        for h in hashes[len(local) :]:
            if h not in fetched:
                break
            wanted.append(h)
        if not wanted:
            return
        pool.touch(local)  # so that allocating below cannot evict the local part of the prefix
        loaded: list[int] = []
        try:
            loaded = pool.allocate(min(len(wanted), pool.num_free))
            now = time.monotonic()
            for block, h in zip(loaded, wanted):
                data = torch.frombuffer(fetched[h], dtype=torch.uint8).view(self.kv_cache.tensor.dtype)
                self.kv_cache.tensor[:, :, block] = data.view(self._block_shape).to(
                    self.kv_cache.tensor.device
                )
                self._remember(self._written, h, now)  # in Redis already: not written back
                pool.cache(block, h)
        finally:
            pool.free(local + loaded)  # in prefix order: the tail is evicted first
        if loaded:
            request.context_cache_tokens = (len(local) * bs, (len(local) + len(loaded)) * bs)

    # ------------------------------------------------------------------ writing

    def on_events(self, events: KVCacheEvent) -> None:
        """Blocks that entered the prefix cache: computed here (a use), or received (known)."""
        if self.config.min_reuse >= 1:
            try:
                self._note_uses(events.stored)
            except Exception:  # a failed write must not fail the engine's step
                log.exception("context cache: queueing blocks for Redis failed")
                self.store.count_error()

    def mark_known(self, hashes: list[int]) -> None:
        """Blocks whose KV another worker computed (a PD handoff): that worker writes them."""
        now = time.monotonic()
        for h in hashes:
            self._remember(self._written, h, now)

    def _note_uses(self, hashes: list[int]) -> None:
        if self.config.min_reuse == 0 or not hashes:
            return
        due = []
        for h in hashes:
            uses = self._uses.pop(h, 0) + 1
            self._remember(self._uses, h, uses)
            if uses >= self.config.min_reuse and not self._recently_written(h):
                due.append(h)
        self._write_resident(due)

    def _write_resident(self, hashes: list[int]) -> None:
        pool, out, now = self.kv.pool, [], time.monotonic()
        for h in hashes:
            block = pool.lookup(h)
            if block is not None:
                out.append((h, self._payload(block)))
                self._remember(self._written, h, now)
        self.store.store(out)

    def _write_evicted(self, block: int, block_hash: int) -> None:
        """The pool is about to reuse `block` (min_reuse 0): its bytes go out first."""
        if self._recently_written(block_hash):
            return
        self._remember(self._written, block_hash, time.monotonic())
        try:
            self.store.store([(block_hash, self._payload(block))])
        except Exception:  # a failed write must not fail the allocation
            log.exception("context cache: queueing an evicted block for Redis failed")
            self.store.count_error()

    def _payload(self, block: int) -> memoryview:
        """A copy of one block's bytes (the pool's block may be overwritten right after)."""
        src = self.kv_cache.tensor[:, :, block]
        data = torch.empty(src.shape, dtype=src.dtype)  # on the CPU, contiguous: one copy
        data.copy_(src)
        return memoryview(data.view(torch.uint8).numpy()).cast("B")

    def _recently_written(self, h: int) -> bool:
        # Half the TTL: a block written longer ago may have expired, and goes out again.
        at = self._written.get(h)
        return at is not None and time.monotonic() - at < self.config.ttl_s / 2

    @staticmethod
    def _remember(table: OrderedDict, h: int, value: object) -> None:
        table.pop(h, None)
        table[h] = value
        if len(table) > MAX_TRACKED:
            table.popitem(last=False)

    # ------------------------------------------------------------------ upkeep

    def stats(self) -> ContextCacheStats:
        return self.store.snapshot()

    def flush(self) -> None:
        """Waits for the queued writes (tests and benches read what was written)."""
        self.store.flush()

    def close(self) -> None:
        self.store.close()
