"""Turns a scheduled batch into model inputs, runs the model, returns logits for sampling."""

from __future__ import annotations

import torch

from pdserve.engine.layers.attention import AttentionMetadata, PrefillSpan
from pdserve.engine.models.ernie45 import Ernie45ForCausalLM
from pdserve.engine.scheduler import ScheduledBatch


class KVCache:
    """The paged KV cache of all layers: one tensor [L, 2, num_blocks, block_size, KVH, D]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.tensor = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    def layer(self, i: int) -> torch.Tensor:
        return self.tensor[i]

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the given blocks' K/V for all layers: [L, 2, n, block_size, KVH, D]."""
        return self.tensor[:, :, block_ids].clone()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.tensor[:, :, block_ids] = data.to(self.tensor.dtype)


class ModelRunner:
    """Runs one forward pass for a `ScheduledBatch` over the shared KV cache."""

    def __init__(self, model: Ernie45ForCausalLM, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        self._layers = [kv_cache.layer(i) for i in range(model.num_kv_layers)]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, sample_mask: list[bool]) -> torch.Tensor:
        """Logits [S, V] (fp32) for the requests with `sample_mask` set, in batch order."""
        input_ids, positions, meta, logit_rows = self._prepare(batch, sample_mask)
        hidden = self.model(input_ids, positions, self._layers, meta)
        return self.model.compute_logits(hidden[logit_rows])

    def _prepare(
        self, batch: ScheduledBatch, sample_mask: list[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        decode_rows: list[int] = []
        decode_ctx: list[int] = []
        decode_tables: list[list[int]] = []
        prefills: list[PrefillSpan] = []
        for req, n in zip(batch.requests, batch.num_tokens):
            start = req.num_computed_tokens
            row = len(ids)
            ids.extend(req.all_token_ids[start : start + n])
            pos.extend(range(start, start + n))
            table = req.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            ctx = start + n
            if n == 1:
                decode_rows.append(row)
                decode_ctx.append(ctx)
                decode_tables.append(table[: -(-ctx // bs)])
            else:
                span_slots = None
                if start > 0:
                    span_slots = self._slots(table, ctx)
                prefills.append(PrefillSpan(row, row + n, ctx, span_slots))
        for mask, req_end in zip(sample_mask, _cumsum(batch.num_tokens)):
            if mask:
                logit_rows.append(req_end - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=self.device),
            decode_slots=torch.empty(0, dtype=torch.long),
            decode_mask=torch.empty(0, dtype=torch.bool),
            prefills=prefills,
        )
        if decode_rows:
            meta.decode_slots, meta.decode_mask = self._decode_gather(decode_tables, decode_ctx)
        return (
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(pos, dtype=torch.long, device=self.device),
            meta,
            torch.tensor(logit_rows, dtype=torch.long, device=self.device),
        )

    def _slots(self, table: list[int], ctx: int) -> torch.Tensor:
        blocks = torch.tensor(table[: -(-ctx // self.block_size)], dtype=torch.long, device=self.device)
        offsets = torch.arange(self.block_size, device=self.device)
        return (blocks[:, None] * self.block_size + offsets).flatten()[:ctx]

    def _decode_gather(self, tables: list[list[int]], ctx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded context slots [B, Cmax] and mask [B, 1, 1, Cmax] for the decode rows."""
        bs = self.block_size
        max_blocks = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
        offsets = torch.arange(bs)
        slots = (padded[:, :, None] * bs + offsets).view(len(tables), -1)
        cmax = max(ctx)
        slots = slots[:, :cmax]
        mask = torch.arange(cmax)[None, :] < torch.tensor(ctx)[:, None]
        return slots.to(self.device), mask[:, None, None, :].to(self.device)


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
