"""`ExpertParallelConfig`: how many ranks serve one MoE replica, and how its experts are balanced."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

MAX_EP_SIZE = 64


@dataclass(frozen=True)
class ExpertParallelConfig:
    """Validated `expert_parallel` settings.

    `size`: ranks in the group (1: no expert parallelism). `num_redundant_experts`: extra expert
    slots per MoE layer over the whole group (a multiple of `size`), filled with copies of the
    hottest experts. `rebalance_interval_s`: how often the group re-places those copies from the
    token counts it measured (None: never; the initial copies stay). `backend`: the collective
    ("gloo" on CPUs, "nccl" on GPUs; "auto" picks by device). `timeout_s`: the longest any
    collective may wait for a peer before the rank gives up (a dead peer must not hang the rest).
    `split_dense`: each rank holds 1/size of the output columns of the products every token
    runs (the LM head; the gate/up of dense-layer and shared-expert MLPs of `SPLIT_MIN_ELEMENTS`
    or more) and the group computes them together (dispatch.py), and 1/size of the embedding's
    rows (the head's vocabulary slice), fetching other rows by id; false: every rank holds them whole.
    """

    size: int = 1
    num_redundant_experts: int = 0
    rebalance_interval_s: float | None = None
    backend: str = "auto"
    timeout_s: float = 60.0
    split_dense: bool = True

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_EP_SIZE:
            raise ValueError(f"expert_parallel.size must be an integer in [1, {MAX_EP_SIZE}], got {size!r}")
        r = self.num_redundant_experts
        if isinstance(r, bool) or not isinstance(r, int) or r < 0 or r % size:
            raise ValueError(
                f"expert_parallel.num_redundant_experts must be a non-negative multiple of "
                f"expert_parallel.size ({size}), got {r!r}"
            )
        interval = self.rebalance_interval_s
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0
        ):
            raise ValueError(f"expert_parallel.rebalance_interval_s must be > 0 or null, got {interval!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(
                f"expert_parallel.backend must be 'auto', 'gloo' or 'nccl', got {self.backend!r}"
            )
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, int | float)
            or self.timeout_s <= 0
        ):
            raise ValueError(f"expert_parallel.timeout_s must be > 0, got {self.timeout_s!r}")
        if not isinstance(self.split_dense, bool):
            raise ValueError(f"expert_parallel.split_dense must be true or false, got {self.split_dense!r}")

    @classmethod
    def from_dict(cls, value: dict[str, Any] | ExpertParallelConfig | None) -> ExpertParallelConfig:
        """Accepts the `expert_parallel` mapping of `LLM(...)`/YAML; names an unknown key."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"expert_parallel must be a mapping such as {{'size': 2}}, got {type(value).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"expert_parallel has unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**value)

    def resolved_backend(self, on_gpu: bool) -> str:
        """The collective to use on this device."""
        if self.backend == "auto":
            return "nccl" if on_gpu else "gloo"
        return self.backend
