"""A `redis-server` of a test's own, on a spare port: for tests that kill, restart or fill Redis."""

from __future__ import annotations

import random
import socket
import subprocess
import time

# Ports for servers a test starts later (a cluster binds its router port seconds after it is
# chosen). Below the kernel's ephemeral range (32768-60999 here), whose ports any outgoing
# connection may take meanwhile (the two-cluster launcher test lost its router port that way), and
# above Ray's worker ports (10002-19999).
SPARE_PORTS = range(20000, 32768)
_given: set[int] = set()  # never the same port twice in one test session (none is bound yet)


def spare_port() -> int:
    """A port on 127.0.0.1 nothing listens on now, from `SPARE_PORTS`."""
    for port in random.sample(SPARE_PORTS, 64):
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {SPARE_PORTS.start}-{SPARE_PORTS.stop - 1} after 64 tries")


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """Starts redis-server on 127.0.0.1:`port` without persistence; returns once it answers PING."""
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not come up on port {port}")


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
