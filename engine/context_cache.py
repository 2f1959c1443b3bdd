"""The context cache: a KV tier in Redis behind the engine's prefix cache.

Blocks go out when they have been used `min_reuse` times (computing a block is its first use,
each prefix-cache hit one more) or, with `min_reuse` 0, when they leave the pool. A new request,
after its local prefix lookup, asks Redis for the blocks that follow in one round trip and loads
what it finds into free blocks of the pool, registered in the prefix cache, so the scheduler then
finds them like any cached block (a prefill worker does this before its KV handoff, so decode
workers receive the full KV as before). Output is the same whichever way a block arrived: the
bytes are the pool's own, all layers (the MTP layer's included), in its dtype.
"""

from __future__ import annotations

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

    def load_prefix(self, request: Request) -> None:
        """Loads the blocks after the request's local prefix hit from Redis into the pool.

        They land as free, cached blocks (evicted last), which the scheduler finds at admission;
        `request.context_cache_tokens` records which prompt tokens came from Redis. Never raises:
        whatever goes wrong here, the request computes its prefix (the pool is left consistent).
        """
        try:
            self._load_prefix(request)
        except Exception:
            log.exception(
                "context cache: loading the prefix of %s failed; it is computed", request.request_id
            )
            self.store.count_error()

    def _load_prefix(self, request: Request) -> None:
        pool, bs = self.kv.pool, self.kv.block_size
        self.kv.update_block_hashes(request)
        hashes = request.block_hashes[: (request.num_tokens - 1) // bs]
        local: list[int] = []
        for h in hashes:
            b = pool.lookup(h)
            if b is None:
                break
            local.append(b)
        self._note_uses(hashes[: len(local)])
        missing = hashes[len(local) :]
        if not missing:
            return
        pool.touch(local)  # so that allocating below cannot evict the local part of the prefix
        loaded: list[int] = []
        try:
            room = min(len(missing), pool.num_free)
            payloads = self.store.fetch(missing[:room]) if room else []
            loaded = pool.allocate(len(payloads))
            now = time.monotonic()
            for block, h, payload in zip(loaded, missing, payloads):
                data = torch.frombuffer(payload, dtype=torch.uint8).view(self.kv_cache.tensor.dtype)
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
