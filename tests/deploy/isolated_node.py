"""A stand-in for one cluster machine: commands meant for a Ray head or a pod, run on this machine.

Each `IsolatedNode` is a Linux network, PID and mount namespace made with `unshare`: its only
network is its own loopback (so Ray, which binds the machine's external address whatever it is
told, and the fixed ports of the deploy files, 6379 and 8000, touch nothing outside it), `ray
stop` there sees only the processes started there (not the test session's Ray, nor anyone
else's), its `/etc/hosts` can name Kubernetes Services, and closing it kills everything left in
it. Needs root (CI runs as root); `IsolatedNode.available()` says whether this machine allows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# The commands the deploy files run, as this interpreter's: its `ray` and `pdserve` are the ones
# under test (a console script elsewhere on PATH could belong to another install).
COMMANDS = {"ray": "ray.scripts.scripts", "pdserve": "pdserve.cli"}
READY_MARK = "node-ready"


class IsolatedNode:
    """One namespace "machine" with its own home, Ray temp dir and `/etc/hosts`."""

    def __init__(self, root: Path, hosts: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths must stay under 108 bytes: a short directory, not pytest's tmp_path.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="pdray-"))
        self._bin = self.root / "bin"
        self._bin.mkdir(exist_ok=True)
        for name, module in COMMANDS.items():
            shim = self._bin / name
            shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m {module} "$@"\n')
            shim.chmod(0o755)
        hosts_file = self.root / "hosts"
        hosts_file.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in (hosts or {}).items())
        )
        mark = self.root / READY_MARK
        setup = (
            f"ip link set lo up && mount --bind {shlex.quote(str(hosts_file))} /etc/hosts && "
            f"touch {shlex.quote(str(mark))} && exec sleep infinity"
        )
        self._unshare = subprocess.Popen(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c", setup],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not mark.exists():
            if self._unshare.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the namespace did not start: {self._unshare.stderr.read().decode()}")
            time.sleep(0.05)
        self.init_pid = int(Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children").read_text())

    @staticmethod
    def available() -> bool:
        """Whether this machine lets the tests make namespaces (root, `unshare` and `ip` present)."""
        probe = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "ip", "link", "set", "lo", "up"],
            capture_output=True,
        )
        return probe.returncode == 0

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A node's environment: this machine's, less Ray's and pdserve's variables, plus `extra`."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PDSERVE_"))}
        keep.update(
            HOME=str(self.home), RAY_TMPDIR=str(self.ray_tmp), PYTHONUNBUFFERED="1",
            PATH=f"{self._bin}:{keep.get('PATH', '/usr/bin:/bin')}",
        )  # fmt: skip
        keep.update(extra or {})
        return keep

    def _enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.init_pid), "--net", "--pid", "--mount", "--", *argv]

    def run(self, command: str, env: dict[str, str] | None = None, timeout: float = 120):
        """Runs one shell command on the node, as Ray's node updater does, and waits for it."""
        return subprocess.run(
            self._enter(["bash", "-c", command]), env=self.env(env), cwd=self.home,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Starts a long-running process on the node (a container's command), output to `log`."""
        with open(log, "w") as out:
            return subprocess.Popen(self._enter(argv), env=self.env(env), cwd=self.home,
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    @staticmethod
    def terminate(process: subprocess.Popen) -> None:
        """SIGTERM to a spawned command itself (as Kubernetes stops a container), not to the
        `nsenter` that started it, which would die without passing the signal on."""
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)

    def http(self, method: str, url: str, body: dict | None = None, headers: dict | None = None):
        """(status, text) of one HTTP request made on the node; status 0 when nothing answers."""
        script = (
            "import httpx, json, sys\n"
            "a = json.loads(sys.argv[1])\n"
            "try:\n"
            "    r = httpx.request(a['method'], a['url'], json=a['body'], headers=a['headers'], timeout=60)\n"
            "    print(json.dumps([r.status_code, r.text]))\n"
            "except httpx.TransportError as e:\n"
            "    print(json.dumps([0, str(e)]))\n"
        )
        request = json.dumps({"method": method, "url": url, "body": body, "headers": headers or {}})
        done = subprocess.run(self._enter([sys.executable, "-c", script, request]), env=self.env(),
                              capture_output=True, text=True, timeout=90)  # fmt: skip
        assert done.returncode == 0, done.stderr
        status, text = json.loads(done.stdout)
        return status, text

    def wait_http_ok(self, url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Waits until GET `url` answers 200 (`alive()` false or the time up fails the test)."""
        deadline = time.monotonic() + timeout
        while self.http("GET", url)[0] != 200:
            assert alive(), f"the process serving {url} has exited"
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout:g} s"
            time.sleep(1)

    def processes(self) -> list[str]:
        """The commands running on the node, other than its init and the `ps` that lists them.

        Exited processes that nobody has reaped yet (zombies: the stand-in init, `sleep`, does not
        wait for orphans as a real init does) are not running and are left out."""
        done = subprocess.run(
            self._enter(["ps", "-e", "-o", "pid=,stat=,args="]), capture_output=True, text=True
        )
        rows = [line.split(None, 2) for line in done.stdout.splitlines() if line.strip()]
        return [
            args
            for pid, stat, args in rows
            if pid != "1" and not stat.startswith("Z") and args != "ps -e -o pid=,stat=,args="
        ]

    def close(self) -> None:
        """Kills everything still running on the node (ending its init ends its PID namespace)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGKILL)
        self._unshare.wait(10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
