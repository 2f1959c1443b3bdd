"""The CPU GEMM path: same values as F.linear on either backend, any batch size, state_dict
untouched by packing; the backend choice by CPU vendor."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.engine import Engine
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.layers.linear import (
    CpuGemm,
    FusedInputMajor,
    FusedRowMajor,
    Linear,
    PrepackedWeight,
    default_cpu_gemm_backend,
    fuse_linears,
    is_input_major,
    linear,
    pack_input_major,
)


@pytest.fixture(scope="module", params=["torch", "openblas"])
def gemm(request):
    g = CpuGemm(2, request.param)
    yield g
    g.close()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 33])
# (1024, 4096): each thread's half is large enough that 3 rows are padded to 4 (`_small_m_matmul`).
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 48), (256, 8200), (2048, 1030), (1024, 4096)])
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


def test_gemm_is_deterministic_and_close_to_single_threaded(gemm):
    # OpenBLAS's edge kernels may round a column chunk's border differently, so the split
    # product is close to the unsplit one, not bit-equal; run to run it must be bit-equal.
    g = torch.Generator().manual_seed(0)
    w = pack_input_major(torch.randn(4096, 512, generator=g))
    x = torch.randn(16, 512, generator=g)
    first = linear(x, w, gemm=gemm)
    assert all(torch.equal(first, linear(x, w, gemm=gemm)) for _ in range(5))
    single = CpuGemm(1, gemm.backend)
    torch.testing.assert_close(first, linear(x, w, gemm=single), rtol=1e-5, atol=1e-4)


def test_numpy_matmul_writes_into_the_given_array(gemm):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 64, generator=g).numpy(), torch.randn(64, 300, generator=g).numpy()
    c = np.full((5, 300), np.nan, dtype=np.float32)
    assert gemm.matmul(a, b, c) is c
    np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("vendor", "backend"), [("AuthenticAMD", "openblas"), ("GenuineIntel", "torch"), (None, "torch")]
)
def test_default_backend_follows_the_cpu_vendor(tmp_path, vendor, backend):
    cpuinfo = tmp_path / "cpuinfo"
    if vendor is not None:  # None: no /proc/cpuinfo (not Linux)
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu avx2\n")
    assert default_cpu_gemm_backend(cpuinfo) == backend


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="cpu_gemm must be 'auto' or one of"):
        EngineConfig(model="demo", cpu_gemm="mkl")
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        CpuGemm(1, "blis")


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


@pytest.mark.parametrize("bias", [False, True])
def test_row_major_fusion_keeps_values_and_matches_separate_layers(gemm, bias):
    # bf16 is not packed for the CPU's fp32 path, so q/k/v fuse row-major into one F.linear.
    torch.manual_seed(0)
    layers = [Linear(16, n, bias=bias, dtype=torch.bfloat16) for n in (8, 4, 4)]
    for layer in layers:
        layer.pack_for_cpu(gemm)
    before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    expected = [layer(x) for layer in layers]
    fused = fuse_linears(layers, gemm)
    assert isinstance(fused, FusedRowMajor)
    for layer, state in zip(layers, before):
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())
        assert layer.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    for got, want in zip(fused(x), expected):
        torch.testing.assert_close(got, want)


def test_fusion_picks_the_packed_path_and_refuses_mixed_bias(gemm):
    packed = [Linear(16, 8), Linear(16, 8)]
    for layer in packed:
        layer.pack_for_cpu(gemm)
    assert isinstance(fuse_linears(packed, gemm), FusedInputMajor)
    mixed = [Linear(16, 8, bias=True), Linear(16, 8, bias=False)]
    assert fuse_linears(mixed, gemm) is None


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prepacked_weight_computes_f_linear(dtype, tol):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(1030, 96, generator=g).to(dtype)
    packed = PrepackedWeight.create(weight)
    if packed is None:
        pytest.skip("this torch build has no usable oneDNN linear")
    for rows in (1, 2, 7, 33):
        x = torch.randn(rows, 2 * 96, generator=g).to(dtype)[:, ::2]  # strided rows, as the model slices them
        got = packed(x)
        assert got.dtype == dtype and got.shape == (rows, 1030)
        torch.testing.assert_close(got.float(), F.linear(x, weight).float(), rtol=tol, atol=tol)
    assert PrepackedWeight.create(weight.to("meta")) is None


@pytest.mark.parametrize(("policy", "warns"), [("ACTIVE", True), (None, True), ("passive", False)])
def test_openblas_engine_warns_when_openmp_threads_spin(monkeypatch, caplog, policy, warns):
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.engine"):
        Engine(EngineConfig(model="demo", cpu_gemm="openblas", kv_cache_blocks=8))
    assert ("OMP_WAIT_POLICY is not PASSIVE" in caplog.text) == warns


@pytest.mark.parametrize(
    ("threads", "max_parts", "parts"), [(1, None, 1), (2, None, 2), (2, 1, 1), (3, 2, 2)]
)
def test_parallel_runs_every_part_once(threads, max_parts, parts):
    gemm = CpuGemm(threads, "openblas")
    seen: list[tuple[int, int]] = []
    gemm.parallel(lambda part, n: seen.append((part, n)), max_parts)
    gemm.close()
    assert sorted(seen) == [(p, parts) for p in range(parts)]
