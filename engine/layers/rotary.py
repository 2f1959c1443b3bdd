"""Interleaved rotary position embedding, as transformers' ERNIE 4.5 applies it.

ERNIE rotates adjacent pairs (x[2i], x[2i+1]) rather than the two halves of the head, and
does the rotation in fp32 whatever the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Applies ERNIE's interleaved RoPE to query and key at given token positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # Same expression as transformers, so the frequencies are bit-identical.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))
        # A plain attribute, not a buffer: models are built on the meta device and then
        # materialised empty, which would wipe a buffer.
        self.inv_freq = inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [T, 1, head_dim], each frequency repeated for its pair."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq
        cos = freqs.cos().repeat_interleave(2, dim=-1)[:, None, :]
        sin = freqs.sin().repeat_interleave(2, dim=-1)[:, None, :]
        return cos, sin

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; returns x rotated, in x's dtype."""
        xf = x.float()
        pairs = xf.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (xf * cos + rotated * sin).to(x.dtype)
