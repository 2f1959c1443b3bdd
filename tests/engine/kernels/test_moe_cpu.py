"""The routed-experts C kernel against a torch reference, its invariances and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.config import ModelConfig
from pdserve.engine.kernels import moe_cpu
from pdserve.engine.layers.linear import CpuGemm
from pdserve.engine.layers.moe import KERNEL_MAX_TOKENS_PER_EXPERT, SparseMoE

needs_kernel = pytest.mark.skipif(not moe_cpu.available(), reason="MoE CPU kernel not built")


def _experts(num_experts: int, hidden: int, inter: int, seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    gate_up = [torch.randn(2 * inter, hidden, generator=g) * scale for _ in range(num_experts)]
    down = [torch.randn(hidden, inter, generator=g) * scale for _ in range(num_experts)]
    return gate_up, down


def _route(tokens: int, k: int, num_experts: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    return weights, ids


def _reference(x, weights, ids, gate_up, down):
    """Each (token, slot) through its expert with F.linear, in float64 to judge both sides."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            gate, up = F.linear(x[t].double(), gate_up[e].double()).chunk(2)
            out[t] += weights[t, s].double() * F.linear(F.silu(gate) * up, down[e].double())
    return out


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 8, 32])
# Sizes chosen so the tiles have tails (rows not a multiple of 3 or 4), and one hidden size
# above the kernel's 1024-float k-block.
@pytest.mark.parametrize(
    ("num_experts", "k", "hidden", "inter"), [(4, 1, 32, 16), (8, 2, 56, 40), (64, 6, 1032, 24)]
)
def test_kernel_matches_the_reference(gemm, tokens, num_experts, k, hidden, inter):
    gate_up, down = _experts(num_experts, hidden, inter)
    kernel = moe_cpu.RoutedExpertsKernel(gate_up, down, split_min_expert_bytes=0)  # always split
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2))
    weights, ids = _route(tokens, k, num_experts)
    expected = _reference(x, weights, ids, gate_up, down)
    for parallel in (gemm.parallel, CpuGemm(1, "openblas").parallel):
        got = kernel(x, weights, ids, parallel)
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_tokens_result_does_not_depend_on_its_batch(gemm):
    # The header's promise: fixed summation orders, so the same row alone, among other rows,
    # and split over two threads differently gives the same bits.
    gate_up, down = _experts(16, 64, 32)
    kernel = moe_cpu.RoutedExpertsKernel(gate_up, down, split_min_expert_bytes=0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g)
    weights, ids = _route(40, 4, 16)
    batch = kernel(x, weights, ids, gemm.parallel)
    for t in (0, 17, 39):
        alone = kernel(x[t : t + 1], weights[t : t + 1], ids[t : t + 1], gemm.parallel)
        assert torch.equal(alone[0], batch[t])
    half = kernel(x[10:30], weights[10:30], ids[10:30], CpuGemm(1, "openblas").parallel)
    assert torch.equal(half, batch[10:30])


@needs_kernel
def test_silu_holds_for_large_gate_values(gemm):
    # Gate values far outside exp's range: the kernel's exponential clamps instead of
    # overflowing, and SiLU still gives g (large positive) or 0 (large negative).
    gate_up, down = _experts(2, 16, 8, scale=1.0)
    kernel = moe_cpu.RoutedExpertsKernel(gate_up, down)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(4)) * 100
    weights = torch.full((6, 1), 1.0)
    ids = torch.tensor([[0], [1], [0], [1], [0], [1]])
    got = kernel(x, weights, ids, gemm.parallel)
    assert torch.isfinite(got).all()
    expected = _reference(x, weights, ids, gate_up, down)
    # Outputs reach ~1e4 here, so fp32 rounding alone is ~1e-2; a wrong SiLU is off by its input.
    scale = float(expected.abs().max())
    assert scale > 1e3
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5 * scale)


