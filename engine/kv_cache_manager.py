"""Per-request KV block tables on top of the `BlockPool`, with automatic prefix caching."""

from __future__ import annotations

from pdserve.engine.block_hash import ROOT_HASH, hash_block
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.request import Request


class KVCacheManager:
    """Allocates, shares and frees the KV blocks of requests."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def update_block_hashes(self, request: Request) -> None:
        """Extends `request.block_hashes` to cover every full block of its known tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(hash_block(parent, tokens[start : start + bs]))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens.

        At least one token is always left to compute: the step needs its logits.
        """
        if not self.enable_prefix_caching:
            return []
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for h in request.block_hashes[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def allocate(self, request: Request, num_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Makes the request's block table cover `num_tokens` tokens, first reusing `cached_blocks`.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        cached_blocks = list(cached_blocks)
        self.pool.touch(cached_blocks)
        have = len(request.block_ids) + len(cached_blocks)
        need = -(-num_tokens // self.block_size) - have
        if need > self.pool.num_free:
            # Give the touched blocks back at the tail, so a failed attempt does not evict them.
            self.pool.free(cached_blocks)
            return False
        request.block_ids.extend(cached_blocks)
        request.num_cached_blocks += len(cached_blocks)
        if need > 0:
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Registers newly completed full blocks of the request in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        if full <= request.num_cached_blocks:
            return
        self.update_block_hashes(request)
        for i in range(request.num_cached_blocks, full):
            self.pool.cache(request.block_ids[i], request.block_hashes[i])
        request.num_cached_blocks = full

    def trim(self, request: Request, num_tokens: int) -> None:
        """Returns the blocks past the first `num_tokens` tokens (set aside for rejected guesses).

        Those blocks were never full of computed tokens, so none of them is in the prefix cache.
        """
        keep = -(-num_tokens // self.block_size)
        if len(request.block_ids) > keep:
            self.pool.free(list(reversed(request.block_ids[keep:])))
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Releases the request's blocks; the tail is evicted before the shared head."""
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        request.num_cached_blocks = 0
