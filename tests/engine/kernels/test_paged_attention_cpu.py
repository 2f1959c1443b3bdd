"""The paged decode-attention C kernel against a float64 reference and the SDPA path, its invariances and errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pdserve.engine.kernels import paged_attention_cpu
from pdserve.engine.layers.attention import paged_attention
from pdserve.engine.layers.linear import CpuGemm
from pdserve.engine.model_runner import MAX_BATCHED_QUERY, KVCache, ModelRunner

needs_kernel = pytest.mark.skipif(
    not paged_attention_cpu.available(), reason="attention CPU kernel not built"
)


def _three_parts(fn, max_parts):
    """A `parallel` that runs three parts one after the other: more parts than pairs, at times."""
    for part in range(3):
        fn(part, 3)


class Problem:
    """Random short sequences over a random cache whose blocks are handed out shuffled.

    The sequences' query rows are scattered over T rows, with a few rows of no sequence (a
    step's prefill rows, say), which the kernel must leave alone.
    """

    def __init__(
        self,
        qlens: list[int],
        ctxs: list[int],
        heads: int,
        kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        seed: int = 0,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        blocks = [-(-c // block_size) for c in ctxs]
        num_blocks = sum(blocks) + 3
        self.cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
        free = torch.randperm(num_blocks, generator=g).tolist()
        self.tables = [[free.pop() for _ in range(n)] for n in blocks]
        self.qlens, self.ctxs, self.block_size = qlens, ctxs, block_size
        t = sum(qlens) + 3
        order = torch.randperm(t, generator=g).tolist()
        self.rows = [[order.pop() for _ in range(n)] for n in qlens]
        self.q = torch.randn(t, heads, head_dim, generator=g)
        self.scale = head_dim**-0.5

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """rows [B, Q] (padded with each sequence's last row), query and context lengths, block tables."""
        q = max(self.qlens)
        width = max(len(t) for t in self.tables)
        return (
            torch.tensor([r + [r[-1]] * (q - len(r)) for r in self.rows], dtype=torch.long),
            torch.tensor(self.qlens, dtype=torch.int32),
            torch.tensor(self.ctxs, dtype=torch.int32),
            torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32),
        )

    def kernel(self, parallel=None) -> torch.Tensor:
        out = torch.full_like(self.q, float("nan"))
        paged_attention_cpu.paged_decode_attention(
            self.q, self.cache, *self.tensors(), self.scale, out, parallel
        )
        return out

    def reference(self) -> torch.Tensor:
        """Each query row by the definition, in float64; NaN in rows of no sequence."""
        out = torch.full(self.q.shape, float("nan"), dtype=torch.float64)
        heads, kv_heads = self.q.shape[1], self.cache.shape[3]
        k_flat = self.cache[0].flatten(0, 1).double()
        v_flat = self.cache[1].flatten(0, 1).double()
        bs = self.block_size
        for rows, n, ctx, table in zip(self.rows, self.qlens, self.ctxs, self.tables):
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)])
            k = k_flat[slots].repeat_interleave(heads // kv_heads, dim=1)  # [C, H, D]
            v = v_flat[slots].repeat_interleave(heads // kv_heads, dim=1)
            for j, row in enumerate(rows):
                seen = ctx - n + j + 1
                scores = torch.einsum("hd,chd->hc", self.q[row].double(), k[:seen]) * self.scale
                out[row] = torch.einsum("hc,chd->hd", scores.softmax(-1), v[:seen])
        return out


def _assert_matches_reference(problem: Problem, got: torch.Tensor) -> None:
    expected = problem.reference()
    untouched = expected.isnan().all(-1).all(-1)
    assert untouched.sum() == 3 and got[untouched].isnan().all()
    torch.testing.assert_close(got[~untouched].double(), expected[~untouched], rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (16, 2)])  # GQA ratios 1, 4, 8
# 8 and 40 leave the last 64-float chunk of a row partly used; 136 is two chunks and a tail.
@pytest.mark.parametrize("head_dim", [8, 32, 40, 64, 128, 136])
def test_decodes_match_the_reference(gemm, heads, kv_heads, head_dim):
    # Contexts around the kernel's 16-position tiles and the blocks: shorter than a tile,
    # exactly one, one past, and long ones not a multiple of anything.
    ctxs = [1, 15, 16, 17, 3, 100, 257, 33, 48, 2, 511]
    problem = Problem([1] * len(ctxs), ctxs, heads, kv_heads, head_dim, seed=head_dim)
    for parallel in (None, gemm.parallel, _three_parts):
        _assert_matches_reference(problem, problem.kernel(parallel))


@needs_kernel
@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 32), (16, 2, 128), (8, 1, 64)])
def test_mixed_query_lengths_match_the_reference(gemm, block_size, heads, kv_heads, head_dim):
    # Speculative verifications (up to 17 rows) next to decodes: the padded rows of shorter
    # sequences are not attended, and each row sees the context up to its own position.
    qlens = [1, MAX_BATCHED_QUERY, 5, 2, 17, 1, 9]
    ctxs = [40, 17, 5, 300, 18, 1, 129]
    problem = Problem(qlens, ctxs, heads, kv_heads, head_dim, block_size, seed=block_size)
    for parallel in (None, gemm.parallel, _three_parts):
        _assert_matches_reference(problem, problem.kernel(parallel))


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 32])
def test_batches_of_decodes_match_the_reference(gemm, batch):
    g = torch.Generator().manual_seed(batch)
    ctxs = torch.randint(1, 260, (batch,), generator=g).tolist()
    problem = Problem([1] * batch, ctxs, 8, 2, 32, seed=batch)
    _assert_matches_reference(problem, problem.kernel(gemm.parallel))


