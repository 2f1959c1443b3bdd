"""The running clusters' records, and `pdserve status / down`, which only need those records.

Each `pdserve up` records itself in `<state_dir>/clusters/<name>.json` (its pid, URLs and
model), so several clusters on one machine never overwrite each other's record. A record whose
pid is gone is stale: it is ignored, and replaced or removed when next seen. `up` claims its
name before anything starts (the record says `ready: false` until the gateway listens).

This module is imported by `pdserve status` and `pdserve down`, which must answer in well under
two seconds: it imports no torch, Ray or `pdserve.engine`, and `status` loads gRPC only when it
asks a router.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path


class ClusterStateError(RuntimeError):
    """No such cluster, or no single one; the message lists what is running."""


@dataclass
class ClusterRecord:
    """One running `pdserve up`: what `status` and `down` need to find it."""

    name: str
    pid: int
    gateway_url: str
    router_address: str
    model: str
    ready: bool = False  # false while starting: the gateway and router may not answer yet
    # The Ray instance `up` started itself (empty when it joined one): what a killed `up` leaves
    # running is found through it (pdserve.ray_leftovers).
    ray_session_dir: str = ""
    drain_timeout_s: float = 0.0  # how long `up` lets streams finish when stopped: `down` waits that too


# A switch waits for the worker's running requests to move: up to the controller's drain timeout.
DRAIN_WAIT_S = 150.0


def record_path(state_dir: Path, name: str) -> Path:
    """Where the cluster called `name` keeps its record."""
    return Path(state_dir) / "clusters" / f"{name}.json"


def write_record(state_dir: Path, record: ClusterRecord) -> None:
    """Writes (or rewrites) a cluster's record; readers never see half a file."""
    path = record_path(state_dir, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(path)


def remove_record(state_dir: Path, name: str, pid: int) -> None:
    """Removes a cluster's record if it is still `pid`'s (a newer `up` may have replaced it)."""
    path = record_path(state_dir, name)
    record = _read(path)
    if record is not None and record.pid == pid:
        path.unlink(missing_ok=True)


def claim(state_dir: Path, name: str, pid: int) -> None:
    """Records `pid` as starting the cluster `name`; refuses when a live process holds that name."""
    path = record_path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = ClusterRecord(name, pid, gateway_url="", router_address="", model="")
    while True:
        try:
            # O_EXCL: of two `up`s claiming the same name at once, exactly one wins.
            with open(path, "x") as f:
                f.write(json.dumps(asdict(record), indent=2))
            return
        except FileExistsError:
            held = _read(path)
            if held is None and _age_s(path) < 2.0:
                time.sleep(0.05)  # another claim has created the file and is writing it: look again
                continue
            if held is not None and process_alive(held.pid):
                where = f" at {held.gateway_url}" if held.gateway_url else " (starting)"
                raise ClusterStateError(
                    f"a cluster named {name!r} is already running (pid {held.pid}){where}; "
                    f"stop it with `pdserve down --name {name}` or pick another --name"
                ) from None
            if held is not None:
                forget_stale(path, held)
            path.unlink(missing_ok=True)  # stale: its process is gone


def running(state_dir: Path, echo=None) -> list[ClusterRecord]:
    """The clusters whose process is alive, by name. Stale records are removed on the way, with
    what their dead `up` left running (each told to `echo` when given)."""
    found = []
    for path in sorted((Path(state_dir) / "clusters").glob("*.json")):
        record = _read(path)
        if record is not None and process_alive(record.pid):
            found.append(record)
        elif record is not None:
            said = forget_stale(path, record)
            if said and echo is not None:
                echo(said)
    return found


def forget_stale(path: Path, record: ClusterRecord) -> str | None:
    """Stops what the dead `up` of `record` left of its Ray and removes its record; says what it
    stopped, if anything."""
    from pdserve.ray_leftovers import stop_leftovers

    stopped = stop_leftovers(record.ray_session_dir)
    path.unlink(missing_ok=True)
    if not stopped:
        return None
    return f"pdserve {record.name} (pid {record.pid}) had exited; stopped the {stopped} Ray processes it left"


def select(state_dir: Path, name: str | None, echo=None) -> ClusterRecord:
    """The running cluster called `name`, or with no name the only running one (stale records
    met on the way are cleaned up and, with `echo`, reported)."""
    clusters = running(state_dir, echo)
    if name is not None:
        for record in clusters:
            if record.name == name:
                return record
        raise ClusterStateError(f"no running cluster named {name!r} in {state_dir}; {_listing(clusters)}")
    if len(clusters) == 1:
        return clusters[0]
    if not clusters:
        raise ClusterStateError(f"no running cluster recorded in {state_dir}; start one with `pdserve up`")
    raise ClusterStateError(
        f"{len(clusters)} clusters are running; pick one with --name: {_listing(clusters)}"
    )


def listing(state_dir: Path) -> str:
    """One line per running cluster: name, gateway URL, model, pid (`pdserve status --all`)."""
    clusters = running(state_dir)
    if not clusters:
        return f"no running cluster recorded in {state_dir}"
    return "\n".join(_line(c) for c in clusters)


def _line(c: ClusterRecord) -> str:
    url = c.gateway_url if c.ready else "(starting)"
    return f"{c.name:<20} {url:<28} model {c.model or '-'}   pid {c.pid}"


def _listing(clusters: list[ClusterRecord]) -> str:
    if not clusters:
        return "none is running"
    return "running: " + ", ".join(f"{c.name} ({c.gateway_url or 'starting'})" for c in clusters)


def _read(path: Path) -> ClusterRecord | None:
    try:
        return ClusterRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # gone meanwhile, or being written by a claim: not a running cluster to show


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0  # gone meanwhile: the next look sees that


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    # An exited process whose parent has not reaped it yet still answers kill(0): a zombie is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def down(state_dir: Path, name: str | None = None, timeout_s: float = 60.0, echo=print) -> None:
    """Stops one recorded `pdserve up` (SIGTERM; it tears itself down) and waits until it has
    exited: `timeout_s` beyond the time it gives streams in flight to finish. A dead `up`'s
    leftovers are stopped on the way (and that alone is a successful `down`)."""
    import signal

    cleaned: list[str] = []

    def tell(said: str) -> None:
        cleaned.append(said)
        echo(said)

    try:
        record = select(state_dir, name, echo=tell)
    except ClusterStateError:
        if cleaned and (name is None or any(f"pdserve {name} " in said for said in cleaned)):
            return
        raise
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        forget_stale(record_path(state_dir, record.name), record)
        echo(f"pdserve {record.name} (pid {record.pid}) was not running; cleared its record")
        return
    deadline = time.monotonic() + record.drain_timeout_s + timeout_s
    while process_alive(record.pid):
        if time.monotonic() > deadline:
            raise ClusterStateError(
                f"pdserve {record.name} (pid {record.pid}) did not stop within {timeout_s} s"
            )
        time.sleep(0.2)
    echo(f"pdserve {record.name} stopped")


def _call(state_dir: Path, name: str | None, key: str | None, method: str, request):
    """One call to the cluster's router, presenting `key`; ClusterStateError says what went wrong."""
    import grpc

    from pdserve.proto import pdserve_pb2_grpc
    from pdserve.proto.bearer import call_metadata

    record = select(state_dir, name)
    if not record.ready:
        raise ClusterStateError(f"cluster {record.name!r} (pid {record.pid}) is still starting")
    with grpc.insecure_channel(record.router_address) as channel:
        try:
            return record, getattr(pdserve_pb2_grpc.RouterStub(channel), method)(
                request, timeout=DRAIN_WAIT_S if method == "SetRole" else 30, metadata=call_metadata(key)
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ClusterStateError(
                    f"router at {record.router_address} wants the cluster's API key: set PDSERVE_API_KEY "
                    "(or api_key in the --config file) to the key `up` was given"
                ) from e
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise ClusterStateError(
                    "this needs the cluster's admin key: set PDSERVE_ADMIN_KEY (or admin_key in the --config file)"
                ) from e
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.ABORTED):  # fmt: skip
                raise ClusterStateError(e.details()) from e
            raise ClusterStateError(
                f"router at {record.router_address} does not answer ({e.code().name})"
            ) from e


def requested_by() -> str:
    """Who runs this command, for the cluster's event log: "cli user@host"."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli {user}@{socket.gethostname()}"


def set_role(state_dir: Path, name: str | None, worker_id: str, role: str, key: str | None = None) -> str:
    """Switches a worker's role in place (`pdserve role`); one line saying what it did."""
    from pdserve.proto import pdserve_pb2

    request = pdserve_pb2.SetRoleRequest(worker_id=worker_id, role=role, requested_by=requested_by())
    _, done = _call(state_dir, name, key, "SetRole", request)
    return (
        f"{done.worker_id}: {done.from_role} -> {done.to_role} in {done.seconds:.2f} s "
        f"({done.moved} requests moved live, {done.handed_back} prompts handed back)"
    )


def planner(state_dir: Path, name: str | None, action: str, key: str | None = None) -> str:
    """Pauses, resumes or shows the role planner (`pdserve planner`): its state and last switches."""
    from pdserve.proto import pdserve_pb2

    request = pdserve_pb2.PlannerRequest(action=action, requested_by=requested_by())
    _, state = _call(state_dir, name, key, "Planner", request)
    return "\n".join(_planner_lines(state))


def worker_action(
    state_dir: Path, name: str | None, worker_id: str, action: str, key: str | None = None
) -> str:
    """Drains, undrains or restarts a worker (`pdserve drain / undrain / restart`); what happened."""
    from pdserve.proto import pdserve_pb2

    request = pdserve_pb2.WorkerActionRequest(worker_id=worker_id, action=action, requested_by=requested_by())
    return _call(state_dir, name, key, "WorkerAction", request)[1].message


def set_policy(state_dir: Path, name: str | None, policy: str, key: str | None = None) -> str:
    """Changes the router's placement policy (`pdserve policy`); one line."""
    from pdserve.proto import pdserve_pb2

    request = pdserve_pb2.PolicyRequest(policy=policy, requested_by=requested_by())
    done = _call(state_dir, name, key, "SetPolicy", request)[1]
    return f"placement policy: {done.previous} -> {done.policy}"


def _planner_lines(state) -> list[str]:
    lines = [f"role planner: {'running' if state.running else 'paused'}   settings {state.config_json}"]
    lines += (
        ["last role switches:"] + [f"  {_switch_line(s)}" for s in state.switches[-10:]]
        if state.switches
        else []
    )
    lines += ["last planner decisions:"] + [f"  {d}" for d in state.decisions[-5:]] if state.decisions else []
    return lines


def _switch_line(s) -> str:
    """One switch from the wire, as the controller logs it (`SwitchRecord.line`)."""
    from pdserve.cluster.role_switching import SwitchRecord

    record = SwitchRecord(
        s.worker_id, s.from_role, s.to_role, s.reason, s.at, None if s.seconds < 0 else s.seconds,
        s.moved, s.handed_back, s.error or None,
    )  # fmt: skip
    return record.line()


def cluster_state(state_dir: Path, name: str | None = None, api_key: str | None = None):
    """The router's `ClusterState` of one cluster (workers, index, in flight), with its record."""
    from pdserve.proto import pdserve_pb2

    return _call(state_dir, name, api_key, "ClusterState", pdserve_pb2.ClusterStateRequest())


def status(state_dir: Path, name: str | None = None, api_key: str | None = None) -> str:
    """A table of one cluster's workers and router, from its router's ClusterState (presenting
    `api_key`, the cluster's key, when the cluster has one)."""
    from pdserve.proto import pdserve_pb2

    record, cs = cluster_state(state_dir, name, api_key)
    _, planner_state = _call(state_dir, name, api_key, "Planner", pdserve_pb2.PlannerRequest(action="status"))
    lines = [
        f"cluster {record.name}   model {cs.model}   gateway {record.gateway_url}   "
        f"router {record.router_address} (policy {cs.policy})",
        f"prefix index: {cs.index_backend}, {cs.index_entries} entries, "
        f"{'available' if cs.index_available else 'UNAVAILABLE'}; {cs.requests_in_flight} requests in flight",
        f"{'worker':<16} {'role':<8} {'alive':<5} {'running':>7} {'waiting':>7} {'KV used':>12} {'restarts':>8}"
        f" {'spec accept':>11} {'tok/verify':>10} {'RSS MiB':>8} {'fds':>5} {'threads':>7}",
    ]
    for w in cs.workers:
        used = f"{w.kv_blocks_total - w.kv_blocks_free}/{w.kv_blocks_total}"
        # Speculation columns stay blank on workers that have not verified a guess yet.
        accept = f"{w.spec_acceptance_rate:.2f}" if w.spec_mean_accepted_length else "-"
        length = f"{w.spec_mean_accepted_length:.2f}" if w.spec_mean_accepted_length else "-"
        lines.append(f"{w.worker_id:<16} {w.role:<8} {'yes' if w.alive else 'no':<5} {w.num_running:>7} "
                     f"{w.num_waiting:>7} {used:>12} {w.restarts:>8} {accept:>11} {length:>10} "
                     f"{w.rss_bytes / 2**20:>8.0f} {w.open_fds:>5} {w.threads:>7}")  # fmt: skip
        lines += _rank_lines(w)
    return "\n".join(lines + _context_cache_lines(cs) + _planner_lines(planner_state))


def _rank_lines(w) -> list[str]:
    """An expert-parallel worker's ranks under its line: each one's queues, KV, memory (the
    worker's RSS above counts them) and expert load."""
    return [
        f"  rank {r.rank:<9} {'pid':<8} {r.pid:<5} {r.num_running:>7} {r.num_waiting:>7} "
        f"{f'{r.kv_blocks_total - r.kv_blocks_free}/{r.kv_blocks_total}':>12} {'':>8} {'':>11} {'':>10} "
        f"{r.rss_bytes / 2**20:>8.0f}   expert tokens {r.expert_tokens}"
        for r in w.ranks
    ]


def _context_cache_lines(cs) -> list[str]:
    """The Redis context cache's line: where it is, and what the workers loaded and wrote."""
    if not cs.context_cache:
        return ["context cache: off"]
    down = [w.worker_id for w in cs.workers if w.alive and not w.context_cache_available]
    loaded = sum(w.context_cache_hit_tokens for w in cs.workers)
    read = sum(w.context_cache_bytes_read for w in cs.workers) / 2**20
    written = sum(w.context_cache_bytes_written for w in cs.workers) / 2**20
    state = f"UNAVAILABLE to {', '.join(down)}" if down else "available"
    return [
        f"context cache: {cs.context_cache}, {state}; {loaded} prompt tokens loaded, "
        f"{read:.1f} MiB read, {written:.1f} MiB written"
    ]
