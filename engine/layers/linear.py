"""Linear layers whose CPU matmuls run on input-major weights through the faster BLAS.

Which BLAS is faster depends on the CPU, by a wide margin both ways:
- On AMD EPYC the torch 2.13 CPU wheel's MKL runs small-M GEMMs (decode batches) 2-5x slower
  than OpenBLAS (numpy's BLAS) multiplying by the same weight stored input-major, [in, out]
  contiguous. Measured for [32, 1024] x [1024, 103424] (ERNIE 4.5's LM head at batch 32):
  MKL 166 ms, OpenBLAS 89 ms.
- On Intel Xeon (Sapphire Rapids class) MKL is the faster one, 1.2-4x for the same shapes
  ([8, 1024] x [1024, 6144]: MKL 0.9 ms, OpenBLAS 2.0 ms), and a whole decode step of the
  0.3B shape took 22 ms with MKL against 33 ms with OpenBLAS.
`CpuGemm`'s backend is therefore "torch" (MKL, torch's own threads) or "openblas";
`default_cpu_gemm_backend` picks OpenBLAS on AMD CPUs only.

On the CPU a weight is stored transposed once after loading (`pack_for_cpu`), which both
backends multiply fastest; the `weight` parameter stays a [out, in] view of that storage, so
checkpoint names, shapes and `state_dict` values do not change. Everything else (GPU, bf16)
uses `F.linear`.

The OpenBLAS backend runs single-threaded calls and splits the output columns over its own
threads: OpenBLAS's worker threads spin after each call and starve torch's threads (a 40 us
KV gather took 1.8 ms right after a multi-threaded OpenBLAS GEMM), while Python threads
blocked on a future do not spin.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.layers.quantized_linear import quantized_matmul
from pdserve.engine.quantization.formats import QuantizedWeight

# Weights below this many elements (8 MB) are not split over threads. Splitting pays where the
# weight streams from memory; a weight that stays in cache is compute-bound, and this machine's
# two vCPUs share their FMA units (OpenBLAS at 89 GFLOP/s on one thread, 78-91 on two), so the
# hand-off only costs: demo's LM head [32, 256] x [256, 4096] took 1022 us split, 933 us not.
_MIN_SPLIT_WORK = 1 << 21


CPU_GEMM_BACKENDS = ("torch", "openblas")


def default_cpu_gemm_backend(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU GEMM backend for this machine: "openblas" on AMD CPUs (MKL is slow there), else "torch"."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "torch"
    return "openblas" if "AuthenticAMD" in text else "torch"


class CpuGemm:
    """`x @ w` for fp32 CPU tensors with input-major `w`, through `backend` (see the module doc).

    The "openblas" backend splits the columns over `num_threads` threads of its own and needs
    OpenBLAS limited to one thread (`threadpoolctl.threadpool_limits(1, "blas")`), which the
    engine sets when it builds one of these. "torch" runs on torch's intra-op threads.
    """

    def __init__(self, num_threads: int, backend: str = "torch") -> None:
        if backend not in CPU_GEMM_BACKENDS:
            raise ValueError(f"cpu_gemm must be one of {CPU_GEMM_BACKENDS} or 'auto', got {backend!r}")
        self.backend = backend
        self.num_threads = max(1, num_threads)
        # The "openblas" backend's column splits and `parallel`'s native kernels run here.
        self._pool = (
            ThreadPoolExecutor(self.num_threads - 1, thread_name_prefix="pdserve-gemm")
            if self.num_threads > 1
            else None
        )

    def parallel(self, fn: Callable[[int, int], None], max_parts: int | None = None) -> None:
        """Runs `fn(part, parts)` for each of `num_threads` parts (at most `max_parts`) at once:
        part 0 on the calling thread, the others on this object's threads. For native kernels
        that release the GIL. Handing work to a thread costs ~50 us, so small work runs as one part.
        """
        parts = min(self.num_threads, max_parts or self.num_threads)
        futures = [self._pool.submit(fn, part, parts) for part in range(1, parts)] if self._pool else []
        fn(0, parts)
        for future in futures:
            future.result()

    def __call__(self, rows: torch.Tensor, weight_in_out: torch.Tensor) -> torch.Tensor:
        """rows [M, K] contiguous, weight_in_out [K, N] contiguous → [M, N]."""
        if self.backend == "torch":
            return torch.matmul(rows, weight_in_out)
        out = torch.empty(rows.shape[0], weight_in_out.shape[1], dtype=rows.dtype)
        self.matmul(rows.detach().numpy(), weight_in_out.detach().numpy(), out.numpy())
        return out

    def matmul(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        """The same on numpy arrays (c: where to write; a new array when None)."""
        (m, _), (k, n) = a.shape, b.shape
        if c is None:
            c = np.empty((m, n), dtype=a.dtype)
        if self.backend == "torch":
            torch.matmul(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(c))
            return c
        parts = self.num_threads if k * n >= _MIN_SPLIT_WORK and n >= 64 * self.num_threads else 1
        if parts == 1:
            _small_m_matmul(a, b, c)
            return c
        # Column chunks rounded to 16 so every chunk starts on a 64-byte boundary.
        step = (-(-n // parts) + 15) // 16 * 16
        bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
        futures = [self._pool.submit(_small_m_matmul, a, b[:, lo:hi], c[:, lo:hi]) for lo, hi in bounds[1:]]
        lo, hi = bounds[0]
        _small_m_matmul(a, b[:, lo:hi], c[:, lo:hi])
        for f in futures:
            f.result()
        return c

    def close(self) -> None:
        """Stops the worker threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


