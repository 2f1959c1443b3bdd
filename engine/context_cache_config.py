"""The Redis context cache's settings and key names (plain data, no torch and no Redis client).

The engine writes and reads KV blocks under these keys; the router counts the blocks a prompt
has there under the same names; the configuration schema reads `ContextCacheConfig` from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Values are split into parts of at most this many bytes: Redis refuses a bulk string over 512 MB
# and one large value holds its single thread (and every other client) while it is copied.
PART_BYTES = 1 << 20
KEY_PREFIX = "pdserve:ctx"


@dataclass(frozen=True)
class ContextCacheConfig:
    """Where KV blocks of reused prefixes are kept beyond a worker's pool; `redis_url` None: off.

    `max_bytes`: the most value bytes one model's blocks take in Redis (least recently written
    go first); `ttl_s`: a block expires this long after it was last written or loaded;
    `min_reuse`: 0 writes a block only when it leaves the pool (eviction), N >= 1 once it has
    been used N times (computing it is the first use, each prefix-cache hit one more; 1, the
    default, writes every full block once computed); `timeout_s`: a Redis call slower than this
    counts as an outage (the request recomputes).
    """

    redis_url: str | None = None
    max_bytes: int = 4 << 30
    ttl_s: int = 3600
    min_reuse: int = 1
    timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if self.redis_url is not None and not (
            isinstance(self.redis_url, str)
            and self.redis_url.startswith(("redis://", "rediss://", "unix://"))
        ):
            raise ValueError(
                f"redis_url must be a redis://, rediss:// or unix:// URL, got {self.redis_url!r}"
            )
        for name in ("max_bytes", "ttl_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.min_reuse, bool) or not isinstance(self.min_reuse, int) or self.min_reuse < 0:
            raise ValueError(f"min_reuse must be an integer >= 0, got {self.min_reuse!r}")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, int | float)
            or self.timeout_s <= 0
        ):
            raise ValueError(f"timeout_s must be a number > 0, got {self.timeout_s!r}")

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None

    @classmethod
    def from_value(cls, value: ContextCacheConfig | dict | None) -> ContextCacheConfig:
        """The config of a mapping (`LLM(context_cache={...})`), naming an unknown key."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"context_cache must be a dict of {', '.join(_KEYS)}, got {value!r}")
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"context_cache: unknown key {unknown[0]!r}; keys are {', '.join(_KEYS)}")
        return cls(**value)


_KEYS = ("redis_url", "max_bytes", "ttl_s", "min_reuse", "timeout_s")


def namespace(identity: str) -> str:
    """The key prefix of one model identity's blocks (see `context_cache.model_identity`)."""
    return f"{KEY_PREFIX}:{identity}"


def block_key(ns: str, block_hash: int, part: int = 0) -> str:
    """The key of one part of one block's value; part 0 starts with the header."""
    return f"{ns}:{block_hash:016x}" if part == 0 else f"{ns}:{block_hash:016x}:{part}"


def lru_key(ns: str) -> str:
    """The sorted set of a namespace's blocks by last write or load time (the memory budget's order)."""
    return f"{ns}:lru"


def num_parts(value_bytes: int) -> int:
    return -(-value_bytes // PART_BYTES)
