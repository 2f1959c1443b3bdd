"""Turns a scheduled batch into model inputs, runs the model, returns logits for sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.kernels import CpuParallel
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


# Sequences computing at most this many tokens in a step share one padded attention call
# (decodes, and speculative verification's k + 1); longer spans get a call each.
MAX_BATCHED_QUERY = 17


@dataclass
class ModelOutput:
    """What one forward pass hands to sampling: logits and pre-norm hidden states of the same rows."""

    logits: torch.Tensor  # [R, V] fp32
    hidden: torch.Tensor  # [R, H]


@dataclass
class ModelInputs:
    """A scheduled batch as tensors: flattened tokens, their positions and attention metadata."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [R] rows of T whose logits the step needs, in batch order
    next_ids: torch.Tensor  # [T] the token after each row's (0 where none is known yet), for MTP


class ModelRunner:
    """Runs one forward pass for a `ScheduledBatch` over the shared KV cache.

    With `mtp_layer` set (the KV layer index of the MTP head), every pass also runs the MTP
    layer over the step's rows, so its KV cache keeps up with the main model's: row t's
    entry needs token t+1, known for every row but the sequence's last, whose entry the MTP
    proposer writes once the next token is sampled. `cpu_parallel` (the engine's
    `CpuGemm.parallel`) lends the engine's threads to the CPU attention kernel.
    """

    def __init__(
        self,
        model: Ernie45ForCausalLM,
        kv_cache: KVCache,
        device: torch.device,
        mtp_layer: int | None = None,
        cpu_parallel: CpuParallel | None = None,
    ) -> None:
        self.model = model
        self.cpu_parallel = cpu_parallel
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        self.mtp_layer = mtp_layer
        self._layers = [kv_cache.layer(i) for i in range(model.num_kv_layers)]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, num_logits: list[int], run_mtp: bool = True) -> ModelOutput:
        """Logits and hidden states of the last `num_logits[i]` tokens of each request, in batch order."""
        inputs = self.prepare(batch, num_logits)
        hidden = self.model(inputs.input_ids, inputs.positions, self._layers, inputs.meta)
        if self.mtp_layer is not None and run_mtp:
            self.model.mtp_forward(
                hidden,
                inputs.next_ids,
                inputs.positions,
                self.kv_cache.layer(self.mtp_layer),
                inputs.meta,
            )
        rows = hidden[inputs.logit_rows]
        return ModelOutput(self.model.compute_logits(rows), rows)

    def prepare(self, batch: ScheduledBatch, num_logits: list[int]) -> ModelInputs:
        bs = self.block_size
        ids: list[int] = []
        nexts: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        short_rows: list[list[int]] = []
        short_ctx: list[int] = []
        short_tables: list[list[int]] = []
        prefills: list[PrefillSpan] = []
        for req, n, m in zip(batch.requests, batch.num_tokens, num_logits):
            start = req.num_computed_tokens
            row = len(ids)
            ids.extend(req.token_ids_in(start, start + n))
            following = req.token_ids_in(start + 1, start + n + 1)
            nexts.extend(following + [0] * (n - len(following)))
            pos.extend(range(start, start + n))
            table = req.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            ctx = start + n
            if n <= MAX_BATCHED_QUERY:
                short_rows.append(list(range(row, row + n)))
                short_ctx.append(ctx)
                short_tables.append(table[: -(-ctx // bs)])
            elif start > 0:
                prefills.append(PrefillSpan(row, row + n, ctx, self._slots(table, ctx)))
            elif prefills and _extends(prefills[-1], row, n):
                # A whole prompt as long as the whole prompts just before it: one attention call.
                last = prefills[-1]
                prefills[-1] = PrefillSpan(last.start, row + n, n, None, last.num_seqs + 1)
            else:
                prefills.append(PrefillSpan(row, row + n, ctx, None))
            logit_rows.extend(range(row + n - m, row + n))
        meta = self._meta(slots, prefills)
        if short_rows:
            self._short_group(meta, short_rows, short_tables, short_ctx)
        return ModelInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(pos, dtype=torch.long, device=self.device),
            meta=meta,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=self.device),
            next_ids=torch.tensor(nexts, dtype=torch.long, device=self.device),
        )

    def spans_meta(self, tables: list[list[int]], starts: list[int], counts: list[int]) -> AttentionMetadata:
        """Attention metadata for `counts[i]` new tokens of sequence i from position `starts[i]`.

        Each span attends to its own cache up to itself; spans must be short (the batched path).
        """
        bs = self.block_size
        slots: list[int] = []
        rows: list[list[int]] = []
        for table, start, n in zip(tables, starts, counts):
            assert n <= MAX_BATCHED_QUERY
            rows.append(list(range(len(slots), len(slots) + n)))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        meta = self._meta(slots, [])
        ctx = [start + n for start, n in zip(starts, counts)]
        self._short_group(meta, rows, [t[: -(-c // bs)] for t, c in zip(tables, ctx)], ctx)
        return meta

    def _meta(self, slots: list[int], prefills: list[PrefillSpan]) -> AttentionMetadata:
        """Metadata with the new tokens' slots and long spans; `_short_group` fills the rest."""
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            decode_rows=torch.empty(0, 0, dtype=torch.long, device=self.device),
            prefills=prefills,
        )

    def _slots(self, table: list[int], ctx: int) -> torch.Tensor:
        blocks = torch.tensor(table[: -(-ctx // self.block_size)], dtype=torch.long, device=self.device)
        offsets = torch.arange(self.block_size, device=self.device)
        return (blocks[:, None] * self.block_size + offsets).flatten()[:ctx]

    def _short_group(
        self, meta: AttentionMetadata, rows: list[list[int]], tables: list[list[int]], ctx: list[int]
    ) -> None:
        """Fills the batched-attention fields for the sequences computing few tokens.

        The gather path's padded slots and mask are derived from these on first use
        (`AttentionMetadata.decode_slots`), so a step the CPU kernel attends never builds them.
        """
        q = max(len(r) for r in rows)
        padded_rows = torch.tensor([r + [r[-1]] * (q - len(r)) for r in rows], dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        max_blocks = max(len(t) for t in tables)
        meta.decode_rows = padded_rows.to(self.device)
        meta.decode_block_tables = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32
        )
        meta.decode_query_lens = lengths
        meta.decode_context_lens = torch.tensor(ctx, dtype=torch.int32)
        meta.block_size = self.block_size
        meta.cpu_parallel = self.cpu_parallel
        if q > 1 and bool((lengths < q).any()):
            meta.decode_valid = (torch.arange(q)[None, :] < lengths[:, None]).to(self.device)


def _extends(span: PrefillSpan, row: int, n: int) -> bool:
    """True when a whole prompt of `n` tokens at `row` can join `span` (whole prompts of n, ending at row)."""
    return span.slots is None and span.end == row and span.context_len == n
