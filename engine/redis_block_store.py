"""KV blocks in Redis: the value format, one-round-trip reads, and a writer thread.

A value is a header (magic, format version, the model identity's digest, the block's chained
hash, the payload's length and CRC-32) followed by the block's bytes, all layers, in the pool's
dtype; split into parts of `PART_BYTES` under `block_key(ns, hash, part)`. A value whose header
does not match, whose length or checksum is off, or that misses a part is never loaded: it is
deleted. A sorted set (`lru_key`) orders the blocks by last write or load, so the writer keeps
them within the memory budget by dropping the oldest; every key carries the TTL.

Reads run on the store's fetch threads (`fetch_async`), so the engine's step loop never waits on
Redis: a request whose blocks may be there waits for its lookup while the others keep stepping.

Redis failing or slow never fails a caller: reads return nothing, writes are dropped, the outage
is logged once (and its end once), and for `RETRY_S` after a failure no call is tried at all, so
requests do not each wait out a timeout.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import queue
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field

import redis
from redis.exceptions import RedisError

from pdserve.engine.context_cache_config import (
    PART_BYTES,
    ContextCacheConfig,
    block_key,
    lru_key,
    num_parts,
)
from pdserve.engine.stats import ContextCacheStats

log = logging.getLogger(__name__)

MAGIC = b"PDKV"
FORMAT_VERSION = 1
# magic, version, identity digest (16 bytes), block hash, payload bytes, CRC-32 of the payload
HEADER = struct.Struct("<4sB16sQQI")
RETRY_S = 1.0  # after a failure, calls are skipped this long
MAX_QUEUED = 4096  # writer items waiting; beyond, writes are dropped (counted)
BATCH_BYTES = 8 << 20  # one pipeline's values at most, so one write never holds Redis long
MAX_LATENCIES = 10_000  # fetch latencies kept until a snapshot takes them (offline, none may)
EXIT_FLUSH_S = 5.0  # at interpreter exit, queued writes get this long to go out
# Lookups in flight at once: concurrent requests with different prefixes do not queue behind one
# another's round trip (each holds a connection of the client's pool while it reads).
FETCH_THREADS = 4

# Drops the entries whose TTL has passed (their keys are gone already), then the oldest entries
# beyond the budget, with their keys. KEYS[1] the sorted set; ARGV[1] namespace, ARGV[2] parts per
# value, ARGV[3] entries allowed, ARGV[4] scores at or below this have expired. Returns the evicted.
_EVICT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
local evicted = 0
if over > 0 then
  local victims = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #victims, 2 do
    redis.call('DEL', ARGV[1] .. ':' .. victims[i])
    for p = 1, tonumber(ARGV[2]) - 1 do redis.call('DEL', ARGV[1] .. ':' .. victims[i] .. ':' .. p) end
    evicted = evicted + 1
  end
end
return evicted
"""


class CorruptValue(ValueError):
    """A stored value that must not be loaded (wrong identity, truncated, or damaged)."""


@dataclass(frozen=True)
class BlockCodec:
    """Encodes one block's bytes with its header, and checks a stored value against it."""

    identity: bytes  # 16-byte digest of the model identity
    payload_bytes: int  # one block's bytes in the pool's dtype

    @property
    def value_bytes(self) -> int:
        return HEADER.size + self.payload_bytes

    def encode(self, block_hash: int, payload: bytes | memoryview) -> bytes:
        if len(payload) != self.payload_bytes:
            raise ValueError(f"a block is {self.payload_bytes} bytes, got {len(payload)}")
        header = HEADER.pack(
            MAGIC, FORMAT_VERSION, self.identity, block_hash, len(payload), zlib.crc32(payload)
        )
        return header + payload

    def decode(self, block_hash: int, value: bytes | bytearray) -> memoryview:
        """The payload of a stored value; CorruptValue saying why when it is not this block's."""
        if len(value) < HEADER.size:
            raise CorruptValue(f"{len(value)} bytes, shorter than the header")
        magic, version, identity, stored_hash, length, crc = HEADER.unpack_from(value)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise CorruptValue(f"not a version-{FORMAT_VERSION} KV block value")
        if identity != self.identity:
            raise CorruptValue("written by another model, dtype or KV layout")
        if stored_hash != block_hash:
            raise CorruptValue(f"holds block {stored_hash:016x}")
        payload = memoryview(value)[HEADER.size :]
        if length != self.payload_bytes or len(payload) != length:
            raise CorruptValue(f"{len(payload)} payload bytes, expected {self.payload_bytes}")
        if zlib.crc32(payload) != crc:
            raise CorruptValue("checksum mismatch")
        return payload


