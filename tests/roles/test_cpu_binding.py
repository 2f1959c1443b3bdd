"""Binding a process, every thread of it, to cores (roles/cpu_binding.py), and a worker bound at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pdserve.engine import EngineConfig
from pdserve.roles.cpu_binding import can_bind
from pdserve.roles.worker import start_worker
from tests.thread_affinity import allowed_by_thread

pytestmark = pytest.mark.skipif(
    not can_bind() or len(os.sched_getaffinity(0)) < 2, reason="needs Linux affinity and two cores"
)


BIND_IN_A_CHILD = """
import os, sys, threading, time
from pdserve.roles.cpu_binding import bind_this_process, cores_of_this_process
stop = threading.Event()
early = [threading.Thread(target=stop.wait) for _ in range(3)]  # running before the binding
for t in early: t.start()
core = int(sys.argv[1])
assert bind_this_process([core, core]) == (core,)
late = threading.Thread(target=stop.wait); late.start()  # started after: inherits it
child = os.fork()
if child == 0:
    print("child", sorted(os.sched_getaffinity(0)), flush=True); os._exit(0)
os.waitpid(child, 0)
print("cores", list(cores_of_this_process()), flush=True)
print("ready", flush=True)
sys.stdin.readline()
stop.set()
"""


def test_every_thread_and_later_ones_and_children_are_bound():
    core = max(os.sched_getaffinity(0))
    proc = subprocess.Popen(
        [sys.executable, "-c", BIND_IN_A_CHILD, str(core)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert lines == [f"child [{core}]", f"cores [{core}]", "ready"]
        allowed = allowed_by_thread(proc.pid)
        assert len(allowed) >= 5 and set(allowed.values()) == {str(core)}
    finally:
        proc.communicate("\n", timeout=30)
    assert proc.returncode == 0


def test_a_core_outside_the_process_cpuset_is_a_clear_error():
    code = "from pdserve.roles.cpu_binding import bind_this_process as b\ntry:\n b([100000])\nexcept ValueError as e: print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("cannot bind to cores [100000]: ")


def test_a_worker_given_cores_runs_every_thread_on_them(ray_session, moe_checkpoint):
    core = max(os.sched_getaffinity(0))
    engine = EngineConfig(model=str(moe_checkpoint), dtype="float32", block_size=4, num_threads=1,
                          progress=False, kv_cache_blocks=16)  # fmt: skip
    bound = start_worker("w-bound", engine, "both", cores=(core,))
    free = start_worker("w-free", engine, "both")
    try:
        ray_session.get([bound.ready.remote(), free.ready.remote()])
        bound_pid, free_pid = (ray_session.get(h.load.remote()).pid for h in (bound, free))
        # The engine's threads too: they start after the binding and inherit it.
        assert set(allowed_by_thread(bound_pid).values()) == {str(core)}
        assert str(core) not in set(allowed_by_thread(free_pid).values())  # the default: any core
    finally:
        ray_session.kill(bound)
        ray_session.kill(free)
