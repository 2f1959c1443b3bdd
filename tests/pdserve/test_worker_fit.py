"""Workers fit the machine they are given: `pdserve up` starts, or refuses at once, never waits
(except for the nodes of a Ray cluster it joins, which may still be joining)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pdserve.config import ClusterConfig
from pdserve.launcher import LaunchError, joined_worker_cpus, worker_cpus
from tests.pdserve.test_launcher import PDSERVE, run
from tests.redis_server import spare_port


def test_each_worker_asks_for_its_share_of_the_cpus():
    assert worker_cpus(ClusterConfig(prefill=1, decode=1), {"CPU": 2.0}, on_gpu=False) == 1.0
    assert worker_cpus(ClusterConfig(prefill=2, decode=2), {"CPU": 2.0}, on_gpu=False) == 0.5
    assert worker_cpus(ClusterConfig(prefill=0, decode=0, both=3), {"CPU": 16.0}, on_gpu=False) == 1.0


def test_too_many_workers_are_refused_with_the_numbers_and_the_flag():
    with pytest.raises(LaunchError) as err:
        worker_cpus(ClusterConfig(prefill=5, decode=4), {"CPU": 2.0}, on_gpu=False)
    assert "9 workers need at least 2.25 CPUs" in str(err.value) and "has 2" in str(err.value)
    assert "--prefill/--decode/--both" in str(err.value)
    with pytest.raises(LaunchError) as err:
        worker_cpus(ClusterConfig(prefill=2, decode=1), {"CPU": 32.0, "GPU": 2.0}, on_gpu=True)
    assert "3 GPU workers need 3 GPUs" in str(err.value) and "has 2" in str(err.value)


class _Clock:
    """A clock that only `sleep` moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_joined_cluster_is_waited_for_until_its_nodes_bring_the_cpus():
    # A Kubernetes head's `pdserve up` starts beside its worker pods: their Ray nodes join later.
    joins = iter([{}, {"CPU": 0.0}, {"CPU": 0.0, "memory": 1.0}, {"CPU": 2.0}])
    clock, said = _Clock(), []
    config = ClusterConfig(prefill=1, decode=1, address="pdserve-ray-head:6379")
    cpus = joined_worker_cpus(config, False, lambda: next(joins), said.append, sleep=clock.sleep,
                              clock=lambda: clock.now)  # fmt: skip
    assert cpus == 1.0 and clock.now == 3.0
    assert said == ["waiting for Ray nodes to join: 2 workers need at least 0.5 CPUs (0.25 each) and the "
                    "Ray cluster has 0; lower --prefill/--decode/--both"]  # fmt: skip


def test_a_joined_cluster_that_never_brings_the_cpus_is_refused_after_the_timeout():
    clock, said = _Clock(), []
    config = ClusterConfig(prefill=1, decode=1, address="pdserve-ray-head:6379")
    with pytest.raises(LaunchError) as err:
        joined_worker_cpus(config, False, lambda: {"CPU": 0.25}, said.append, timeout_s=40,
                           sleep=clock.sleep, clock=lambda: clock.now)  # fmt: skip
    assert "the Ray cluster has 0.25" in str(err.value) and "after waiting 40 s for Ray nodes" in str(
        err.value
    )
    assert clock.now == 40 and len(said) == 3  # at 0, 15 and 30 s


def test_four_workers_start_on_a_two_core_machine(moe_checkpoint, tmp_path):
    # README's own example (2 prefill + 2 decode) waited for ever when each worker asked Ray for
    # a whole CPU and the machine had two.
    port, state = spare_port(), tmp_path / "state"
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 (the process writes to it)
    up = subprocess.Popen(
        [*PDSERVE, "up", "--model", str(moe_checkpoint), "--prefill", "2", "--decode", "2",
         "--kv-cache-blocks", "32", "--port", str(port), "--router-port", str(spare_port()),
         "--state-dir", str(state)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not httpx_ready(port):
            assert up.poll() is None, Path(tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "pdserve up did not come up"
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "def f():", "max_tokens": 3},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        printed = Path(tmp_path / "up.log").read_text()
        assert "WARNING" not in printed and "Warning" not in printed, printed  # a normal start is quiet
        status = run("status", "--state-dir", str(state))
        workers = [
            ln.split()[0] for ln in status.stdout.splitlines() if ln.startswith(("prefill-", "decode-"))
        ]
        assert sorted(workers) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
        assert run("down", "--state-dir", str(state)).returncode == 0
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
        log.close()


def httpx_ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_ctrl_c_while_the_workers_load_exits_cleanly(tmp_path):
    out = tmp_path / "up.log"
    with open(out, "w") as log:
        up = subprocess.Popen(
            [*PDSERVE, "up", "--port", str(spare_port()), "--router-port", str(spare_port()),
             "--state-dir", str(tmp_path / "state")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "starting workers" not in out.read_text():  # workers import torch: seconds
                assert up.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
                time.sleep(0.05)
            up.send_signal(signal.SIGINT)
            assert up.wait(60) == 1
        finally:
            if up.poll() is None:
                up.kill()
    printed = out.read_text()
    assert "pdserve up: error: interrupted (starting workers)" in printed
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed
    assert not list((tmp_path / "state").glob("**/*.json"))  # nothing recorded as running
