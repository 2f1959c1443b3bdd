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
    # layer -> expert -> share of its tokens each copy takes, copies in `replica_table` order
    # (a layer absent: copies split evenly)
    shares: dict[int, list[list[float]]] = field(default_factory=dict)

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

    def copy_shares(self, layer: int) -> np.ndarray:
        """[E, C]: the share of expert e's tokens its c-th copy (in `replica_table` order) takes;
        zero past its copies. Copies split evenly unless a rebalance set shares."""
        ranks, _, copies = self.replica_table(layer)
        shares = np.zeros(ranks.shape)
        given = self.shares.get(layer)
        for e in range(self.num_experts):
            shares[e, : copies[e]] = given[e] if given else 1.0 / copies[e]
        return shares

    def rebalanced(self, counts: dict[int, list[int]]) -> ExpertPlacement:
        """Spares and copy shares re-chosen from tokens per logical expert per layer (summed over
        the group); a layer without counts keeps its spares and shares.

        Base experts never move, so a rank owning several hot experts can only shed load through
        copies of them elsewhere; an even split would leave it half of each, so copies take
        uneven shares of their expert's tokens (`_shares`)."""
        spares, shares = {}, {}
        owner = np.zeros(self.num_experts, dtype=np.int64)
        for rank in range(self.size):
            owner[list(base_range(rank, self.size, self.num_experts))] = rank
        for layer, old in self.spares.items():
            load = np.asarray(counts.get(layer, [0] * self.num_experts), dtype=np.float64)
            if load.sum() == 0:
                spares[layer] = old
                if layer in self.shares:
                    shares[layer] = self.shares[layer]
                continue
            portion = _spares_by_load(load, owner, self.size, self.spares_per_rank)
            spares[layer] = [[] for _ in range(self.size)]
            for e, on in enumerate(portion):
                for rank in on:
                    if rank != owner[e]:
                        spares[layer][rank].append(e)
            shares[layer] = _shares(load, portion, self.size)
        return ExpertPlacement(
            self.num_experts, self.size, self.spares_per_rank, spares, self.version + 1, shares
        )


def _spares_by_load(load: np.ndarray, owner: np.ndarray, size: int, per_rank: int) -> list[dict[int, float]]:
    """Per expert, the tokens each holding rank takes (owner first): greedy, each spare slot
    copies the largest share of the most loaded rank that can still move, to the least loaded
    rank with a free slot, taking half their difference. Slots left over copy the heaviest
    experts a rank lacks (their shares come from `_shares`)."""
    portion: list[dict[int, float]] = [{int(owner[e]): float(load[e])} for e in range(len(load))]
    rank_load = np.bincount(owner, weights=load, minlength=size).astype(np.float64)
    free = [per_rank] * size
    placed = True
    while placed and sum(free):
        placed = False
        for hot in np.argsort(-rank_load, kind="stable"):
            on_hot = sorted(
                (e for e, p in enumerate(portion) if p.get(hot, 0) > 0), key=lambda e: -portion[e][hot]
            )
            for e in on_hot:
                targets = [r for r in range(size) if free[r] and r not in portion[e]]
                if not targets:
                    continue
                cold = min(targets, key=lambda r: (rank_load[r], r))
                move = min(portion[e][hot], (rank_load[hot] - rank_load[cold]) / 2)
                if move <= 0:
                    continue
                portion[e][hot] -= move
                portion[e][cold] = move
                rank_load[hot] -= move
                rank_load[cold] += move
                free[cold] -= 1
                placed = True
                break
            if placed:
                break
    for rank in range(size):
        for e in np.argsort(-load, kind="stable"):
            if not free[rank]:
                break
            if rank not in portion[e]:
                portion[e][rank] = 0.0
                free[rank] -= 1
    return portion


def _shares(
    load: np.ndarray, portion: list[dict[int, float]], size: int, passes: int = 8
) -> list[list[float]]:
    """Per expert, the share of its tokens each holder takes (holders by rank, as
    `replica_table` orders copies): starting from `portion`, each expert's tokens are
    water-filled over its holders given the load the others put there, a few passes over the
    experts from the heaviest."""
    rank_load = np.zeros(size)
    for p in portion:
        for rank, n in p.items():
            rank_load[rank] += n
    multi = [e for e in np.argsort(-load, kind="stable") if len(portion[e]) > 1 and load[e] > 0]
    for _ in range(passes):
        for e in multi:
            holders = sorted(portion[e])
            others = np.array([rank_load[r] - portion[e][r] for r in holders])
            for r, n in zip(holders, _water_fill(others, float(load[e]))):
                rank_load[r] += n - portion[e][r]
                portion[e][r] = n
    return [
        [float(portion[e][r] / load[e]) if load[e] > 0 else 1.0 / len(portion[e]) for r in sorted(portion[e])]
        for e in range(len(load))
    ]


def _water_fill(base: np.ndarray, amount: float) -> np.ndarray:
    """How to add `amount` over bins already holding `base` so the fullest is as low as it can be."""
    levels = np.sort(base)
    for k in range(len(levels), 0, -1):
        level = (amount + levels[:k].sum()) / k
        if level >= levels[k - 1]:
            return np.maximum(level - base, 0.0)
    return np.zeros_like(base)  # unreachable: k = 1 always fits (amount >= 0)


def rank_imbalance(placement: ExpertPlacement, counts: dict[int, list[int]]) -> float:
    """max/mean tokens per rank, the mean over the MoE layers of each layer's, with copies taking
    their shares (`copy_shares`) of their expert's tokens."""
    worst = []
    for layer, load in counts.items():
        ranks, _, copies = placement.replica_table(layer)
        shares = placement.copy_shares(layer)
        per_rank = np.zeros(placement.size)
        for e, n in enumerate(load):
            for c in range(copies[e]):
                per_rank[ranks[e, c]] += n * shares[e, c]
        if per_rank.sum() > 0:
            worst.append(per_rank.max() / per_rank.mean())
    return float(np.mean(worst)) if worst else 1.0
