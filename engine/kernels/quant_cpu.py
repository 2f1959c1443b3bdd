"""Products with weight-only quantized matrices on the CPU, through `quant_cpu.c`.

Optional at install like the other kernels: `available()` says whether it was built; without
it quantized matrices are dequantized in torch (slower, same numbers up to rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from pdserve.engine.kernels import CpuParallel

if TYPE_CHECKING:
    from pdserve.engine.quantization.formats import QuantizedWeight

try:
    from pdserve.engine.kernels import _quant_cpu
except ImportError:  # built as an optional extension: no compiler at install time
    _quant_cpu = None
try:  # the MoE kernel reads packed experts through the same product (quant_path.h)
    from pdserve.engine.kernels import _moe_cpu
except ImportError:
    _moe_cpu = None

# The format codes of quant_dot.h.
FORMAT_CODES = {"q8": 0, "q4": 1, "q2": 2, "ccq": 3}
# Matrices of fewer weights than this run on the calling thread alone: the hand-off to another
# thread (~50 us) costs more than half of such a product saves (see moe_cpu's note on this CPU).
_SPLIT_MIN_WEIGHTS = 1 << 20


# The builds of the decode-sized packed product (quant_path.h), slowest first: the C kernels run
# the fastest one the CPU has (AVX-512 handles q4 and q8; other formats take the AVX2 build).
KERNEL_PATHS = ("default", "avx2", "avx512")


def available() -> bool:
    """True when the C kernel was built and imports."""
    return _quant_cpu is not None


def kernel_paths() -> tuple[str, ...]:
    """The builds of the packed product this CPU can run (empty without the C kernel)."""
    if _quant_cpu is None:
        return ()
    return KERNEL_PATHS[: _quant_cpu.qdot_best_path() + 1]


@contextmanager
def use_kernel_path(name: str) -> Iterator[None]:
    """Runs the packed products (dense and MoE experts) on build `name` of `kernel_paths()`
    inside the block, for tests that check every build against the reference; not thread-safe."""
    if name not in kernel_paths():
        raise ValueError(f"kernel path {name!r} is not one this CPU runs: {kernel_paths()}")
    modules = [m for m in (_quant_cpu, _moe_cpu) if m is not None]
    before = [m.qdot_path() for m in modules]
    for m in modules:
        m.qdot_path(KERNEL_PATHS.index(name))
    try:
        yield
    finally:
        for m, code in zip(modules, before):
            m.qdot_path(code)


def _kernel():
    if _quant_cpu is None:
        raise RuntimeError("the quantized-matrix CPU kernel was not built (see engine/kernels/quant_cpu.c)")
    return _quant_cpu


def _checked(w: QuantizedWeight) -> None:
    for t in (w.packed, w.scale, w.offset):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("quantized matrices for the CPU kernel must be contiguous CPU tensors")


def matmul(w: QuantizedWeight, rows: torch.Tensor, parallel: CpuParallel | None = None) -> torch.Tensor:
    """rows [M, K] fp32 @ w.T → [M, N], reading `w` packed (for decode-sized M)."""
    return _product("matmul", w, rows, parallel)


def matmul_dequantized(
    w: QuantizedWeight, rows: torch.Tensor, parallel: CpuParallel | None = None
) -> torch.Tensor:
    """The same product for many rows (prefill-sized M): every few weight rows are decoded once
    into a cached fp32 block that all M token rows multiply, on `parallel`'s threads."""
    return _product("matmul_dequant", w, rows, parallel)


def _product(
    entry: str, w: QuantizedWeight, rows: torch.Tensor, parallel: CpuParallel | None
) -> torch.Tensor:
    kernel = getattr(_kernel(), entry)
    _checked(w)
    m, k = rows.shape
    if rows.dtype != torch.float32 or k != w.in_features:
        raise ValueError(f"quant matmul: rows must be fp32 [M, {w.in_features}], got {rows.dtype} {k}")
    rows = rows.contiguous()
    out = torch.empty(m, w.out_features, dtype=torch.float32)
    args = (
        rows.data_ptr(),
        w.packed.data_ptr(),
        w.scale.data_ptr(),
        w.offset.data_ptr(),
        out.data_ptr(),
        m,
        w.out_features,
        k,
        w.group,
        FORMAT_CODES[w.fmt],
    )
    if parallel is None or w.out_features * k < _SPLIT_MIN_WEIGHTS:
        kernel(*args, 0, 1)
    else:
        parallel(lambda part, parts: kernel(*args, part, parts), None)
    return out


def dequantize(w: QuantizedWeight, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of `w` as an fp32 [stop - start, K] matrix."""
    kernel = _kernel()
    _checked(w)
    out = torch.empty(stop - start, w.in_features, dtype=torch.float32)
    kernel.dequantize(
        w.packed.data_ptr(),
        w.scale.data_ptr(),
        w.offset.data_ptr(),
        out.data_ptr(),
        w.out_features,
        w.in_features,
        w.group,
        FORMAT_CODES[w.fmt],
        start,
        stop,
    )
    return out


def ccq_encode(
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group: int,
    parallel: CpuParallel | None = None,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The convolutional code's packed rows (uint8 [N, K/4 + 2]) for fp32 `weight` [N, K], given
    fp32 `scale` and `offset` [N, K / group]: the Viterbi search of `ccq_encode.h`. The chosen
    levels are written into `levels` (contiguous uint8 [N, K]) when given."""
    kernel = _kernel()
    n, k = weight.shape
    weight, scale, offset = weight.contiguous(), scale.contiguous(), offset.contiguous()
    if weight.dtype != torch.float32 or scale.shape != (n, k // group) or offset.shape != scale.shape:
        raise ValueError("ccq_encode: weight fp32 [N, K], scale and offset fp32 [N, K / group]")
    if levels is not None and (
        levels.dtype != torch.uint8 or levels.shape != (n, k) or not levels.is_contiguous()
    ):
        raise ValueError("ccq_encode: levels must be a contiguous uint8 [N, K] tensor")
    out = torch.zeros(n, k // 4 + 2, dtype=torch.uint8)
    args = (
        weight.data_ptr(),
        scale.data_ptr(),
        offset.data_ptr(),
        out.data_ptr(),
        levels.data_ptr() if levels is not None else 0,
        n,
        k,
        group,
    )
    if parallel is None:
        kernel.ccq_encode(*args, 0, 1)
    else:
        parallel(lambda part, parts: kernel.ccq_encode(*args, part, parts), None)
    return out
