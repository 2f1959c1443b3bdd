"""How many leading blocks of a prompt the Redis context cache holds: blocks any worker can load.

The engines write the blocks (`pdserve.engine.context_cache`) under `block_key(namespace, hash)`;
the namespace and the Redis come with the `ServedModel`. One round trip: a Lua script walks the
prompt's block keys until the first one missing. A Redis that fails or is slow counts as holding
nothing (placement goes on by load and the local index), logged once per outage.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pdserve.engine.context_cache_config import block_key

log = logging.getLogger(__name__)

# ARGV: the keys of the prompt's blocks, in order. Returns how many lead the prompt unbroken.
_LEADING = """
local n = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', ARGV[i]) == 0 then break end
  n = n + 1
end
return n
"""


class ContextCacheView:
    """The router's read-only look at the context cache of the served model."""

    def __init__(self, url: str, ns: str, timeout_s: float = 0.1) -> None:
        self.ns = ns
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        kw = self._redis.connection_pool.connection_kwargs
        self.where = f"redis {kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"
        self._script = self._redis.register_script(_LEADING)
        self.available = True

    async def leading_blocks(self, block_hashes: list[int]) -> int:
        """Leading blocks of `block_hashes` stored in Redis (0 when it cannot be asked)."""
        if not block_hashes:
            return 0
        try:
            n = int(await self._script(keys=[], args=[block_key(self.ns, h) for h in block_hashes]))
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            if self.available:
                log.warning(
                    "context cache at %s unavailable for placement (%s: %s)", self.where, type(e).__name__, e
                )
            self.available = False
            return 0
        if not self.available:
            log.warning("context cache at %s is back", self.where)
        self.available = True
        return n

    async def close(self) -> None:
        await self._redis.aclose()


def make_context_cache_view(url: str | None, ns: str | None) -> ContextCacheView | None:
    """The view when the served model's engines keep a context cache, else None."""
    return ContextCacheView(url, ns) if url and ns else None
