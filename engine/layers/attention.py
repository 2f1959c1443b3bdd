"""Attention over a paged KV cache, for a step mixing decodes and (chunked) prefills.

The cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; a
token's K/V live at flat slot `block_id * block_size + offset`. Sequences computing a few
tokens (a decode's one, or a speculative verification's k + 1) are attended together in one
padded SDPA call; each longer prefill span gets its own call, since padding a long prompt
against short decodes would waste far more than the extra call costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence computing several tokens this step (a prompt chunk or a recompute)."""

    start: int  # first row of this span in the step's flattened tokens
    end: int  # one past its last row
    context_len: int  # tokens attended to, cached prefix included, after this step
    slots: torch.Tensor | None  # [context_len] flat cache slots; None when the span is the whole context
    # Whole prompts of equal length side by side (slots None) share one call: the rows hold
    # `num_seqs` sequences of (end - start) / num_seqs tokens each.
    num_seqs: int = 1


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each of them attends to."""

    slot_mapping: torch.Tensor  # [T] flat slot of each new token
    # The short sequences, batched: sequence b's j-th new token is row decode_rows[b, j] of T.
    decode_rows: torch.Tensor  # [Bd, Q] row indices; a sequence with fewer than Q repeats its last
    decode_slots: torch.Tensor  # [Bd, Cmax] flat slots of each sequence's context, padded
    decode_mask: torch.Tensor  # [Bd, 1, Q, Cmax] True where query j may see slot c
    prefills: list[PrefillSpan] = field(default_factory=list)
    # [Bd, Q] True where decode_rows is a real row, not padding; None when every row is real.
    decode_valid: torch.Tensor | None = None


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Writes this step's k/v into `kv_cache`, then attends. q: [T, H, D]; k, v: [T, KVH, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, meta.slot_mapping, k)
    v_flat.index_copy_(0, meta.slot_mapping, v)

    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        qd = q[meta.decode_rows].transpose(1, 2)  # [Bd, H, Q, D]
        kd = _gather(k_flat, meta.decode_slots).transpose(1, 2)  # [Bd, KVH, Cmax, D]
        vd = _gather(v_flat, meta.decode_slots).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        ).transpose(1, 2)  # [Bd, Q, H, D]
        if meta.decode_valid is None:
            out[meta.decode_rows.flatten()] = od.flatten(0, 1)
        else:
            out[meta.decode_rows[meta.decode_valid]] = od[meta.decode_valid]
    for span in meta.prefills:
        rows = slice(span.start, span.end)
        if span.slots is None:
            # Whole prompts: [num_seqs, heads, length, D], one causal call for all of them.
            qs, ks, vs = (x[rows].unflatten(0, (span.num_seqs, -1)).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            out[rows] = o.transpose(1, 2).flatten(0, 1)
            continue
        n = span.end - span.start
        ks = _gather(k_flat, span.slots).transpose(0, 1)  # [KVH, C, D]
        vs = _gather(v_flat, span.slots).transpose(0, 1)
        # Query i sits at context position (C - n + i) and sees everything up to it.
        query_pos = torch.arange(n, device=q.device)[:, None] + (span.context_len - n)
        mask = torch.arange(span.context_len, device=q.device)[None, :] <= query_pos
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[rows] = o.transpose(0, 1)
    return out


def _gather(flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """flat[slots] for slot ids of any shape: K or V of those slots, [*slots.shape, KVH, D].

    `index_select` on the flattened ids, not advanced indexing: on the CPU it is 3x faster for
    a batch-32 decode's gather (0.46 against 1.3 ms for [32, 256] slots).
    """
    return flat.index_select(0, slots.reshape(-1)).view(*slots.shape, *flat.shape[1:])
