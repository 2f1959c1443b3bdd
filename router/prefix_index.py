"""Which worker holds which KV blocks: the router's prefix cache index.

Block hashes are the engine's chained 64-bit hashes (`pdserve.engine.block_hash`). The index only
stores what workers report (stored/removed events, full snapshots); it never guesses a worker's
state. Two backends behind one interface: in process (the embedded default) and Redis (shared by
several router replicas). Every entry is namespaced by cluster and model, and `longest_prefix` only counts the
workers the caller names, so a dead worker's leftovers never attract traffic.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError


class IndexUnavailable(RuntimeError):
    """The index backend cannot be reached right now (the router falls back to load-only placement)."""


class PrefixIndex(abc.ABC):
    """Which workers hold which KV blocks of one model; keys namespaced by model."""

    model: str

    @abc.abstractmethod
    async def apply(self, worker_id: str, stored: list[int], removed: list[int]) -> None:
        """Applies one worker's cache events: `stored` first, then `removed` (a hash in both ends absent)."""

    @abc.abstractmethod
    async def replace_worker(self, worker_id: str, hashes: list[int]) -> None:
        """Replaces everything known about one worker with a full snapshot of its cached blocks."""

    @abc.abstractmethod
    async def drop_worker(self, worker_id: str) -> None:
        """Forgets a worker (it died or restarted): all its entries vanish."""

    @abc.abstractmethod
    async def longest_prefix(self, block_hashes: list[int], worker_ids: list[str]) -> dict[str, int]:
        """For each listed worker, how many leading blocks of `block_hashes` it holds (0 if none)."""

    @abc.abstractmethod
    async def num_entries(self) -> int:
        """(worker, block) pairs held."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the backend's resources."""

    @abc.abstractmethod
    async def refresh(self) -> None:
        """Keeps the entries from expiring; the router calls it every few seconds while alive."""

    @abc.abstractmethod
    async def clear(self) -> None:
        """Deletes every entry of this cluster and model: the cluster is stopping."""


class InProcessPrefixIndex(PrefixIndex):
    """Two dicts of sets (block -> workers, worker -> blocks); lookups cost O(len(block_hashes))."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._holders: dict[int, set[str]] = {}
        self._blocks: dict[str, set[int]] = {}
        self._entries = 0

    async def apply(self, worker_id: str, stored: list[int], removed: list[int]) -> None:
        for h in stored:
            self._add(worker_id, h)
        for h in removed:
            self._remove(worker_id, h)

    async def replace_worker(self, worker_id: str, hashes: list[int]) -> None:
        new = set(hashes)
        old = self._blocks.get(worker_id, set())
        for h in old - new:
            self._remove(worker_id, h)
        for h in new - old:
            self._add(worker_id, h)

    async def drop_worker(self, worker_id: str) -> None:
        for h in self._blocks.pop(worker_id, set()):
            holders = self._holders[h]
            holders.discard(worker_id)
            self._entries -= 1
            if not holders:
                del self._holders[h]

    async def longest_prefix(self, block_hashes: list[int], worker_ids: list[str]) -> dict[str, int]:
        result = dict.fromkeys(worker_ids, 0)
        alive = set(result)
        n = 0
        # Walk the prompt's blocks once, shrinking the set of workers whose run is unbroken; set
        # intersection runs in C over the smaller set, so this stays well under a millisecond.
        for h in block_hashes:
            if not alive:
                break
            holders = self._holders.get(h)
            if holders is None:
                break
            kept = alive & holders
            if len(kept) != len(alive):
                for w in alive - kept:
                    result[w] = n
                alive = kept
            n += 1
        for w in alive:
            result[w] = n
        return result

    async def num_entries(self) -> int:
        return self._entries

    async def refresh(self) -> None:
        return None  # entries live and die with this process

    async def close(self) -> None:
        await self.clear()

    async def clear(self) -> None:
        self._holders.clear()
        self._blocks.clear()
        self._entries = 0

    def _add(self, worker_id: str, h: int) -> None:
        blocks = self._blocks.setdefault(worker_id, set())
        if h in blocks:
            return
        blocks.add(h)
        self._holders.setdefault(h, set()).add(worker_id)
        self._entries += 1

    def _remove(self, worker_id: str, h: int) -> None:
        blocks = self._blocks.get(worker_id)
        if blocks is None or h not in blocks:
            return
        blocks.discard(h)
        if not blocks:
            del self._blocks[worker_id]
        holders = self._holders[h]
        holders.discard(worker_id)
        if not holders:
            del self._holders[h]
        self._entries -= 1


# Replaces one worker's entries with a snapshot in one atomic round trip, so another router never
# sees a half-replaced worker. Only the difference is written (snapshots mostly repeat what the
# events already said). Redis deletes a set when its last member goes, so no empty keys linger.
# Every key written gets the index's TTL, so a router that dies leaves nothing behind for long.
# KEYS[1] worker key, KEYS[2] the model's worker registry; ARGV[1] block key prefix, ARGV[2] worker
# id, ARGV[3] TTL in seconds, ARGV[4..] the snapshot's hashes (strings: Lua numbers are doubles and
# would round 64-bit ints).
_REPLACE_WORKER = """
local ttl = ARGV[3]
local keep = {}
for i = 4, #ARGV do keep[ARGV[i]] = true end
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if keep[h] then
    keep[h] = false
  else
    redis.call('SREM', ARGV[1] .. h, ARGV[2])
    redis.call('SREM', KEYS[1], h)
  end
