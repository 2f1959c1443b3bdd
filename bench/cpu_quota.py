"""A fixed CPU capacity per worker process, for benches that compare prefill/decode splits.

On a machine with fewer cores than workers, every worker draws on the same cores: moving a worker
from prefill to decode then changes how requests batch, not how much each side can do, so a split
(or the role planner) cannot win or lose the way it would with a device per worker. A CFS quota per
worker restores that: each worker gets `cores` of CPU time per period, however busy the others are,
as it would get one device. Linux cgroups only (v2 `cpu.max` or v1 `cpu.cfs_quota_us`), as root or
with a delegated cgroup; `CpuQuotas.available()` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

# cgroup v1 `cpu.shares` and v2 `cpu.weight` of a quota group: 8x a default process's, so the
# benched workers get their quota even when other work keeps the machine busy (the quota still caps them).
SHARES_V1, WEIGHT_V2 = 8192, 800
# A short period keeps a throttled worker's pauses short (a 100 ms period could stall a decode step
# for up to 100 ms minus the quota), at the price of more scheduler work: 20 ms is a few steps.
PERIOD_US = 20_000
_V2_ROOT = Path("/sys/fs/cgroup")
_V1_ROOT = Path("/sys/fs/cgroup/cpu")


@dataclass
class CpuQuotas:
    """Cgroups named `<prefix>-<key>`, each holding processes limited to `cores` CPUs together
    and weighted above the machine's other processes (so they get those cores when it is busy)."""

    cores: float
    prefix: str = f"pdserve-bench-{os.getpid()}"
    _made: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.01 <= self.cores <= os.cpu_count():  # type: ignore[operator]
            raise ValueError(
                f"--worker-cores must be between 0.01 and {os.cpu_count()} (this machine's cores)"
            )

    @staticmethod
    def available() -> str | None:
        """None when quotas can be set here, else why not (to print before a bench starts)."""
        root = _root()
        if root is None:
            return "no writable cgroup cpu controller (needs Linux cgroups, as root or delegated)"
        return None

    def limit(self, key: str, pid: int) -> None:
        """Moves `pid` (all its threads, and the threads it starts later) under the quota `key`."""
        group = self._made.get(key) or self._make(key, self.cores)
        (group / "cgroup.procs").write_text(str(pid))

    def favor(self, key: str, pid: int) -> None:
        """Moves `pid` into a group weighted like the quota groups but with no quota: the
        processes that serve the benched workers (router, gateway, the load generator)."""
        group = self._made.get(key) or self._make(key, None)
        (group / "cgroup.procs").write_text(str(pid))

    def throttled_s(self, key: str) -> float:
        """Seconds the group's processes waited for quota so far (how often the limit bit)."""
        stat = dict(line.split() for line in (self._made[key] / "cpu.stat").read_text().splitlines())
        if "throttled_usec" in stat:
            return int(stat["throttled_usec"]) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9

    def close(self) -> None:
        """Moves any process still inside back to the root group and removes the groups."""
        root = _root()
        for group in self._made.values():
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (root / "cgroup.procs").write_text(pid)  # type: ignore[operator]
                group.rmdir()
        self._made.clear()

    def __enter__(self) -> CpuQuotas:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self, key: str, cores: float | None) -> Path:
        root = _root()
        if root is None:
            raise RuntimeError(f"cannot limit CPU per worker: {self.available()}")
        group = root / f"{self.prefix}-{key}"
        group.mkdir(exist_ok=True)
        if (group / "cpu.max").exists():
            quota = "max" if cores is None else str(int(cores * PERIOD_US))
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            (group / "cpu.weight").write_text(str(WEIGHT_V2))
        else:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text("-1" if cores is None else str(int(cores * PERIOD_US)))
            (group / "cpu.shares").write_text(str(SHARES_V1))
        self._made[key] = group
        return group


def _root() -> Path | None:
    """The writable cgroup directory whose children can take a CPU quota, if there is one."""
    v2 = _V2_ROOT / "cgroup.controllers"
    if v2.exists() and "cpu" in v2.read_text().split() and os.access(_V2_ROOT, os.W_OK):
        subtree = (_V2_ROOT / "cgroup.subtree_control").read_text().split()
        if "cpu" in subtree:
            return _V2_ROOT
    if (_V1_ROOT / "cpu.cfs_quota_us").exists() and os.access(_V1_ROOT, os.W_OK):
        return _V1_ROOT
    return None
