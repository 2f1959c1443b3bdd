"""A `redis-server` of a test's own, on a spare port: for tests that kill, restart or fill Redis."""

from __future__ import annotations

import socket
import subprocess
import time

# The tests' ports come from the benches' one picker (below the ephemeral range).
from pdserve.bench.serve_bench import spare_port as spare_port


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