@needs_kernel
def test_a_querys_result_depends_only_on_its_own_context(gemm):
    # The header's promise: tiles start at absolute positions and every sum runs in a fixed
    # order, so a row gives the same bits alone, in a batch, split over threads, and as one
    # row of a verification rather than a decode at the same position.
    qlens, ctxs = [1, 6, 1, 3], [70, 100, 9, 33]
    problem = Problem(qlens, ctxs, 8, 2, 32, seed=11)
    real = [row for rows in problem.rows for row in rows]  # the others are NaN, never equal
    batch = problem.kernel(gemm.parallel)[real]
    assert torch.equal(problem.kernel(None)[real], batch)
    assert torch.equal(problem.kernel(_three_parts)[real], batch)
    batch = dict(zip(real, batch))
    for b, (rows, n, ctx) in enumerate(zip(problem.rows, qlens, ctxs)):
        for j, row in enumerate(rows):
            alone = Problem([1], [ctx - n + j + 1], 8, 2, 32, seed=11)
            alone.cache, alone.tables, alone.q = problem.cache, [problem.tables[b]], problem.q
            alone.rows = [[row]]
            assert torch.equal(alone.kernel(None)[row], batch[row])


@needs_kernel
def test_large_scores_stay_finite():
    # Scores in the thousands: the running maximum keeps every exponent <= 0.
    problem = Problem([1, 4], [300, 50], 8, 2, 32, seed=12)
    problem.q *= 300
    got = problem.kernel()
    assert torch.isfinite(got[~got.isnan().all(-1).all(-1)]).all()
    _assert_matches_reference(problem, got)


