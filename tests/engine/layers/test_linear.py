"""The CPU GEMM path: same values as F.linear, any batch size, state_dict untouched by packing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.layers.linear import CpuGemm, Linear, is_input_major, linear, pack_input_major


@pytest.fixture(scope="module")
def gemm():
    g = CpuGemm(2)
    yield g
    g.close()


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 48), (256, 8200), (1024, 1030)])
def test_split_gemm_matches_f_linear(gemm, rows, in_features, out_features):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(2, rows, in_features, generator=g)
    packed = pack_input_major(weight)
    assert is_input_major(packed) and torch.equal(packed, weight)
    got = linear(x, packed, bias, gemm)
    assert got.shape == (2, rows, out_features)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_split_gemm_is_deterministic_and_close_to_unsplit(gemm):
    # OpenBLAS's edge kernels may round a column chunk's border differently, so the split
    # product is close to the unsplit one, not bit-equal; run to run it must be bit-equal.
    g = torch.Generator().manual_seed(0)
    w = pack_input_major(torch.randn(4096, 512, generator=g))
    x = torch.randn(16, 512, generator=g)
    first = linear(x, w, gemm=gemm)
    assert all(torch.equal(first, linear(x, w, gemm=gemm)) for _ in range(5))
    torch.testing.assert_close(first, linear(x, w, gemm=CpuGemm(1)), rtol=1e-5, atol=1e-4)


def test_packing_keeps_names_shapes_and_values(gemm):
    layer = Linear(32, 16, bias=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(5, 32)
    expected = layer(x)
    layer.pack_for_cpu(gemm)
    assert layer.gemm is gemm and is_input_major(layer.weight)
    after = layer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_non_fp32_stays_on_f_linear(gemm):
    layer = Linear(8, 4, dtype=torch.bfloat16)
    layer.pack_for_cpu(gemm)
    assert layer.gemm is None and layer.weight.is_contiguous()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
