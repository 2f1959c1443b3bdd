"""Stopping a cluster, and what it exposes while it runs (issue #26, items 9 and 10).

A real `pdserve up` each time: SIGTERM lets a stream in flight finish while new requests are
refused; kill -9 of `up` leaves Ray processes that `pdserve down` stops; every socket the cluster
listens on (router, Ray's own, the workers' KV rendezvous) is on loopback, the gateway alone
following `--host`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from pdserve.cluster_state import running
from pdserve.ray_leftovers import leftover_pids
from tests.redis_server import spare_port
from tests.thread_affinity import descendants

PDSERVE = [sys.executable, "-m", "pdserve.cli"]


def _start(checkpoint: Path, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, int, Path]:
    port, router_port, state = spare_port(), spare_port(), tmp_path / "state"
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 (outlives this function: the process writes to it)
    up = subprocess.Popen(
        [*PDSERVE, "up", "--model", str(checkpoint), "--port", str(port), "--router-port", str(router_port),
         "--state-dir", str(state), "--kv-cache-blocks", "64", *flags],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not any(c.ready for c in running(state)):
        assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "pdserve up did not come up"
        time.sleep(0.5)
    return up, port, state


def _listening(pids: list[int]) -> dict[int, list[str]]:
    """pid -> the local addresses ("ip:port") of its listening TCP sockets, from /proc."""
    listening: dict[int, str] = {}  # socket inode -> address
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                listening[int(fields[9])] = _address(fields[1], v6)
    found: dict[int, list[str]] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in listening:
                found.setdefault(pid, []).append(listening[int(target[8:-1])])
    return found


def _address(hex_address: str, v6: bool) -> str:
    ip_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(ip_hex)
    # /proc/net/tcp* print each 32-bit word of the address in host (little-endian) order.
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{ipaddress.ip_address(packed)}:{int(port_hex, 16)}"


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # gRPC's dual-stack sockets bound to 127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_everything_listens_on_loopback_and_sigterm_drains_streams(moe_checkpoint, tmp_path):
    # A public gateway: it alone may listen beyond loopback.
    up, port, state = _start(moe_checkpoint, tmp_path, "--drain-timeout-s", "120", "--host", "0.0.0.0")
    try:
        record = json.loads(next(state.glob("clusters/*.json")).read_text())
        ray_processes = leftover_pids(record["ray_session_dir"])
        assert len(ray_processes) >= 5  # GCS, raylet, agents, the controller, two workers
        # A transfer first, so that the workers' KV rendezvous stores are listening too.
        url = f"http://127.0.0.1:{port}/v1/completions"
        assert httpx.post(url, json={"prompt": "def f", "max_tokens": 2}, timeout=60).status_code == 200
        exposed = {
            pid: {a for a in addresses if not _loopback(a)}
            for pid, addresses in _listening([up.pid, *ray_processes]).items()
        }
        assert {pid: a for pid, a in exposed.items() if a} == {up.pid: {f"0.0.0.0:{port}"}}, exposed

        # A stream in flight when SIGTERM comes runs to its end; a new request is refused.
        chunks: list[dict] = []
        body = {"prompt": "def f", "max_tokens": 48, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        started = threading.Event()

        def read_stream() -> None:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        started.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert started.wait(60)
        up.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # the gateway stops listening at once
            try:
                httpx.post(url, json={"prompt": "x", "max_tokens": 1}, timeout=5)
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, "new requests still accepted after SIGTERM"
            time.sleep(0.1)
        reader.join(120)
        texts = [c for c in chunks if c["choices"]]
        assert texts[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 48  # every token, none cut by the shutdown
        assert up.wait(60) == 0
        assert "stopping: new requests are refused" in (tmp_path / "up.log").read_text()
    finally:
        if up.poll() is None:
            up.kill()


def test_down_stops_what_a_killed_up_left(moe_checkpoint, tmp_path):
    up, _, state = _start(moe_checkpoint, tmp_path)
    record = json.loads(next(state.glob("clusters/*.json")).read_text())
    session = record["ray_session_dir"]
    assert leftover_pids(session)
    up.kill()  # kill -9: `up` stops nothing itself
    up.wait(10)
    down = subprocess.run(
        [*PDSERVE, "down", "--name", record["name"], "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert f"pdserve {record['name']} (pid {up.pid}) had exited" in down.stdout
    assert leftover_pids(session) == []
    assert not list(state.glob("clusters/*.json"))


def test_up_exits_with_the_reason_when_its_controller_dies(moe_checkpoint, tmp_path):
    # Ray's OOM killer once took a cluster's controller (and with it every worker): `up` went on
    # answering every request with "no live prefill+decode pair". It now stops, and says why.
    up, _, state = _start(moe_checkpoint, tmp_path)
    record = json.loads(next(state.glob("clusters/*.json")).read_text())
    controllers = [
        p for p in descendants(up.pid) if Path(f"/proc/{p}/comm").read_text().startswith("ray::Controlle")
    ]
    assert len(controllers) == 1
    os.kill(controllers[0], signal.SIGKILL)
    assert up.wait(90) == 1
    printed = (tmp_path / "up.log").read_text()
    assert (
        "pdserve up: error: the controller died (" in printed
        and "start it again with `pdserve up`" in printed
    )
    assert "Traceback" not in printed
    assert not list(state.glob("clusters/*.json"))
    assert leftover_pids(record["ray_session_dir"]) == []  # Ray and the workers went too
