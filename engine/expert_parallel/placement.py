"""`ExpertPlacement`: which rank of an expert-parallel group holds which routed experts.

Every rank holds a contiguous share of each MoE layer's experts (its base experts, loaded from
the checkpoint and never moved) and `spares_per_rank` slots holding copies of experts other ranks
own. Copies let a hot expert's tokens be split over several ranks; `rebalanced` re-chooses them
from measured token counts. Plain lists only: placements cross processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def base_range(rank: int, size: int, num_experts: int) -> range:
    """The logical experts `rank` owns: a contiguous split, the first ranks taking any remainder."""
    start = rank * num_experts // size
    return range(start, (rank + 1) * num_experts // size)


@dataclass(frozen=True)
class ExpertPlacement:
    """Base split plus, per MoE layer and rank, the logical expert in each spare slot."""

    num_experts: int
    size: int
    spares_per_rank: int
    # layer -> rank -> logical expert per spare slot
    spares: dict[int, list[list[int]]] = field(default_factory=dict)
    version: int = 0

    @classmethod
    def initial(cls, layers: list[int], num_experts: int, size: int, num_redundant: int) -> ExpertPlacement:
        """Contiguous split; spare slots copy the next ranks' experts until counts say better."""
        if num_experts < size:
            raise ValueError(
                f"expert_parallel.size ({size}) exceeds the model's {num_experts} routed experts; "
                "use a smaller group"
            )
        per_rank = num_redundant // size
        if per_rank > num_experts - num_experts // size - (num_experts % size > 0):
            raise ValueError(
                f"expert_parallel.num_redundant_experts ({num_redundant}) leaves a rank more spare slots "
                f"than experts it does not own; use at most {size * (num_experts - -(-num_experts // size))}"
            )
        spares = {}
        for layer in layers:
            per_layer = []
            for rank in range(size):
                own = set(base_range(rank, size, num_experts))
                start = base_range((rank + 1) % size, size, num_experts).start
                order = [(start + i) % num_experts for i in range(num_experts)]
                per_layer.append([e for e in order if e not in own][:per_rank])
            spares[layer] = per_layer
        return cls(num_experts, size, per_rank, spares)

    def held(self, layer: int, rank: int) -> list[int]:
        """Logical experts in `rank`'s local slots for `layer`: base ones, then spares."""
        return list(base_range(rank, self.size, self.num_experts)) + list(
            self.spares.get(layer, [[]] * self.size)[rank]
        )

    def replica_table(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ranks [E, C], local slots [E, C], copies [E]) for routing a layer's tokens: expert e's
        c-th copy (c < copies[e]) is local slot `slots[e, c]` of rank `ranks[e, c]`."""
        holders: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        for rank in range(self.size):
            for slot, e in enumerate(self.held(layer, rank)):
                holders[e].append((rank, slot))
        width = max(len(h) for h in holders)
        ranks = np.zeros((self.num_experts, width), dtype=np.int64)
        slots = np.zeros((self.num_experts, width), dtype=np.int64)
        for e, h in enumerate(holders):
            for c, (rank, slot) in enumerate(h):
                ranks[e, c], slots[e, c] = rank, slot
        return ranks, slots, np.array([len(h) for h in holders], dtype=np.int64)

    def rebalanced(self, counts: dict[int, list[int]]) -> ExpertPlacement:
        """Spares re-chosen from tokens per logical expert per layer (summed over the group).

        Greedy: each spare slot copies the expert with the most tokens per copy, and goes to
        the least loaded rank not yet holding it. Copies split an expert's tokens evenly.
        """
        spares = {}
        for layer, per_rank in self.spares.items():
            load = np.asarray(counts.get(layer, [0] * self.num_experts), dtype=np.float64)
            copies = np.ones(self.num_experts)
            owner = np.zeros(self.num_experts, dtype=np.int64)
            for rank in range(self.size):
                owner[list(base_range(rank, self.size, self.num_experts))] = rank
            holders = [{int(owner[e])} for e in range(self.num_experts)]
            new = [[] for _ in range(self.size)]
            for _ in range(self.spares_per_rank * self.size):
                rank_load = np.zeros(self.size)
                for e in range(self.num_experts):
                    for r in holders[e]:
                        rank_load[r] += load[e] / copies[e]
                for e in np.argsort(-(load / copies), kind="stable"):
                    free = [
                        r
                        for r in range(self.size)
                        if r not in holders[e] and len(new[r]) < self.spares_per_rank
                    ]
                    if free:
                        target = min(free, key=lambda r: (rank_load[r], r))
                        new[target].append(int(e))
                        holders[e].add(target)
                        copies[e] += 1
                        break
            spares[layer] = new if all(len(s) == len(old) for s, old in zip(new, per_rank)) else per_rank
        return ExpertPlacement(self.num_experts, self.size, self.spares_per_rank, spares, self.version + 1)


def rank_imbalance(placement: ExpertPlacement, counts: dict[int, list[int]]) -> float:
    """max/mean tokens per rank over the MoE layers, with copies splitting their expert's tokens."""
    worst = []
    for layer, load in counts.items():
        ranks, _, copies = placement.replica_table(layer)
        per_rank = np.zeros(placement.size)
        for e, n in enumerate(load):
            for c in range(copies[e]):
                per_rank[ranks[e, c]] += n / copies[e]
        if per_rank.sum() > 0:
            worst.append(per_rank.max() / per_rank.mean())
    return float(np.mean(worst)) if worst else 1.0
