"""Which CPU cores each worker of a one-machine cluster runs on (`cpu_binding: auto`).

Decode and colocated workers come first: each gets `threads` cores of its own, from the highest
down, because their engine step runs all the time and every other thread that lands on its core
stretches every stream's time per token. Prefill workers get cores of their own next while cores
last; the gateway, the router, the controller and Ray's own processes share what is left (at least
one core), and so do the prefill workers that got none (with local prefill they mostly wait). When
the decode and colocated workers cannot each have cores of their own and leave one over, nothing is
bound: sharing cores that are pinned would be worse than letting the OS move threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# The order in which slots get cores of their own: steady stepping first.
_PRIORITY = {"decode": 0, "both": 0, "prefill": 1}


@dataclass(frozen=True)
class CorePlan:
    """Cores of their own for some worker slots; everything else shares `serving`."""

    serving: tuple[int, ...]
    slots: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the start-up output."""
        own = "; ".join(f"{slot} on {_cores(c)}" for slot, c in self.slots.items())
        return f"cores: {own}; the rest of the cluster on {_cores(self.serving)}"


def plan_cores(available: Sequence[int], slots: Sequence[tuple[str, str]], threads: int) -> CorePlan | None:
    """A plan for `slots` ((slot name, role it starts in)) on the `available` cores, each worker
    needing `threads`; None when the decode and colocated slots do not fit (see the module doc)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    free = sorted(set(available), reverse=True)
    ordered = sorted(slots, key=lambda s: _PRIORITY[s[1]])
    own: dict[str, tuple[int, ...]] = {}
    for slot, role in ordered:
        if len(free) - threads < 1:  # one core stays for the serving processes
            if _PRIORITY[role] == 0:
                return None
            break
        own[slot], free = tuple(sorted(free[:threads])), free[threads:]
    if not own:
        return None
    return CorePlan(serving=tuple(sorted(free)), slots=own)


def _cores(cores: tuple[int, ...]) -> str:
    return ("core " if len(cores) == 1 else "cores ") + ",".join(map(str, cores))
