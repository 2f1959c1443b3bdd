"""Attention of a step's short sequences straight from the paged KV cache, through `paged_attention_cpu.c`.

The C kernel (see its header for why) is optional at install; `available()` says whether it
was built, and `supports()` whether it takes these tensors. `layers/attention.py` keeps its
gather + SDPA path for everything else (GPUs, bf16, a kernel that was not built).
"""

from __future__ import annotations

import torch

from pdserve.engine.kernels import CpuParallel, fp32_on_cpu

try:
    from pdserve.engine.kernels import _paged_attention_cpu
except ImportError:  # built as an optional extension: no compiler at install time
    _paged_attention_cpu = None

# Work (multiply-adds x 2, QK and PV) below which the call runs on the calling thread alone:
# handing a part to a second thread costs ~50 us. Above it two parts pay mostly by reading K/V
# from memory twice as fast (ERNIE 4.5 0.3B's shape at batch 8, 200 positions: 185 against
# 320 us; at batch 32 in the engine, 1.8 against 2.9 ms per layer).
_SPLIT_MIN_FLOPS = 2_000_000


def available() -> bool:
    """True when the C kernel was built and imports."""
    return _paged_attention_cpu is not None


def supports(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """True when the kernel is built and takes these: fp32 CPU tensors, head_dim a multiple of 8."""
    return _paged_attention_cpu is not None and fp32_on_cpu(q, kv_cache) and q.shape[-1] % 8 == 0


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    rows: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    parallel: CpuParallel | None = None,
) -> None:
    """Causal attention of the short sequences' query rows, written into those rows of `out`.

    q, out: [T, H, D] fp32 contiguous; kv_cache: one layer's [2, num_blocks, block_size, KVH, D]
    (the step's new K/V already written). Sequence b has `query_lens[b]` query rows, rows
    `rows[b, :query_lens[b]]` of q ([B, Q] int64; later columns are ignored), and context
    `context_lens[b]` (int32, its new tokens included); its query j sits at position
    context - query_len + j and sees positions up to its own, whose K/V it reads at slot
    `block_tables[b, pos // block_size] * block_size + pos % block_size` ([B, max_blocks]
    int32). Other rows of `out` are left as they are. `parallel(fn, max_parts)` runs
    `fn(part, parts)` for every part at once (`CpuGemm.parallel`); None runs one part here.
    """
    if _paged_attention_cpu is None:
        raise RuntimeError(
            "the paged attention CPU kernel was not built (see engine/kernels/paged_attention_cpu.c)"
        )
    if q.dim() != 3 or out.shape != q.shape:
        raise ValueError("paged attention kernel: q and out must both be [T, H, D]")
    t, h, d = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != d or h % kv_cache.shape[3]:
        raise ValueError(
            "paged attention kernel: kv_cache must be [2, num_blocks, block_size, KVH, D] with "
            "q's D and H a multiple of KVH"
        )
    for name, x in (("q", q), ("out", out), ("kv_cache", kv_cache)):
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"paged attention kernel: {name} must be a contiguous fp32 CPU tensor")
    b = rows.shape[0]
    for name, x, dtype, dims in (
        ("rows", rows, torch.int64, 2),
        ("query_lens", query_lens, torch.int32, 1),
        ("context_lens", context_lens, torch.int32, 1),
        ("block_tables", block_tables, torch.int32, 2),
    ):
        if (
            x.dtype != dtype
            or x.dim() != dims
            or x.shape[0] != b
            or x.device.type != "cpu"
            or not x.is_contiguous()
        ):
            raise ValueError(
                f"paged attention kernel: {name} must be a contiguous {dtype} CPU tensor of {dims} "
                f"dimensions, one row per sequence"
            )
    if b == 0:
        return
    _, num_blocks, block_size, kv_heads, _ = kv_cache.shape
    args = (
        q.data_ptr(),
        kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(),
        rows.data_ptr(),
        query_lens.data_ptr(),
        context_lens.data_ptr(),
        block_tables.data_ptr(),
        out.data_ptr(),
        scale,
        t,
        b,
        max(rows.shape[1], 1),
        h,
        kv_heads,
        d,
        block_size,
        block_tables.shape[1],
        num_blocks,
    )
    # Each query head costs a dot product and a weighted row per (query row, context position).
    if parallel is None or 4 * h * d * _paged_attention_cpu.work(*args[4:6], b) < _SPLIT_MIN_FLOPS:
        _paged_attention_cpu.attend(*args, 0, 1)
    else:
        parallel(lambda part, parts: _paged_attention_cpu.attend(*args, part, parts), None)
