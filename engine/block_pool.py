"""A bounded pool of KV blocks with reference counts, prefix-cache lookup and LRU eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class KVCacheEvent:
    """Block hashes that became reusable (`stored`) or were evicted (`removed`) since the last drain."""

    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed)


class BlockPool:
    """Owns block ids 0..num_blocks-1.

    A block is in use while its ref count is positive. A free block stays in the prefix cache
    (findable by its hash) until it is handed out again; free blocks are handed out least
    recently freed first, so the cache keeps what was used last.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"kv_cache_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._events = KVCacheEvent()
        # Hears (block, hash) just before a cached block is handed out again, while its bytes are
        # still intact (the context cache writes evicted blocks out).
        self.on_evict: Callable[[int, int], None] | None = None

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unreferenced ones included)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def lookup(self, block_hash: int) -> int | None:
        return self._by_hash.get(block_hash)

    def allocate(self, n: int) -> list[int]:
        """Hands out `n` blocks with ref count 1, evicting cached contents; caller checks num_free."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._ref[block] = 1
            out.append(block)
        return out

    def touch(self, blocks: list[int]) -> None:
        """Takes a reference on blocks found in the prefix cache."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops a reference; blocks reaching zero are appended in the given order (evicted last)."""
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] < 0:
                raise RuntimeError(f"KV block {b} freed more often than allocated")
            if self._ref[b] == 0:
                self._free[b] = None

    def cache(self, block: int, block_hash: int) -> None:
        """Makes a full block findable by its hash (a no-op if another block already holds it)."""
        if self._hash[block] is not None or block_hash in self._by_hash:
            return
        self._hash[block] = block_hash
        self._by_hash[block_hash] = block
        self._events.stored.append(block_hash)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def drain_events(self) -> KVCacheEvent:
        events, self._events = self._events, KVCacheEvent()
        return events

    def cached_hashes(self) -> list[int]:
        """Every hash currently findable: the snapshot a router index is rebuilt from."""
        return list(self._by_hash)

    def _evict(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            if self.on_evict is not None:
                self.on_evict(block, h)
            del self._by_hash[h]
            self._hash[block] = None
            self._events.removed.append(h)
