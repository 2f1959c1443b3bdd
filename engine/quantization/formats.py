"""Packed weight-only formats: quantizing an fp32 matrix, and reading it back in torch.

Every format stores a [N, K] matrix (output rows, input columns) as per-row bytes of unsigned
levels plus an fp16 scale and offset per group of `group` columns:
`w[n, k] = scale[n, k // group] * level[n, k] + offset[n, k // group]` (asymmetric: the offset
is not tied to a level, so a group whose values are all positive wastes no levels). The byte
layouts are the ones `kernels/quant_dot.h` decodes (see there):

- "q8": one level (0..255) per byte.
- "q4", "q2": levels of 4 / 2 bits, weight k at bits [b*k, b*k + b) of the row read as one
  little-endian bit string.
- "ccq": the convolutional code of CCQ (arXiv 2507.07145), 2 bits per weight: code k is the
  6-bit window at bit 2k of the row's bit string, so consecutive codes share 4 bits, and its
  level is `code * 49 mod 64`, a fixed bijection that spreads a state's four successors over
  the whole range (with the identity, a high weight would force its neighbour's fine bits, and
  the code gained nothing over plain 2-bit: measured MSE on Gaussian groups of 64, plain 2-bit
  with the best clipping 0.112, the code with the identity 0.111, with this bijection 0.084).
  The encoder (`kernels/ccq_encode.h`) finds the best bit string by a Viterbi search
  given each group's scale and offset; the scale and offset are then refitted to the chosen
  levels by least squares (the "code cluster" step: the linear map moves to the levels' centroid)
  and the string searched once more. Rows carry 2 bytes of padding (the last codes' bits).

The torch decoding here is the reference the C kernels are tested against, and the path on GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.kernels import quant_cpu

FORMAT_BITS = {"q8": 8, "q4": 4, "q2": 2, "ccq": 2}
CCQ_BITS = 6
CCQ_MUL = 49
# Clipping ratios tried per group for the plain formats (the one with the least squared error
# wins): at 2 and 4 bits the extreme values of a group cost more levels than they are worth.
_CLIP_RATIOS = {"q8": (1.0,), "q4": (1.0, 0.95, 0.9, 0.85, 0.8), "q2": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)}
# The code's first scale spans this much of the group's range over its 64 levels, then is refitted
# (MSE on Gaussian groups of 64 by span: 0.7: 0.090, 0.8: 0.086, 1.0: 0.092, 1.2: 0.110).
_CCQ_INITIAL_SPAN = 0.8
# Weights the code's least-squares refit handles at once (its temporaries: ~5 fp32 copies).
_REFIT_CHUNK_WEIGHTS = 1 << 22


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one packed row of `k` weights."""
    return k * FORMAT_BITS[fmt] // 8 + (2 if fmt == "ccq" else 0)