# Weights of at least this many elements do not stay in cache between row-by-row GEMVs.
_PAD_MIN_WEIGHT = 1 << 20


def _small_m_matmul(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    """c = a @ b, with OpenBLAS's slow small-M shapes avoided.

    Its GEMM at M = 2 or 3 is slower than at M = 4, and slower than M separate GEMVs: measured
    [M, 256] x [256, 1024] at M = 1..4: 28, 110, 149, 83 us. M = 2, 3 (an expert chosen by two or
    three of a step's tokens, a verification of one or two guesses) so run row by row, except
    M = 3 on a weight too large to stay in cache between the rows: it is padded to 4 rows, one
    GEMM reading the weight once ([3, 1024] x [1024, 6144]: 3.8 -> 2.3 ms; an ERNIE 4.5 21B-A3B
    expert's [3, 2560] x [2560, 3072]: 4.2 -> 2.9 ms).
    """
    m = a.shape[0]
    if m == 3 and b.size >= _PAD_MIN_WEIGHT:
        padded = np.zeros((4, a.shape[1]), dtype=a.dtype)
        padded[:3] = a
        out = np.empty((4, b.shape[1]), dtype=c.dtype)
        np.matmul(padded, b, out=out)
        c[...] = out[:3]
    elif 2 <= m <= 3:
        for i in range(m):
            np.matmul(a[i], b, out=c[i])
    else:
        np.matmul(a, b, out=c)


def is_input_major(weight: torch.Tensor) -> bool:
    """True when `weight` [out, in] is a view of contiguous [in, out] storage."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gemm: CpuGemm | None = None,
    prepacked: PrepackedWeight | None = None,
) -> torch.Tensor:
    """`x @ weight.T + bias`: through `prepacked` when given one (fp32 from two rows on, where
    oneDNN starts to win), else through `gemm` when `weight` is input-major fp32 on the CPU."""
    if prepacked is not None and (x.dtype != torch.float32 or x.numel() >= 2 * x.shape[-1]):
        out = prepacked(x)
        return out if bias is None else out.add_(bias)
    if gemm is None or not (x.device.type == "cpu" and x.dtype == torch.float32 and is_input_major(weight)):
        return F.linear(x, weight, bias)
    in_features, out_features = weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, in_features)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = gemm(rows, weight.t())
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], out_features)


def pack_input_major(weight: torch.Tensor) -> torch.Tensor:
    """The same values as `weight` [out, in], stored input-major (a transposed view)."""
    return weight.detach().t().contiguous().t()


class Linear(nn.Linear):
    """`nn.Linear` with the hub's parameter names, fast on the CPU once packed.

    Quantized (`quantize`), the `weight` parameter is replaced by three buffers,
    `weight_packed`, `weight_scale` and `weight_offset` (a quantized checkpoint's tensor names),
    and products read them packed (`quantized_matmul`).
    """

    gemm: CpuGemm | None = None
    prepacked: PrepackedWeight | None = None
    quant_format: str | None = None
    quant_group: int = 0

    @property
    def quantized(self) -> QuantizedWeight | None:
        """The packed weight, when this layer is quantized (built from the current buffers)."""
        if self.quant_format is None:
            return None
        return QuantizedWeight(
            self.weight_packed,
            self.weight_scale,
            self.weight_offset,
            self.quant_format,
            self.in_features,
            self.quant_group,
        )

    def quantize(self, q: QuantizedWeight) -> None:
        """Drops the fp32 `weight` and keeps `q` instead (its tensors become this layer's buffers)."""
        if q.in_features != self.in_features or q.out_features != self.out_features:
            raise ValueError(
                f"quantized weight is [{q.out_features}, {q.in_features}], the layer "
                f"[{self.out_features}, {self.in_features}]"
            )
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.quant_format, self.quant_group = q.fmt, q.group
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_scale", q.scale)
        self.register_buffer("weight_offset", q.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantized
        if q is not None:
            out = quantized_matmul(q, x, self.gemm.parallel if self.gemm is not None else None)
            return out if self.bias is None else out + self.bias
        return linear(x, self.weight, self.bias, self.gemm, self.prepacked)

    def prepack(self) -> None:
        """Also keeps a oneDNN-prepacked copy of `weight` when it is large enough to pay off."""
        if self.quant_format is None:
            self.prepacked = prepack_if_large(self.weight)

    def pack_for_cpu(self, gemm: CpuGemm) -> None:
        """Re-stores `weight` input-major and multiplies through `gemm`; call after loading.
        A quantized layer keeps its packed rows and only borrows `gemm`'s threads."""
        if self.quant_format is not None:
            self.gemm = gemm
        elif self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
            self.weight.data = pack_input_major(self.weight.data)
            self.gemm = gemm


class FusedInputMajor:
    """Several `Linear`s reading the same input, stored side by side as one [in, sum(out)] matrix.

    Each layer's `weight` becomes a view of its columns (names and values unchanged), and one
    GEMM computes all their outputs: on the CPU a small matmul's fixed cost is comparable to
    its arithmetic, so q/k/v or gate/up as one call is measurably faster than three or two.
    """

    def __init__(self, layers: list[Linear], gemm: CpuGemm, prepack: bool = False) -> None:
        self.gemm = gemm
        self.sizes = [layer.out_features for layer in layers]
        self.weight = torch.cat([layer.weight.detach().t() for layer in layers], dim=1).contiguous()
        self.prepacked = prepack_if_large(self.weight.t()) if prepack else None
        self.bias = _joined_bias(layers)
        start = 0
        for layer, size in zip(layers, self.sizes):
            layer.weight.data = self.weight[:, start : start + size].t()
            start += size
        self._weight_np = self.weight.numpy()

    @staticmethod
    def applies(layers: list[Linear]) -> bool:
        """True when every layer is packed for the CPU path and they agree on bias."""
        return (
            all(layer.gemm is not None for layer in layers)
            and len({layer.bias is None for layer in layers}) == 1
        )

    def matmul(self, a: np.ndarray) -> np.ndarray:
        """All the layers' outputs side by side, for rows `a` [M, in] (bias added)."""
        if self.prepacked is not None:  # `linear` decides between it and `gemm` by row count
            return linear(torch.from_numpy(a), self.weight.t(), self.bias, self.gemm, self.prepacked).numpy()
        out = self.gemm.matmul(a, self._weight_np)
        if self.bias is not None:
            out += self.bias.numpy()
        return out

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = linear(x, self.weight.t(), self.bias, self.gemm, self.prepacked)
        return out.split(self.sizes, dim=-1)


class FusedRowMajor:
    """Several `Linear`s reading the same input as one [sum(out), in] weight: one `F.linear`.

    The counterpart of `FusedInputMajor` wherever weights are not packed for the CPU's fp32
    path (bf16 on the CPU, any dtype on a GPU): one matmul call instead of two or three, each
    layer's `weight` a view of its rows (names and values unchanged).
    """

    def __init__(self, layers: list[Linear], prepack: bool = False) -> None:
        self.sizes = [layer.out_features for layer in layers]
        self.weight = torch.cat([layer.weight.detach() for layer in layers])
        self.prepacked = prepack_if_large(self.weight) if prepack else None
        self.bias = _joined_bias(layers)
        start = 0
        for layer, size in zip(layers, self.sizes):
            layer.weight.data = self.weight[start : start + size]
            if self.bias is not None:
                layer.bias.data = self.bias[start : start + size]
            start += size

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight, self.bias, prepacked=self.prepacked).split(self.sizes, dim=-1)


class FusedQuantized:
    """Several quantized `Linear`s reading the same input as one packed matrix: one product.

    Packed rows stack (each row is independent), so each layer's buffers become views of its
    rows of the stacked matrix: names and values unchanged.
    """

    def __init__(self, layers: list[Linear], gemm: CpuGemm | None) -> None:
        quantized = [layer.quantized for layer in layers]
        self.weight = QuantizedWeight.cat(quantized)  # type: ignore[arg-type]
        self.sizes = [layer.out_features for layer in layers]
        self.bias = _joined_bias(layers)
        self.parallel = gemm.parallel if gemm is not None else None
        start = 0
        for layer, size in zip(layers, self.sizes):
            layer.quantize(self.weight.rows(start, start + size))
            if self.bias is not None:
                layer.bias.data = self.bias[start : start + size]
            start += size

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = quantized_matmul(self.weight, x, self.parallel)
        if self.bias is not None:
            out = out + self.bias
        return out.split(self.sizes, dim=-1)


def _joined_bias(layers: list[Linear]) -> torch.Tensor | None:
    """The layers' biases end to end, in the order of their fused outputs (None without biases)."""
    if layers[0].bias is None:
        return None
    return torch.cat([layer.bias.detach() for layer in layers])


def fuse_linears(
    layers: list[Linear], gemm: CpuGemm, prepack: bool = False
) -> FusedInputMajor | FusedRowMajor | FusedQuantized | None:
    """The layers as one matmul: packed when all are quantized, input-major through `gemm` when
    packed for the CPU, else row-major; with `prepack`, also through a oneDNN-prepacked copy
    where that pays (`prepack_if_large`).

    None when they cannot share one (some with a bias and some without, some quantized).
    """
    if len({layer.bias is None for layer in layers}) != 1:
        return None
    quantized = [layer.quant_format is not None for layer in layers]
    if all(quantized):
        return FusedQuantized(layers, gemm)
    if any(quantized):
        return None
    if FusedInputMajor.applies(layers):
        return FusedInputMajor(layers, gemm, prepack)
    if all(layer.gemm is None for layer in layers):
        return FusedRowMajor(layers, prepack)
    return None


class PrepackedWeight:
    """A [out, in] weight reordered once into oneDNN's blocked layout, for `x @ weight.T`.

    BLAS calls re-pack a weight on every call; a prepacked one skips that, which pays off for
    the largest matrix of a step, the LM head. Measured on a Xeon with AMX for [M, 1024] x
    [1024, 103424]: fp32 M = 8 / 32 in 22 / 37 ms against MKL's 30 / 50 (but 16.5 against 13.9
    at M = 1, so fp32 single rows stay on the BLAS path); bf16 M = 1 / 32 in 9.4 / 11.5 against
    12.6 / 14.9 ms. The ops are torch's internal oneDNN ones (what its CPU inductor uses), so
    `create` checks one product against `F.linear` and returns None where they are missing
    or disagree.
    """

    def __init__(self, packed: torch.Tensor) -> None:
        self._packed = packed

    @classmethod
    def create(cls, weight: torch.Tensor) -> PrepackedWeight | None:
        """The packed form of CPU `weight` [out, in], or None where oneDNN cannot serve it."""
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = cls(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None))
            probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(
                weight.dtype
            )
            expected = F.linear(probe, weight).float()
            got = packed(probe).float()
        except (RuntimeError, AttributeError, NotImplementedError):
            return None
        tolerance = 1e-4 if weight.dtype == torch.float32 else 5e-2
        scale = expected.abs().max().clamp(min=1.0)
        return packed if bool((got - expected).abs().max() <= tolerance * scale) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out], in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, self._packed, None, "none", [None], "")
        return out.view(*x.shape[:-1], -1)


# Weights below this many elements stay on the BLAS path: the oneDNN call costs more than the
# packing it saves (demo's [4096, 256] LM head ran 10-25% slower prepacked at 2-8 rows), while
# ERNIE 4.5 0.3B's smallest matrix, o_proj [1024, 2048], runs 15-50% faster.
PREPACK_MIN_ELEMENTS = 1 << 21


def prepack_if_large(weight: torch.Tensor) -> PrepackedWeight | None:
    """`PrepackedWeight.create(weight)` for weights of `PREPACK_MIN_ELEMENTS` or more, else None."""
    return PrepackedWeight.create(weight) if weight.numel() >= PREPACK_MIN_ELEMENTS else None