@needs_kernel
def test_bad_inputs_are_refused_with_a_clear_error(gemm):
    gate_up, down = _experts(4, 16, 8)
    kernel = moe_cpu.RoutedExpertsKernel(gate_up, down)
    x = torch.randn(2, 16)
    weights = torch.ones(2, 1)
    with pytest.raises(ValueError, match="out of range"):
        kernel(x, weights, torch.tensor([[0], [4]]), gemm.parallel)
    with pytest.raises(ValueError, match="int64"):
        kernel(x, weights, torch.tensor([[0], [1]], dtype=torch.int32), gemm.parallel)
    with pytest.raises(ValueError, match="shape"):
        moe_cpu.RoutedExpertsKernel(gate_up, [d.t().contiguous() for d in down])
    with pytest.raises(ValueError, match="multiples of 8"):
        moe_cpu.RoutedExpertsKernel(*_experts(2, 12, 8))


def _sparse_moe(num_experts: int = 8, hidden: int = 32, inter: int = 16, bias: bool = False) -> SparseMoE:
    config = ModelConfig(
        architecture="Ernie4_5_MoeForCausalLM",
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_num_experts=num_experts,
        moe_k=2,
        moe_intermediate_size=inter,
        moe_num_shared_experts=1,
        use_bias=bias,
    )
    moe = SparseMoE(config, torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return moe


def test_sparse_moe_runs_decode_steps_through_the_kernel_and_prefills_through_blas(gemm):
    moe = _sparse_moe()
    g = torch.Generator().manual_seed(6)
    small = torch.randn(KERNEL_MAX_TOKENS_PER_EXPERT * 8 // 2, 32, generator=g)  # top-2 of 8 experts
    large = torch.randn(small.shape[0] + 1, 32, generator=g)
    with torch.inference_mode():
        expected = [moe._routed(x, *moe.route(x)) + moe.shared_experts(x) for x in (small, large)]
        moe.pack_for_cpu(gemm)
        # The experts keep the checkpoint's row-major [out, in] storage the kernel reads.
        assert all(
            e.gate_proj.weight.is_contiguous() and e.down_proj.weight.is_contiguous() for e in moe.experts
        )
        assert moe._uses_kernel(small) == moe_cpu.available()
        assert not moe._uses_kernel(large)
        for x, want in zip((small, large), expected):
            torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5)


def test_sparse_moe_with_biases_keeps_the_torch_path(gemm):
    moe = _sparse_moe(bias=True)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = moe._routed(x, *moe.route(x)) + moe.shared_experts(x)
        moe.pack_for_cpu(gemm)
        assert moe._kernel is None and not moe._uses_kernel(x)
        torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(("num_experts", "k"), [(4, 1), (8, 2), (64, 6)])
def test_route_matches_the_torch_router(num_experts, k):
    moe = _sparse_moe(num_experts=num_experts)
    moe.top_k = k
    g = torch.Generator().manual_seed(8)
    # A correction bias large enough to change which experts win, not their weights.
    with torch.no_grad():
        moe.moe_statics.e_score_correction_bias.copy_(torch.rand(1, num_experts, generator=g) * 0.3)
    x = torch.randn(50, 32, generator=g)
    want_weights, want_ids = moe.route(x)
    bias = moe.moe_statics.e_score_correction_bias.view(-1)
    weights, ids = moe_cpu.route(x, moe.gate.weight, bias, k, moe.norm_min)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    unbiased, unbiased_ids = moe_cpu.route(x, moe.gate.weight, None, k, moe.norm_min)
    assert not torch.equal(unbiased_ids, ids)  # the bias did change choices
    torch.testing.assert_close(unbiased.sum(-1), torch.ones(50))


@needs_kernel
def test_route_refuses_bad_shapes():
    gate = torch.randn(8, 32)
    with pytest.raises(ValueError, match="fp32"):
        moe_cpu.route(torch.randn(2, 24), gate, None, 2, 1e-12)
    with pytest.raises(ValueError, match="8 values"):
        moe_cpu.route(torch.randn(2, 32), gate, torch.zeros(7), 2, 1e-12)
    with pytest.raises(ValueError, match="k <= E"):
        moe_cpu.route(torch.randn(2, 32), gate, None, 9, 1e-12)
