"""The quantized-matrix C kernels against torch references: products, dequantization, the
quantized routed experts, and the convolutional code's encoder (against exhaustive search)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.kernels import moe_cpu, quant_cpu
from pdserve.engine.quantization import formats

needs_kernel = pytest.mark.skipif(not quant_cpu.available(), reason="quant CPU kernel not built")
FORMATS = ("q8", "q4", "q2", "ccq")


def _reference(q: formats.QuantizedWeight) -> torch.Tensor:
    """The matrix decoded in torch (float64), independent of the C decoding."""
    levels = q.levels().double().view(q.out_features, -1, q.group)
    return (levels * q.scale.double()[..., None] + q.offset.double()[..., None]).view(q.out_features, -1)


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", [16, 64])
def test_products_read_packed_weights_correctly(fmt, group, gemm):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(67, 128, generator=g)  # an odd row count: the kernel's 2-row tiles have a tail
    q = formats.quantize(w, fmt, group)
    ref = _reference(q)
    torch.testing.assert_close(q.dequantize().double(), ref, rtol=0, atol=1e-6)
    for m in (1, 2, 3, 4, 5, 9):
        x = torch.randn(m, 128, generator=g)
        got = quant_cpu.matmul(q, x)
        torch.testing.assert_close(got.double(), x.double() @ ref.t(), rtol=1e-5, atol=1e-4)
        # Split over the threads, the same rows come out bit for bit, whatever the batch.
        assert torch.equal(quant_cpu.matmul(q, x, gemm.parallel), got) or q.out_features * 128 < 1 << 20
        assert torch.equal(quant_cpu.matmul(q, x[:1]), got[:1])


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_many_row_products_decode_blocks_correctly(fmt, gemm):
    g = torch.Generator().manual_seed(5)
    # 37 weight rows: two 16-row blocks and a tail; token rows not a multiple of the 6-row tile.
    w = torch.randn(37, 192, generator=g)
    q = formats.quantize(w, fmt, 64)
    ref = _reference(q)
    for m in (1, 6, 11, 40):
        x = torch.randn(m, 192, generator=g)
        got = quant_cpu.matmul_dequantized(q, x)
        torch.testing.assert_close(got.double(), x.double() @ ref.t(), rtol=1e-5, atol=1e-4)
        # A token row's result does not depend on the rows beside it.
        assert torch.equal(quant_cpu.matmul_dequantized(q, x[:1]), got[:1])


@needs_kernel
def test_large_products_split_over_threads_match_one_thread(gemm):
    q = formats.quantize(torch.randn(2048, 1024, generator=torch.Generator().manual_seed(2)), "q4", 64)
    x = torch.randn(3, 1024)
    assert torch.equal(quant_cpu.matmul(q, x, gemm.parallel), quant_cpu.matmul(q, x))
    x = torch.randn(20, 1024)
    assert torch.equal(quant_cpu.matmul_dequantized(q, x, gemm.parallel), quant_cpu.matmul_dequantized(q, x))


@needs_kernel
def test_ccq_encoder_finds_the_best_bit_string():
    """Exhaustive search over every string of a 8-weight row (2 * 8 + 4 bits) agrees with Viterbi."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 8, generator=g)
    scale, offset = torch.tensor([[0.05]]), torch.tensor([[-1.6]])
    packed = quant_cpu.ccq_encode(w, scale, offset, 8)
    got = formats.QuantizedWeight(packed, scale.half(), offset.half(), "ccq", 8, 8)
    got_cost = float(((got.levels().float() * 0.05 - 1.6) - w).square().sum())
    bits = torch.tensor(list(itertools.product([0, 1], repeat=20)), dtype=torch.int32)  # [2^20, 20]
    codes = sum(bits[:, i : i + 16 : 2] << i for i in range(6))  # [2^20, 8] windows
    values = ((codes * formats.CCQ_MUL) & 63).float() * 0.05 - 1.6
    best = float((values - w).square().sum(1).min())
    assert got_cost == pytest.approx(best, rel=1e-5)


