"""Seeded random prompts (token ids) for the suites that compare outputs across setups."""

from __future__ import annotations

import torch


def prompts_of(lengths: list[int], seed: int = 0, vocab: int = 320) -> list[list[int]]:
    """One prompt per length, ids in [3, vocab): clear of the tiny test models' special tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