@dataclass
class QuantizedWeight:
    """A packed [N, K] matrix: `packed` uint8 [N, row_bytes], `scale` and `offset` fp16 [N, K / group]."""

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    fmt: str
    in_features: int
    group: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes the packed matrix takes, scales included."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))

    @classmethod
    def empty(cls, fmt: str, out_features: int, in_features: int, group: int, device: torch.device | str):
        """Uninitialised storage of the right shapes (a quantized checkpoint is loaded into it)."""
        check_shape(fmt, out_features, in_features, group)
        return cls(
            torch.empty(out_features, row_bytes(fmt, in_features), dtype=torch.uint8, device=device),
            torch.empty(out_features, in_features // group, dtype=torch.float16, device=device),
            torch.empty(out_features, in_features // group, dtype=torch.float16, device=device),
            fmt,
            in_features,
            group,
        )

    @staticmethod
    def cat(weights: list[QuantizedWeight]) -> QuantizedWeight:
        """The matrices stacked by rows (one product for q/k/v, or gate/up): same K, format and group."""
        first = weights[0]
        if any(
            (w.fmt, w.in_features, w.group) != (first.fmt, first.in_features, first.group) for w in weights
        ):
            raise ValueError("only matrices with the same format, input size and group stack")
        return QuantizedWeight(
            torch.cat([w.packed for w in weights]),
            torch.cat([w.scale for w in weights]),
            torch.cat([w.offset for w in weights]),
            first.fmt,
            first.in_features,
            first.group,
        )

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Rows [start, stop) as views of this matrix's storage."""
        return QuantizedWeight(
            self.packed[start:stop],
            self.scale[start:stop],
            self.offset[start:stop],
            self.fmt,
            self.in_features,
            self.group,
        )

    def levels(self) -> torch.Tensor:
        """The unsigned levels [N, K] (int32), decoded in torch."""
        n, k, p = self.out_features, self.in_features, self.packed
        if self.fmt == "q8":
            return p.to(torch.int32)
        if self.fmt in ("q4", "q2"):
            bits = FORMAT_BITS[self.fmt]
            shifts = torch.arange(0, 8, bits, device=p.device, dtype=torch.int32)
            return ((p.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(n, k)
        bit = (p.to(torch.int32)[:, :, None] >> torch.arange(8, device=p.device, dtype=torch.int32)) & 1
        bit = bit.reshape(n, -1)
        code = torch.zeros(n, k, dtype=torch.int32, device=p.device)
        for i in range(CCQ_BITS):
            code |= bit[:, i : i + 2 * k : 2] << i
        return (code * CCQ_MUL) & ((1 << CCQ_BITS) - 1)

    def dequantize(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The fp32 matrix [N, K] (or rows [start, stop) of it): in C on the CPU, else in torch."""
        start, stop = rows or (0, self.out_features)
        if self.packed.device.type == "cpu" and quant_cpu.available():
            return quant_cpu.dequantize(self, start, stop)
        part = self.rows(start, stop)
        groups = self.in_features // self.group
        levels = part.levels().float().view(stop - start, groups, self.group)
        w = levels * part.scale.float()[:, :, None] + part.offset.float()[:, :, None]
        return w.view(stop - start, self.in_features)


def check_shape(fmt: str, out_features: int, in_features: int, group: int, name: str = "a matrix") -> None:
    """Raises ValueError unless the format can pack a [out, in] matrix with this group."""
    if fmt not in FORMAT_BITS:
        raise ValueError(f"unknown packed format {fmt!r}; formats are {', '.join(FORMAT_BITS)}")
    if group % 8 or in_features % group:
        raise ValueError(
            f"quantization.group_size {group} does not divide {name}'s {in_features} input columns; "
            "choose a group size that divides every quantized layer's input size (32 or 64 usually do)"
        )


def _uniform(groups: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levels, fp16 scales and offsets of [G, g] fp32 groups on a uniform grid, clipping by MSE."""
    top = (1 << FORMAT_BITS[fmt]) - 1
    lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    mid = (lo + hi) / 2
    best = None
    for ratio in _CLIP_RATIOS[fmt]:
        low = mid + (lo - mid) * ratio
        scale = ((mid + (hi - mid) * ratio - low) / top).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: any scale
        offset = low.half()
        q = ((groups - offset.float()) / scale.float()).round_().clamp_(0, top)
        err = (q * scale.float() + offset.float() - groups).square_().sum(1, keepdim=True)
        if best is None:
            best = [err, q, scale, offset]
            continue
        better = err < best[0]
        best = [torch.where(better, new, old) for new, old in zip((err, q, scale, offset), best)]
    assert best is not None
    return best[1].to(torch.uint8), best[2], best[3]


def _pack_bits(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] levels of `bits` bits (8 // bits per byte, the first in the low bits) → uint8 [N, K*bits/8]."""
    n, k = levels.shape
    per_byte = 8 // bits
    parts = levels.to(torch.int32).view(n, k // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=levels.device)
    return (parts << shifts).sum(-1).to(torch.uint8)


def _quantize_ccq(w: torch.Tensor, group: int, parallel: Parallel | None) -> QuantizedWeight:
    n, k = w.shape
    groups = w.view(n, k // group, group)
    lo, hi = groups.amin(2), groups.amax(2)
    top = (1 << CCQ_BITS) - 1
    scale = ((hi - lo) * _CCQ_INITIAL_SPAN / top).clamp(min=1e-8)
    offset = (lo + hi) / 2 - scale * top / 2
    levels = torch.empty(n, k, dtype=torch.uint8)
    scale, offset = scale.half().float(), offset.half().float()
    quant_cpu.ccq_encode(w, scale, offset, group, parallel, levels)
    # The refit's fp32 temporaries are a few times the rows they cover: a chunk of rows at a time
    # (the 103424-row LM head of 21B-A3B would otherwise hold ~4 GB of them).
    step = max(1, _REFIT_CHUNK_WEIGHTS // k)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        levels_f = levels[rows].view(-1, k // group, group).float()
        scale[rows], offset[rows] = _least_squares(groups[rows], levels_f, scale[rows], offset[rows])
    scale, offset = scale.half(), offset.half()
    packed = quant_cpu.ccq_encode(w, scale.float(), offset.float(), group, parallel)
    return QuantizedWeight(packed, scale, offset, "ccq", k, group)


def _least_squares(
    groups: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the scale and offset mapping `levels` closest to `groups` (the old ones where degenerate)."""
    lm, wm = levels.mean(2), groups.mean(2)
    var = (levels - lm[..., None]).square().sum(2)
    cov = ((levels - lm[..., None]) * (groups - wm[..., None])).sum(2)
    ok = var > 0
    new_scale = torch.where(ok, cov / var.clamp(min=1e-12), scale)
    return new_scale, torch.where(ok, wm - new_scale * lm, offset)


Parallel = Callable[[Callable[[int, int], None], int | None], None]


def quantize(
    weight: torch.Tensor, fmt: str, group: int, parallel: Parallel | None = None, name: str = "a matrix"
) -> QuantizedWeight:
    """`weight` [N, K] (any float dtype, any device) packed in `fmt` with groups of `group` columns.

    "ccq" needs the C kernels (its encoder runs there, split by `parallel` when given).
    """
    n, k = weight.shape
    check_shape(fmt, n, k, group, name)
    device = weight.device
    w = weight.detach().to("cpu", torch.float32).contiguous()
    if fmt == "ccq":
        if not quant_cpu.available():
            raise RuntimeError("wint2 (ccq) needs the C kernels to encode (engine/kernels/quant_cpu.c)")
        q = _quantize_ccq(w, group, parallel)
    else:
        levels, scale, offset = _uniform(w.view(-1, group), fmt)
        levels = levels.view(n, k)
        packed = levels if fmt == "q8" else _pack_bits(levels, FORMAT_BITS[fmt])
        q = QuantizedWeight(packed, scale.view(n, -1), offset.view(n, -1), fmt, k, group)
    if device.type != "cpu":
        q = QuantizedWeight(q.packed.to(device), q.scale.to(device), q.offset.to(device), fmt, k, group)
    return q