def _tie_heavy_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows whose codes tie: constant groups halfway between two levels or on one, zero scales
    (all 64 codes decode alike), a NaN weight (every total unordered), and random rows beside."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(11, 128, generator=g)
    scale = torch.full((11, 2), 0.125)
    offset = torch.full((11, 2), -4.0)
    w[0], w[1], w[2] = 0.5, -4.0 + 0.125 * 7.5, -4.0 + 0.125 * 20  # between levels, on a level
    w[3, :64] = 1.0
    scale[4:6] = 0.0  # every code decodes to the offset
    w[6, 70] = float("nan")
    return w, scale, offset


@needs_kernel
@pytest.mark.parametrize("path", quant_cpu.KERNEL_PATHS)
def test_every_ccq_encoder_build_gives_the_scalar_encoders_bits(path, gemm):
    """The encoder's builds (AVX-512: the 16 states in one vector, 4 rows at once; scalar) pick
    the same bit strings, ties included, whole rows or split over the threads; and the whole
    quantization (search, refit, search) gives the same bytes."""
    if path not in quant_cpu.kernel_paths():
        pytest.skip(f"this CPU does not run the {path} build")
    g = torch.Generator().manual_seed(8)
    cases = [_tie_heavy_rows()]
    for n, k, group in ((37, 320, 64), (4, 64, 8), (1, 96, 32), (515, 1024, 128)):  # odd counts: tile tails
        w = torch.randn(n, k, generator=g) * 0.02
        scale = (torch.rand(n, k // group, generator=g) * 0.002 + 1e-4).half().float()
        offset = (-scale * 31.5 + torch.randn(n, k // group, generator=g) * 1e-3).half().float()
        cases.append((w, scale, offset))
    for w, scale, offset in cases:
        group = w.shape[1] // scale.shape[1]
        with quant_cpu.use_kernel_path("default"):
            want = quant_cpu.ccq_encode(w, scale, offset, group)
        with quant_cpu.use_kernel_path(path):
            assert torch.equal(quant_cpu.ccq_encode(w, scale, offset, group), want)
            assert torch.equal(quant_cpu.ccq_encode(w, scale, offset, group, gemm.parallel), want)
    w = torch.randn(203, 256, generator=g)
    with quant_cpu.use_kernel_path("default"):
        want_q = formats.quantize(w, "ccq", 64)
    with quant_cpu.use_kernel_path(path):
        got_q = formats.quantize(w, "ccq", 64, gemm.parallel)
    for name in ("packed", "scale", "offset"):
        assert torch.equal(getattr(got_q, name), getattr(want_q, name)), name


def _check_routed_experts(fmt: str, group: int, gemm) -> None:
    g = torch.Generator().manual_seed(4)
    hidden, inter, experts, k = 128, 64, 6, 2
    gate_up = [
        formats.quantize(torch.randn(2 * inter, hidden, generator=g) * 0.1, fmt, group)
        for _ in range(experts)
    ]
    down = [
        formats.quantize(torch.randn(hidden, inter, generator=g) * 0.1, fmt, group) for _ in range(experts)
    ]
    kernel = moe_cpu.RoutedExpertsKernel.quantized(gate_up, down)
    x = torch.randn(5, hidden, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(5)])
    weights = torch.rand(5, k, generator=g)
    out = kernel(x, weights, ids, gemm.parallel)
    want = torch.zeros(5, hidden, dtype=torch.float64)
    for t, s in itertools.product(range(5), range(k)):
        e = int(ids[t, s])
        gate, up = F.linear(x[t].double(), _reference(gate_up[e])).chunk(2)
        want[t] += weights[t, s].double() * F.linear(F.silu(gate) * up, _reference(down[e]))
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.skipif(not moe_cpu.available(), reason="MoE CPU kernel not built")
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_routed_experts_match_the_dequantized_reference(fmt, gemm):
    _check_routed_experts(fmt, 32, gemm)


@needs_kernel
@pytest.mark.parametrize("path", quant_cpu.KERNEL_PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_kernel_path_matches_the_reference(path, fmt, gemm):
    """Each build of the packed product this CPU runs (AVX-512, AVX2, plain x86-64), forced in
    turn: products and routed experts against the float64 reference, a token's row the same in
    any batch and any split, and within rounding of the best build's result."""
    if path not in quant_cpu.kernel_paths():
        pytest.skip(f"this CPU does not run the {path} build")
    g = torch.Generator().manual_seed(6)
    # 1024 x 1024 weights: large enough to split over the threads; groups of 16 and 32 are
    # not whole blocks for the AVX-512 q4 (32 weights), q2 and ccq (64) decoding (it hands them
    # to the AVX2 build); 128 is two of its q2/ccq blocks a group.
    for group in (16, 32, 64, 128):
        q = formats.quantize(torch.randn(1026, 1024, generator=g), fmt, group)
        ref = _reference(q)
        for m in (1, 2, 3, 4, 5, 8):
            x = torch.randn(m, 1024, generator=g)
            best = quant_cpu.matmul(q, x)
            with quant_cpu.use_kernel_path(path):
                assert quant_cpu._quant_cpu.qdot_path() == quant_cpu.KERNEL_PATHS.index(path)
                got = quant_cpu.matmul(q, x)
                torch.testing.assert_close(got.double(), x.double() @ ref.t(), rtol=1e-5, atol=1e-4)
                assert torch.equal(quant_cpu.matmul(q, x, gemm.parallel), got)
                assert torch.equal(quant_cpu.matmul(q, x[:1]), got[:1])
                assert torch.equal(quant_cpu.matmul(q, x[-1:]), got[-1:])
            torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-4)
        # Prefill-sized products: every build sums each output over k in order with FMAs, so
        # the AVX-512 GEMM gives the AVX2 build's bits.
        x = torch.randn(29, 1024, generator=g)
        best = quant_cpu.matmul_dequantized(q, x)
        with quant_cpu.use_kernel_path(path):
            assert torch.equal(quant_cpu.matmul_dequantized(q, x, gemm.parallel), best)
        if moe_cpu.available():
            with quant_cpu.use_kernel_path(path):
                _check_routed_experts(fmt, min(max(group, 32), 64), gemm)  # its down projection has K = 64
    assert quant_cpu._quant_cpu.qdot_path() == len(quant_cpu.kernel_paths()) - 1  # restored


@needs_kernel
@pytest.mark.skipif(
    "avx512" not in quant_cpu.kernel_paths(), reason="this CPU does not run the AVX-512 build"
)
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_avx512_prefill_products_give_the_avx2_builds_bits(fmt, gemm):
    """quant_gemm_avx512.h (token rows in the lanes): column blocks with a partial last one
    (800 = 3 x 256 + 32), token chunks of 32 and 16 with padding, 96-row blocks with tails; against
    the float64 reference, bit for bit the AVX2 build's, and a row the same in any batch or split."""
    g = torch.Generator().manual_seed(7)
    q = formats.quantize(torch.randn(1411, 800, generator=g), fmt, 32)  # over 1M weights: split
    ref = _reference(q)
    for m in (9, 16, 17, 40, 70):
        x = torch.randn(m, 800, generator=g)
        got = quant_cpu.matmul_dequantized(q, x)
        torch.testing.assert_close(got.double(), x.double() @ ref.t(), rtol=1e-5, atol=1e-4)
        with quant_cpu.use_kernel_path("avx2"):
            assert torch.equal(quant_cpu.matmul_dequantized(q, x), got)
        assert torch.equal(quant_cpu.matmul_dequantized(q, x, gemm.parallel), got)
        assert torch.equal(quant_cpu.matmul_dequantized(q, x[1:]), got[1:])
        assert torch.equal(quant_cpu.matmul_dequantized(q, x[-1:]), got[-1:])


@needs_kernel
def test_a_path_the_cpu_lacks_is_refused():
    with (
        pytest.raises(ValueError, match="kernel path 'sse9' is not one this CPU runs"),
        quant_cpu.use_kernel_path("sse9"),
    ):
        pass


@needs_kernel
def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"does not divide layer\.x's 100 input columns"):
        formats.quantize(torch.randn(4, 100), "q4", 32, name="layer.x")
    q = formats.quantize(torch.randn(4, 64), "q4", 32)
    with pytest.raises(ValueError, match=r"rows must be fp32 \[M, 64\]"):
        quant_cpu.matmul(q, torch.randn(2, 32))
