"""Which packed format and group each quantized layer gets: one for all, or wint2's hybrid plan.

wint2 with `code: "hybrid"` is CCQ's hybrid encoding as far as the packed formats allow: the
layer that costs the most accuracy gets a higher rate and others pay for it with a lower one, so
that the average bits per weight (scales and row padding counted) is no more than the plain
code's. The plan follows from the layers' names and shapes alone, so a quantized checkpoint's
tensors are derived from its config, as for the other schemes. The choice is per layer, not per
group: the kernels read one format per matrix, and fused q/k/v or gate/up products and a layer's
routed experts share one, so layers change rate in those units.

1. The LM head at 4 bits (q4, the scheme's group): on the demo it is where wint2 loses most
   (docs/DECISIONS.md, 2026-12-05: Δloss +0.099 with a 2-bit head, +0.031 with an fp32 one).
2. While the average is above the code's, units take the code at twice the group (half the
   scales: 2.25 instead of 2.5 bits a weight), routed experts first (most of an MoE's weights,
   each expert sees a fraction of the tokens), then the other layers, in model order.
3. If it is still above, the head's 4 bits at twice the group too (4.25 bits a weight).
4. If it is still above (a head too large for the rest to pay for), the plan is the code's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.quantization.config import QuantizationConfig
from pdserve.engine.quantization.formats import row_bytes

HEAD = "lm_head"


@dataclass(frozen=True)
class LayerFormat:
    """A layer's packed format and group size."""

    fmt: str
    group: int

    def bits(self, out_features: int, in_features: int) -> float:
        """Bits per weight of a [out, in] matrix in this format, fp16 scale and offset included."""
        total = out_features * (row_bytes(self.fmt, in_features) * 8 + in_features // self.group * 32)
        return total / (out_features * in_features)


def mean_bits(shapes: dict[str, tuple[int, int]], plan: dict[str, LayerFormat]) -> float:
    """Bits per weight over all the layers of `shapes` ({name: (out, in)}) under `plan`."""
    bits = sum(plan[name].bits(n, k) * n * k for name, (n, k) in shapes.items())
    return bits / sum(n * k for n, k in shapes.values())


def _units(names: list[str]) -> list[list[str]]:
    """The layers that change rate together: a layer's routed experts, the projections of one
    module (q/k/v/o, gate/up/down), in model order, routed experts first."""
    units: dict[str, list[str]] = {}
    for name in names:
        key = name.split(".experts.")[0] + ".experts" if ".experts." in name else name.rsplit(".", 1)[0]
        units.setdefault(key, []).append(name)
    return sorted(units.values(), key=lambda unit: ".experts." not in unit[0])


def plan_formats(shapes: dict[str, tuple[int, int]], config: QuantizationConfig) -> dict[str, LayerFormat]:
    """{layer name: its format} for the layers of `shapes` ({name: (out, in)}) under `config`."""
    base = LayerFormat(config.format, config.group)
    plan = dict.fromkeys(shapes, base)
    if config.code != "hybrid" or HEAD not in plan:
        return plan
    budget = mean_bits(shapes, plan)
    plan[HEAD] = LayerFormat("q4", config.group)
    wide = LayerFormat(base.fmt, base.group * 2)
    for unit in _units([name for name in shapes if name != HEAD]):
        if mean_bits(shapes, plan) <= budget:
            return plan
        if all(shapes[name][1] % wide.group == 0 for name in unit):
            plan.update(dict.fromkeys(unit, wide))
    if mean_bits(shapes, plan) > budget and shapes[HEAD][1] % wide.group == 0:
        plan[HEAD] = LayerFormat("q4", wide.group)
    return plan if mean_bits(shapes, plan) <= budget else dict.fromkeys(shapes, base)