class _Health:
    """Whether Redis answered lately; logs an outage once and its end once."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

    @property
    def available(self) -> bool:
        return self._down_since is None

    def should_try(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    def failed(self, error: BaseException) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
            self._retry_at = time.monotonic() + RETRY_S
        if first:
            log.warning(
                "context cache at %s unavailable (%s: %s); requests recompute their prefixes until it is back",
                self.where, type(error).__name__, error,
            )  # fmt: skip

    def succeeded(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("context cache at %s is back after %.1f s", self.where, time.monotonic() - since)


@dataclass
class _Write:
    blocks: list[tuple[int, bytes]] = field(default_factory=list)  # (hash, encoded value)


@dataclass
class _Touch:
    hashes: list[int]


@dataclass
class _Delete:
    hashes: list[int]


class RedisBlockStore:
    """Reads blocks in one round trip (on the caller's thread, or on a fetch thread with
    `fetch_async`); writes, TTL refreshes and deletes go through a queue to a writer thread.
    Thread-safe; `stats` is updated under a lock."""

    def __init__(self, config: ContextCacheConfig, ns: str, codec: BlockCodec) -> None:
        assert config.redis_url is not None
        self.config = config
        self.ns = ns
        self.codec = codec
        self.parts = num_parts(codec.value_bytes)
        self.max_entries = max(1, config.max_bytes // codec.value_bytes)
        self._redis = redis.Redis.from_url(
            config.redis_url, socket_timeout=config.timeout_s, socket_connect_timeout=config.timeout_s
        )
        kw = self._redis.connection_pool.connection_kwargs
        # Named by host and port only: the URL may carry a password.
        self.health = _Health(f"redis {kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}")
        self._evict = self._redis.register_script(_EVICT)
        self._lock = threading.Lock()
        self.stats = ContextCacheStats()
        self._queue: queue.Queue[_Write | _Touch | _Delete | None] = queue.Queue(MAX_QUEUED)
        self._writer = threading.Thread(target=self._write_loop, name="pdserve-context-cache", daemon=True)
        self._writer.start()
        self._fetcher = concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, "pdserve-context-fetch")
        # An offline script that computed a prefix and exits should leave it in Redis.
        atexit.register(self.flush, EXIT_FLUSH_S)

    # ------------------------------------------------------------------ reads

    @property
    def reachable(self) -> bool:
        """Whether a lookup would be tried now (False for `RETRY_S` after a failure)."""
        return self.health.should_try()

    def fetch_async(self, hashes: list[int]) -> concurrent.futures.Future[list[memoryview]]:
        """`fetch` on a fetch thread: a future of the payloads (it never raises RedisError)."""
        return self._fetcher.submit(self.fetch, hashes)

    def fetch(self, hashes: list[int]) -> list[memoryview]:
        """Payloads of the leading run of `hashes` stored here (one MGET); [] when Redis is down."""
        if not hashes or not self.health.should_try():
            return []
        keys = [block_key(self.ns, h, p) for h in hashes for p in range(self.parts)]
        start = time.perf_counter()
        try:
            values = self._redis.mget(keys)
        except (RedisError, OSError) as e:
            self.health.failed(e)
            self._count(errors=1)
            return []
        self.health.succeeded()
        found: list[memoryview] = []
        bad: list[int] = []
        for i, h in enumerate(hashes):
            parts = values[i * self.parts : (i + 1) * self.parts]
            if all(p is None for p in parts):
                break
            try:
                if any(p is None for p in parts):
                    raise CorruptValue(f"{sum(p is None for p in parts)} of {self.parts} parts missing")
                found.append(
                    self.codec.decode(h, bytearray().join(parts))
                )  # writable: torch reads it in place
            except CorruptValue as e:
                log.warning("context cache: block %016x rejected and deleted: %s", h, e)
                bad.append(h)
                break
        nbytes = sum(len(p) for p in found)
        self._count(
            fetches=1, fetch_seconds_total=time.perf_counter() - start, hit_blocks=len(found),
            miss_blocks=len(hashes) - len(found), bytes_read=nbytes, rejected=len(bad),
        )  # fmt: skip
        with self._lock:
            self.stats.fetch_seconds.append(time.perf_counter() - start)
            del self.stats.fetch_seconds[:-MAX_LATENCIES]
        if bad:
            self._enqueue(_Delete(bad))
        if found:
            self._enqueue(_Touch([hashes[i] for i in range(len(found))]))
        return found

    # ------------------------------------------------------------------ writes

    def store(self, blocks: list[tuple[int, bytes | memoryview]]) -> None:
        """Queues blocks (hash, payload) for writing; dropped (counted) when the queue is full."""
        if blocks:
            self._enqueue(_Write([(h, payload) for h, payload in blocks]))

    def flush(self, timeout_s: float = 10.0) -> None:
        """Waits until every queued write has been sent (or dropped)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        atexit.unregister(self.flush)
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=5)
        self._fetcher.shutdown(wait=False, cancel_futures=True)
        self._redis.close()

    def snapshot(self) -> ContextCacheStats:
        """The counters so far (fetch latencies drained: each is reported once)."""
        with self._lock:
            out = ContextCacheStats(**{**vars(self.stats), "fetch_seconds": list(self.stats.fetch_seconds)})
            self.stats.fetch_seconds.clear()
        out.available = self.health.available
        return out

    def count_error(self) -> None:
        """Counts a failure of the caller's own (a bug, logged there) in `errors`."""
        self._count(errors=1)

    def count_timeout(self) -> None:
        """Counts a lookup the caller stopped waiting for (its request computes the prefix)."""
        self._count(fetch_timeouts=1)

    def _enqueue(self, item: _Write | _Touch | _Delete) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._count(write_drops=len(item.blocks) if isinstance(item, _Write) else 0)

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if not self.health.should_try():
                    if isinstance(item, _Write):
                        self._count(write_drops=len(item.blocks))
                    continue
                try:
                    self._apply(item)
                except (RedisError, OSError) as e:
                    self.health.failed(e)
                    self._count(errors=1, write_drops=len(item.blocks) if isinstance(item, _Write) else 0)
                else:
                    self.health.succeeded()
            except Exception:  # a bug here must not end the thread: later writes still go out
                log.exception("context cache writer")
            finally:
                self._queue.task_done()

    def _apply(self, item: _Write | _Touch | _Delete) -> None:
        if isinstance(item, _Write):
            for batch in _batches(item.blocks, max(1, BATCH_BYTES // self.codec.value_bytes)):
                self._write(batch)
        elif isinstance(item, _Touch):
            with self._redis.pipeline(transaction=False) as pipe:
                now = time.time()
                for h in item.hashes:
                    for p in range(self.parts):
                        pipe.expire(block_key(self.ns, h, p), self.config.ttl_s)
                    pipe.zadd(lru_key(self.ns), {f"{h:016x}": now}, xx=True)
                pipe.execute()
        else:
            with self._redis.pipeline(transaction=False) as pipe:
                for h in item.hashes:
                    pipe.delete(*(block_key(self.ns, h, p) for p in range(self.parts)))
                    pipe.zrem(lru_key(self.ns), f"{h:016x}")
                pipe.execute()

    def _write(self, blocks: list[tuple[int, bytes | memoryview]]) -> None:
        """One pipeline: every part with the TTL, the blocks' LRU entries, then the budget."""
        ttl, lru, now = self.config.ttl_s, lru_key(self.ns), time.time()
        nbytes = 0
        with self._redis.pipeline(transaction=False) as pipe:
            for h, payload in blocks:
                value = memoryview(self.codec.encode(h, payload))
                nbytes += len(value)
                for p in range(self.parts):
                    pipe.set(block_key(self.ns, h, p), value[p * PART_BYTES : (p + 1) * PART_BYTES], ex=ttl)
                pipe.zadd(lru, {f"{h:016x}": now})
            pipe.expire(lru, ttl)
            self._evict(keys=[lru], args=[self.ns, self.parts, self.max_entries, now - ttl], client=pipe)
            results = pipe.execute()
        self._count(blocks_written=len(blocks), bytes_written=nbytes, evictions=int(results[-1]))


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