@needs_kernel
def test_bad_inputs_are_refused_with_a_clear_error():
    problem = Problem([1, 2], [20, 40], 8, 2, 32)
    rows, qlens, ctxs, tables = problem.tensors()
    cache, q, scale = problem.cache, problem.q, problem.scale

    def call(**changes):
        args = dict(q=q, kv_cache=cache, rows=rows, query_lens=qlens, context_lens=ctxs, block_tables=tables)
        args |= changes
        paged_attention_cpu.paged_decode_attention(**args, scale=scale, out=torch.empty_like(args["q"]))

    call()  # the unchanged problem is fine
    with pytest.raises(ValueError, match="block id is out of range"):
        call(block_tables=tables.clone().fill_(cache.shape[1]))
    with pytest.raises(ValueError, match="query row is out of range"):
        call(rows=rows + q.shape[0])
    with pytest.raises(ValueError, match="query length"):
        call(query_lens=torch.tensor([1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="shorter than its query length"):
        call(context_lens=torch.tensor([20, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="longer than its block table"):
        call(context_lens=torch.tensor([20, 41 + 16 * tables.shape[1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="q must be a contiguous fp32"):
        call(q=q.bfloat16())
    with pytest.raises(ValueError, match=r"block_tables must be a contiguous torch\.int32"):
        call(block_tables=tables.long())
    with pytest.raises(ValueError, match="one row per sequence"):
        call(query_lens=qlens[:1])
    with pytest.raises(ValueError, match="multiple of KVH"):
        call(kv_cache=torch.zeros(2, 4, 16, 3, 32))
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        call(q=q.flatten(1))


def test_supports_only_fp32_cpu_tensors_with_head_dim_a_multiple_of_8():
    q, cache = torch.zeros(3, 4, 32), torch.zeros(2, 4, 16, 2, 32)
    assert paged_attention_cpu.supports(q, cache) == paged_attention_cpu.available()
    assert not paged_attention_cpu.supports(q.bfloat16(), cache.bfloat16())
    assert not paged_attention_cpu.supports(torch.zeros(3, 4, 12), torch.zeros(2, 4, 16, 2, 12))


def _runner(problem: Problem, gemm: CpuGemm | None) -> ModelRunner:
    """A ModelRunner over the problem's cache, for its metadata (`spans_meta`)."""
    _, num_blocks, block_size, kv_heads, head_dim = problem.cache.shape
    cache = KVCache(1, num_blocks, block_size, kv_heads, head_dim, torch.float32, torch.device("cpu"))
    cache.tensor[0] = problem.cache
    model = SimpleNamespace(num_kv_layers=1)
    parallel = gemm.parallel if gemm is not None else None
    return ModelRunner(model, cache, torch.device("cpu"), cpu_parallel=parallel)  # type: ignore[arg-type]


def _step(problem: Problem, runner: ModelRunner, dtype: torch.dtype = torch.float32):
    """paged_attention for the problem's sequences, their last `qlens` tokens new this step."""
    starts = [c - n for c, n in zip(problem.ctxs, problem.qlens)]
    meta = runner.spans_meta(problem.tables, starts, problem.qlens)
    # spans_meta numbers the new tokens' rows 0..T-1 in sequence order.
    t = sum(problem.qlens)
    g = torch.Generator().manual_seed(5)
    heads, (kv_heads, head_dim) = problem.q.shape[1], problem.cache.shape[3:]
    q = torch.randn(t, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    cache = runner.kv_cache.layer(0).to(dtype)
    return paged_attention(q, k, v, cache, meta, problem.scale), meta, cache


@needs_kernel
@pytest.mark.parametrize(
    ("qlens", "ctxs"), [([1] * 6, [3, 90, 17, 200, 1, 64]), ([1, 5, 17, 2], [33, 5, 40, 2])]
)
def test_paged_attention_uses_the_kernel_and_agrees_with_sdpa(gemm, monkeypatch, qlens, ctxs):
    problem = Problem(qlens, ctxs, 8, 2, 32, seed=13)
    runner = _runner(problem, gemm)
    with torch.inference_mode():
        kernel_out, meta, cache = _step(problem, runner)
        # The kernel path never builds the gather path's slots and mask.
        assert meta._gather is None and meta.cpu_parallel == gemm.parallel
        kernel_cache = cache.clone()
        monkeypatch.setattr(paged_attention_cpu, "supports", lambda q, kv_cache: False)
        sdpa_out, meta, cache = _step(problem, _runner(problem, gemm))
        assert meta._gather is not None
    # Both wrote this step's K/V into the cache the same way, then attended.
    assert torch.equal(kernel_cache, cache)
    torch.testing.assert_close(kernel_out, sdpa_out, rtol=1e-5, atol=1e-5)


def test_the_gather_path_still_serves_other_dtypes(gemm):
    # bf16 (and any device other than the CPU) keeps the gather + SDPA path, whose slots and
    # mask the metadata now derives on first use from the block tables and lengths.
    problem = Problem([1, 3, 2], [20, 7, 45], 8, 2, 32, seed=14)
    runner = _runner(problem, gemm)
    with torch.inference_mode():
        out32, _, _ = _step(problem, runner)
        out16, meta, _ = _step(problem, _runner(problem, gemm), torch.bfloat16)
    assert meta.decode_slots.shape == (3, 45) and meta.decode_mask.shape == (3, 1, 3, 45)
    torch.testing.assert_close(out16.float(), out32, rtol=0.05, atol=0.05)


@needs_kernel
def test_the_callers_denormals_survive_a_call(gemm):
    # The kernel flushes denormals to zero while it computes (see run_part); the thread's
    # floating-point mode must be back as it was afterwards, on every thread that ran a part.
    problem = Problem([1, 1, 1], [300, 40, 99], 8, 2, 32, seed=15)
    problem.kernel(gemm.parallel)
    tiny = torch.tensor([1e-38]) * torch.tensor([1e-3])  # 1e-41, a denormal
    assert tiny.item() != 0.0
    results = list(gemm._pool.map(lambda _: (torch.tensor([1e-38]) * torch.tensor([1e-3])).item(), range(4)))
    assert all(r != 0.0 for r in results)
