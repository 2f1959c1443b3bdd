"""Chained block hashes: the identity of a full KV block is its tokens plus everything before them.

The router hashes prompts with these same functions to ask which worker holds a prefix, so the
hash must be stable across processes and machines (no Python `hash()`, which is salted for str).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block, chained on its parent block's hash (ROOT_HASH for the first)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of `token_ids` (a trailing partial block has none)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