end
for i = 4, #ARGV do
  local h = ARGV[i]
  if keep[h] then
    keep[h] = false
    redis.call('SADD', ARGV[1] .. h, ARGV[2])
    redis.call('EXPIRE', ARGV[1] .. h, ttl)
    redis.call('SADD', KEYS[1], h)
  end
end
if #ARGV > 3 then
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
else
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 0
"""

# For each listed worker, its run of leading blocks held, computed next to the data: one round trip
# whose reply is one integer per worker. (Pipelining SMISMEMBER for every block instead returns
# blocks x workers integers, and parsing those in redis-py's pure-Python RESP reader took ~30 ms
# for 128 blocks x 64 workers.) Each step only asks about the workers whose run is unbroken, and
# the walk stops as soon as none is, so typical prompts touch a few keys.
# ARGV[1] block key prefix, ARGV[2] n workers, ARGV[3..2+n] worker ids, ARGV[3+n..] block hashes.
_LONGEST_PREFIX = """
local n = tonumber(ARGV[2])
local runs, alive, names = {}, {}, {}
for i = 1, n do runs[i] = 0; alive[i] = i; names[i] = ARGV[2 + i] end
local depth = 0
for b = 3 + n, #ARGV do
  local hits = redis.call('SMISMEMBER', ARGV[1] .. ARGV[b], unpack(names))
  local next_alive, next_names = {}, {}
  for k = 1, #alive do
    if hits[k] == 1 then
      next_alive[#next_alive + 1] = alive[k]
      next_names[#next_names + 1] = names[k]
    else
      runs[alive[k]] = depth
    end
  end
  alive, names = next_alive, next_names
  if #alive == 0 then break end
  depth = depth + 1
end
for k = 1, #alive do runs[alive[k]] = depth end
return runs
"""

# KEYS[1] the worker registry; ARGV[1] the worker key prefix.
_NUM_ENTRIES = """
local total = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  total = total + redis.call('SCARD', ARGV[1] .. w)
end
return total
"""

# Every key of the index, found from the registry without scanning the keyspace: `refresh` gives
# each the TTL again (one EXPIRE per (worker, block) pair, run inside Redis every few seconds),
# `clear` deletes them. KEYS[1] the registry; ARGV[1] worker key prefix, ARGV[2] block key prefix,
# ARGV[3] the TTL in seconds, or 0 to delete.
_EXPIRE_ALL = """
local ttl = tonumber(ARGV[3])
local function touch(key)
  if ttl > 0 then redis.call('EXPIRE', key, ttl) else redis.call('DEL', key) end
end
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local wkey = ARGV[1] .. w
  for _, h in ipairs(redis.call('SMEMBERS', wkey)) do touch(ARGV[2] .. h) end
  touch(wkey)
end
touch(KEYS[1])
return 0
"""


class RedisPrefixIndex(PrefixIndex):
    """The index in Redis, shared by router replicas.

    Keys: `{prefix}:{cluster}:{model}:blk:{hash}` -> SET of worker ids holding that block,
    `...:worker:{id}` -> SET of that worker's hashes (so it can be dropped), and `...:workers` ->
    SET of worker ids with entries (so they can be counted without scanning the keyspace). The
    cluster's name keeps two clusters serving one model on one Redis apart. Every key expires
    `ttl_s` after it was last written or refreshed: the router refreshes them while alive and
    clears them when its cluster stops, so a cluster that dies leaves nothing behind for long. One round trip per call; `replace_worker`, `drop_worker`,
    `longest_prefix` and `num_entries` run as Lua scripts that derive block keys from their
    arguments, which a standalone Redis (not Redis Cluster) allows; Redis >= 6.2 (SMISMEMBER). Any Redis failure surfaces as
    `IndexUnavailable`; the connection pool reconnects on the next call.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        cluster: str = "pdserve",
        ttl_s: int = 30,
        socket_timeout_s: float = 0.5,
        key_prefix: str = "pdserve",
    ) -> None:
        self.model = model
        self.ttl_s = ttl_s
        self._ns = f"{key_prefix}:{cluster}:{model}"
        self._blk = f"{self._ns}:blk:"
        self._worker = f"{self._ns}:worker:"
        self._registry = f"{self._ns}:workers"
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # One immediate retry on a broken connection, so a pooled connection that died with a
            # Redis restart is replaced transparently; none on a timeout (a hung Redis would only
            # stall placement twice as long). The default policy backs off for seconds instead.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        kw = self._redis.connection_pool.connection_kwargs
        # Named by host and port only: the URL may carry a password.
        self._where = f"redis {kw.get('host', '?')}:{kw.get('port', '?')}"
        self._replace_script = self._redis.register_script(_REPLACE_WORKER)
        self._entries_script = self._redis.register_script(_NUM_ENTRIES)
        self._prefix_script = self._redis.register_script(_LONGEST_PREFIX)
        self._expire_script = self._redis.register_script(_EXPIRE_ALL)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise IndexUnavailable(f"{self._where}: {type(e).__name__}: {e}") from e

    async def apply(self, worker_id: str, stored: list[int], removed: list[int]) -> None:
        if not stored and not removed:
            return
        wkey = self._worker + worker_id
        with self._guard():
            # MULTI/EXEC: one round trip, and readers see all of a batch or none of it.
            async with self._redis.pipeline(transaction=True) as pipe:
                if stored:
                    for h in stored:
                        pipe.sadd(f"{self._blk}{h}", worker_id)
                        pipe.expire(f"{self._blk}{h}", self.ttl_s)
                    pipe.sadd(wkey, *stored)
                    pipe.sadd(self._registry, worker_id)
                    pipe.expire(wkey, self.ttl_s)
                    pipe.expire(self._registry, self.ttl_s)
                if removed:
                    for h in removed:
                        pipe.srem(f"{self._blk}{h}", worker_id)
                    pipe.srem(wkey, *removed)
                await pipe.execute()

    async def replace_worker(self, worker_id: str, hashes: list[int]) -> None:
        with self._guard():
            await self._replace_script(
                keys=[self._worker + worker_id, self._registry],
                args=[self._blk, worker_id, self.ttl_s, *hashes],
            )

    async def drop_worker(self, worker_id: str) -> None:
        await self.replace_worker(worker_id, [])

    async def longest_prefix(self, block_hashes: list[int], worker_ids: list[str]) -> dict[str, int]:
        result = dict.fromkeys(worker_ids, 0)
        if not block_hashes or not result:
            return result
        workers = list(result)
        with self._guard():
            runs = await self._prefix_script(keys=[], args=[self._blk, len(workers), *workers, *block_hashes])
        return {w: int(n) for w, n in zip(workers, runs, strict=True)}

    async def num_entries(self) -> int:
        with self._guard():
            return int(await self._entries_script(keys=[self._registry], args=[self._worker]))

    async def refresh(self) -> None:
        with self._guard():
            await self._expire_script(keys=[self._registry], args=[self._worker, self._blk, self.ttl_s])

    async def clear(self) -> None:
        with self._guard():
            await self._expire_script(keys=[self._registry], args=[self._worker, self._blk, 0])

    async def close(self) -> None:
        with self._guard():
            await self._redis.aclose()


def make_prefix_index(
    model: str, redis_url: str | None, cluster: str = "pdserve", ttl_s: int = 30
) -> PrefixIndex:
    """The Redis index (keys under the cluster's name, expiring after `ttl_s`) when a URL is
    given, the in-process one otherwise."""
    if redis_url:
        return RedisPrefixIndex(redis_url, model, cluster=cluster, ttl_s=ttl_s)
    return InProcessPrefixIndex(model)
