"""What cores another process's threads may run on, read from /proc (for the CPU binding tests)."""

from __future__ import annotations

from pathlib import Path


def allowed_by_thread(pid: int) -> dict[int, str]:
    """Each thread id of `pid` -> its `Cpus_allowed_list` ("1", "0-3", ...); {} if it has ended."""
    out = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        out[int(task.name)] = next(
            ln.split()[1] for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")
        )
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
