"""Which cores each worker keeps to itself under `cpu_binding: auto` (cluster/core_plan.py)."""

from __future__ import annotations

import pytest

from pdserve.cluster.controller import ControllerConfig
from pdserve.cluster.core_plan import CorePlan, plan_cores
from pdserve.engine import EngineConfig


def slots(prefill: int, decode: int, both: int = 0) -> list[tuple[str, str]]:
    config = ControllerConfig(EngineConfig(model="demo"), prefill=prefill, decode=decode, both=both)
    return config.slots()


def test_two_cores_one_prefill_one_decode_the_decode_worker_gets_a_core_of_its_own():
    plan = plan_cores([0, 1], slots(1, 1), threads=1)
    # The prefill worker shares the last core with the gateway, router and Ray.
    assert plan == CorePlan(serving=(0,), slots={"decode-0": (1,)})
    assert plan.describe() == "cores: decode-0 on core 1; the rest of the cluster on core 0"


def test_decode_and_colocated_workers_first_then_prefill_while_cores_last():
    plan = plan_cores(range(8), slots(2, 2, 1), threads=2)
    assert plan.slots == {"decode-0": (6, 7), "decode-1": (4, 5), "both-0": (2, 3)}
    assert plan.serving == (0, 1)  # no room left for a prefill worker of its own
    plan = plan_cores(range(16), slots(2, 2), threads=2)
    assert plan.slots == {
        "decode-0": (14, 15), "decode-1": (12, 13), "prefill-0": (10, 11), "prefill-1": (8, 9),
    }  # fmt: skip
    assert plan.serving == tuple(range(8))


def test_nothing_is_bound_when_the_steady_workers_cannot_each_have_cores_and_leave_one():
    assert plan_cores([0, 1], slots(0, 0, 2), threads=1) is None  # 2 colocated workers, 2 cores
    assert plan_cores([0, 1, 2, 3], slots(1, 1), threads=4) is None
    assert plan_cores([0], slots(1, 1), threads=1) is None


def test_the_cores_are_the_ones_available_not_a_range():
    # A cgroup cpuset may give cores 4-7 of a bigger machine.
    plan = plan_cores([7, 4, 5, 6], slots(1, 1), threads=1)
    assert plan.slots == {"decode-0": (7,), "prefill-0": (6,)} and plan.serving == (4, 5)


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        plan_cores([0, 1], slots(1, 1), threads=0)


def test_the_slots_are_the_controllers_start_order():
    assert slots(1, 2, 1) == [("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode"),
                              ("both-0", "both")]  # fmt: skip
