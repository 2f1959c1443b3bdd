"""Ray processes left behind by a `pdserve up` that died without stopping them (kill -9).

`up` stops the Ray it started when it exits normally. Killed outright, it cannot: GCS and the
raylet then exit on their own, but Ray's agents (dashboard and runtime-env agents) and workers
that were mid-call can live on, holding memory and ports. Every process of a local Ray instance
keeps files open in that instance's session directory (its logs), and no other process does, so
the directory `up` recorded identifies them exactly. `pdserve down`, `status` and the next `up`
stop them when they find the dead cluster's record.

Imported by `pdserve status` / `down`: no torch, no Ray.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

# How long the leftovers get to exit after SIGTERM before SIGKILL.
TERM_GRACE_S = 3.0


def leftover_pids(session_dir: str) -> list[int]:
    """This user's live processes that hold a file in `session_dir` open or name it in their
    command line (zombies excluded: they are already gone, and their parent reaps them)."""
    if not session_dir or not Path(session_dir).is_absolute():
        return []
    me = os.getuid()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if proc.stat().st_uid != me or _zombie(proc):
                continue
            if _uses(proc, session_dir):
                found.append(int(proc.name))
        except OSError:
            continue  # exited meanwhile, or not ours to look into
    return found


def stop_leftovers(session_dir: str) -> int:
    """Stops the processes `leftover_pids` finds (SIGTERM, then SIGKILL after TERM_GRACE_S);
    returns how many there were."""
    pids = leftover_pids(session_dir)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _running(pid):
            _signal(pid, signal.SIGKILL)
    return len(pids)


def _uses(proc: Path, session_dir: str) -> bool:
    if session_dir.encode() in (proc / "cmdline").read_bytes():
        return True
    prefix = session_dir.rstrip("/") + "/"
    for fd in (proc / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _zombie(proc: Path) -> bool:
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _running(pid: int) -> bool:
    try:
        return not _zombie(Path(f"/proc/{pid}"))
    except OSError:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # exited meanwhile
        os.kill(pid, sig)
