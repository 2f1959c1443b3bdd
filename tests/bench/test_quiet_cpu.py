"""`wait_until_quiet` waits while the machine's cores are busy, up to its bound."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from pdserve.bench import quiet_cpu


def test_it_waits_while_a_core_spins_and_not_past_its_bound():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        # One spinning core is 1/cores of the machine: quiet below half of that never comes.
        waited = asyncio.run(quiet_cpu.wait_until_quiet(0.5 / cores, window_s=0.1, max_wait_s=0.6))
    finally:
        spinner.kill()
        spinner.wait()
    assert waited >= 0.6


def test_a_quiet_machine_is_one_window_and_an_unknown_one_none(monkeypatch):
    jiffies = iter([(0, 100), (1, 200), (1, 300), (2, 400)])  # 1% busy: quiet
    monkeypatch.setattr(quiet_cpu, "_cpu_times", lambda: next(jiffies))
    assert asyncio.run(quiet_cpu.wait_until_quiet(0.25, window_s=0.01, max_wait_s=5.0)) < 1.0
    monkeypatch.setattr(quiet_cpu, "_cpu_times", lambda: None)  # no /proc/stat: no waiting
    assert asyncio.run(quiet_cpu.busy_share(0.01)) is None
    assert asyncio.run(quiet_cpu.wait_until_quiet(0.25, window_s=0.01, max_wait_s=5.0)) < 1.0


def test_the_busy_share_of_this_machine_is_a_fraction():
    share = asyncio.run(quiet_cpu.busy_share(0.05))
    assert share is None or 0.0 <= share <= 1.0
