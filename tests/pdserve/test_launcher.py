"""`pdserve up / status / down` as a user runs them: separate processes, a real HTTP request."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from pdserve.cluster_state import ClusterStateError, claim, process_alive, remove_record, running
from tests.redis_server import spare_port, start_redis, stop_redis
from tests.thread_affinity import allowed_by_thread, descendants

PDSERVE = [sys.executable, "-m", "pdserve.cli"]
REDIS_URL = os.environ.get("PDSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def run(*args, **kw):
    return subprocess.run([*PDSERVE, *args], capture_output=True, text=True, timeout=120, **kw)


def test_up_serves_status_reports_down_stops(moe_checkpoint, tmp_path):
    port, router_port = spare_port(), spare_port()
    state = tmp_path / "state"
    # Settings from all three sources (pdserve.config): the file's port is used, and the
    # environment's policy beats the file's.
    config = tmp_path / "good.yaml"
    context_port = spare_port()
    context_redis = start_redis(context_port)  # the context cache's, so the test can read it alone
    config.write_text(
        f"port: {port}\nkv_cache_blocks: 64\npolicy: round_robin\n"
        # A one-token minimum match: the random model's output soon repeats a token, never maybe a pair.
        "speculative_config: {method: ngram, num_speculative_tokens: 3, prompt_lookup_min: 1}\n"
        f"context_cache: {{redis_url: 'redis://127.0.0.1:{context_port}', ttl_s: 120}}\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDSERVE_ROUTER_PORT": str(router_port),
           "PDSERVE_POLICY": "cache_aware"}  # fmt: skip
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 (outlives this block: the process writes to it)
    up = subprocess.Popen(
        [*PDSERVE, "up", "--config", str(config), "--model", str(moe_checkpoint), "--state-dir", str(state)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any(c.ready for c in running(state)):
            assert up.poll() is None, Path(tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "pdserve up did not come up"
            time.sleep(0.5)
        printed = Path(tmp_path / "up.log").read_text()
        assert f"pdserve pdserve-{port} is up: http://127.0.0.1:{port}" in printed
        assert f"`pdserve down --name pdserve-{port}`" in printed
        assert "curl http://" in printed
        assert f"router 127.0.0.1:{router_port})" in printed
        if len(os.sched_getaffinity(0)) >= 2:  # cpu_binding: auto gives the decode worker a core of its own
            top = max(os.sched_getaffinity(0))
            assert f"cores: decode-0 on core {top};" in printed
            workers = [
                p for p in descendants(up.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "ray::Worker"
            ]
            bound = [set(allowed_by_thread(p).values()) for p in workers]
            assert bound.count({str(top)}) == 1, bound  # every thread of one worker, the others elsewhere

        # A prompt that repeats itself, so n-gram lookup has something to guess from.
        prompt = "def f(a, b):\n    return a + b\n\n\ndef f(a, b):"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=60
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'pdserve_router_requests_total{outcome="ok",policy="cache_aware"} 1.0' in metrics or (
            'pdserve_router_requests_total{policy="cache_aware",outcome="ok"} 1.0' in metrics
        )
        assert "pdserve_gateway_requests_total" in metrics
        assert 'pdserve_spec_decode_proposed_tokens_total{worker="decode-0"}' in metrics

        status = run("status", "--state-dir", str(state))
        assert status.returncode == 0, status.stderr
        assert (
            "prefill-0" in status.stdout
            and "decode-0" in status.stdout
            and "policy cache_aware" in status.stdout
        )
        assert f"context cache: redis 127.0.0.1:{context_port}, available" in status.stdout
        assert 'pdserve_context_cache_blocks_written_total{worker="prefill-0"}' in metrics
        header = next(ln for ln in status.stdout.splitlines() if ln.startswith("worker"))
        assert header.split()[-7:] == ["spec", "accept", "tok/verify", "RSS", "MiB", "fds", "threads"]
        # A longer answer gives the decode worker guesses to verify (a random model soon repeats
        # itself); status then shows its tokens per verification, once the router's view refreshes.
        long = {"prompt": prompt, "max_tokens": 32, "ignore_eos": True, "temperature": 0}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=long, timeout=60).status_code == 200
        deadline = time.monotonic() + 20
        while True:
            rows = run("status", "--state-dir", str(state)).stdout.splitlines()
            per_verify = next(ln for ln in rows if ln.startswith("decode-0")).split()[-4]
            if per_verify != "-" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert float(per_verify) >= 1.0

        busy = run(
            "up", "--model", str(moe_checkpoint), "--port", str(port), "--state-dir", str(tmp_path / "other")
        )
        assert busy.returncode == 1 and f"port {port}" in busy.stderr and "in use" in busy.stderr

        down = run("down", "--state-dir", str(state))
        assert down.returncode == 0 and "stopped" in down.stdout
        assert up.wait(30) == 0
        assert running(state) == [] and not list(state.glob("clusters/*.json"))
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            raise AssertionError("the gateway still answers after pdserve down")
        except httpx.TransportError:
            pass
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
        stop_redis(context_redis)


def test_clear_errors_and_nothing_left_running(tmp_path):
    bad = run("up", "--model", str(tmp_path / "nope"), "--state-dir", str(tmp_path))
    assert bad.returncode != 0 and "nope" in bad.stderr and "Traceback" not in bad.stderr
    assert not list(tmp_path.glob("clusters/*.json"))
    assert run("status", "--state-dir", str(tmp_path)).returncode == 1
    assert "pdserve up" in run("down", "--state-dir", str(tmp_path)).stderr


def test_a_worker_that_cannot_load_is_one_line_and_leaves_nothing(tmp_path):
    # MTP speculation on a model without an MTP layer passes the config check but fails in the
    # workers, after Ray has started: still one line, and everything is torn down.
    bad = run(
        "up", "--model", "demo-draft", "--port", str(spare_port()), "--router-port", str(spare_port()),
        "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}', "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "pdserve up: error: the workers could not start: ValueError: speculative_config.method 'mtp' needs "
        "the checkpoint's MTP layer (model.mtp_* tensors), and 'demo-draft' has none; use method 'draft' "
        "or 'ngram'"
    ]
    assert "Traceback" not in bad.stderr
    assert not list(tmp_path.glob("clusters/*.json"))


def test_status_and_down_answer_fast_without_torch_or_ray(tmp_path):
    # They only read records and ask a router: importing the launcher (torch, Ray) took 6-11 s.
    for command in ("status", "down"):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "pdserve.cli", command, "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        imported = {
            ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")
        }
        assert proc.returncode == 1 and "no running cluster" in proc.stderr
        assert not {"torch", "ray", "pdserve.launcher"} & imported, command
        assert elapsed < 2.0, f"pdserve {command} took {elapsed:.1f} s"


def _wait_ready(state: Path, names: set[str], procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + 150
    while {c.name for c in running(state) if c.ready} != names:
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "pdserve up did not come up"
        time.sleep(0.5)


def test_two_clusters_on_one_machine_and_one_redis(moe_checkpoint, tmp_path):
    state, tag = tmp_path / "state", uuid.uuid4().hex[:8]
    names = {"a": f"a-{tag}", "b": f"b-{tag}"}
    ports = {k: spare_port() for k in names}
    procs, logs = [], []
    for k, name in names.items():
        logs.append(tmp_path / f"{k}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [*PDSERVE, "up", "--model", str(moe_checkpoint), "--name", name, "--port", str(ports[k]),
                 "--router-port", str(spare_port()), "--kv-cache-blocks", "64", "--redis-url", REDIS_URL,
                 "--state-dir", str(state)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            ))  # fmt: skip
    client = redis.Redis.from_url(REDIS_URL)
    try:
        _wait_ready(state, set(names.values()), procs, logs)
        assert f"`pdserve down --name {names['a']}`" in logs[0].read_text()
        # The same prompt on both: identical block hashes, kept apart only by the cluster's name.
        prompt = "def add(a, b):\n    return a + b\n" * 8
        for port in ports.values():
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text

        def keys(k: str) -> list[bytes]:
            return list(client.scan_iter(match=f"pdserve:{names[k]}:*", count=1000))

        deadline = time.monotonic() + 20
        while not (keys("a") and keys("b")):  # the workers' cache events reach the routers
            assert time.monotonic() < deadline, "no prefix entries in Redis"
            time.sleep(0.3)

        ambiguous = run("status", "--state-dir", str(state))
        assert ambiguous.returncode == 1 and "--name" in ambiguous.stderr
        for k, name in names.items():
            assert name in ambiguous.stderr and f"http://127.0.0.1:{ports[k]}" in ambiguous.stderr
        listed = run("status", "--all", "--state-dir", str(state))
        assert listed.returncode == 0 and all(n in listed.stdout for n in names.values())
        one = run("status", "--name", names["b"], "--state-dir", str(state))
        assert one.returncode == 0 and f"cluster {names['b']}" in one.stdout and "decode-0" in one.stdout
        started = time.monotonic()
        again = run("up", "--model", str(moe_checkpoint), "--name", names["a"], "--state-dir", str(state))
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        assert time.monotonic() - started < 10  # refused before Ray starts

        down = run("down", "--name", names["a"], "--state-dir", str(state))
        assert down.returncode == 0 and names["a"] in down.stdout
        assert procs[0].wait(30) == 0
        assert keys("a") == [] and keys("b")
        r = httpx.post(f"http://127.0.0.1:{ports['b']}/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200
        assert [c.name for c in running(state)] == [names["b"]]
        assert run("down", "--state-dir", str(state)).returncode == 0  # the only one left: no name needed
        assert procs[1].wait(30) == 0
        assert keys("b") == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        client.close()


def test_a_live_name_is_refused_and_a_stale_record_replaced(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim(tmp_path, "x", dead.pid)  # nobody holds it
    claim(tmp_path, "x", os.getpid())  # the record's process is gone: stale, replaced
    with pytest.raises(ClusterStateError, match=r"'x' is already running .*pdserve down --name x"):
        claim(tmp_path, "x", 1)
    remove_record(tmp_path, "x", dead.pid)  # not its record any more: kept
    assert [c.pid for c in running(tmp_path)] == [os.getpid()]


def test_up_with_expert_parallel_decode_groups_serves_and_shows_their_ranks(moe_checkpoint, tmp_path):
    """`pdserve up --expert-parallel '{"size": 2, "roles": ["decode"]}'`: a plain prefill worker and
    a decode group of 2 rank processes; a request served through them; `status` and the dashboard
    list the ranks and their memory (in the worker's); `down` leaves none."""
    port, router_port = spare_port(), spare_port()
    state = tmp_path / "state"
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 (outlives this block: the process writes to it)
    up = subprocess.Popen(
        [*PDSERVE, "up", "--model", str(moe_checkpoint), "--port", str(port), "--router-port", str(router_port),
         "--kv-cache-blocks", "32", "--expert-parallel", '{"size": 2, "roles": ["decode"]}', "--state-dir",
         str(state)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not any(c.ready for c in running(state)):
            assert up.poll() is None, Path(tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "pdserve up did not come up"
            time.sleep(0.5)
        body = {"prompt": "def f(a, b):", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        # `status` shows the last load reports: one taken before the request's blocks were freed
        # may still count them, so wait (bounded) for reports that show every block free again.
        deadline = time.monotonic() + 20
        while True:
            lines = run("status", "--state-dir", str(state)).stdout.splitlines()
            rows = {
                w: next(i for i, ln in enumerate(lines) if ln.startswith(w))
                for w in ("prefill-0", "decode-0")
            }
            used = [lines[at].split()[5] for at in rows.values()]
            if used == ["0/32", "0/64"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        prefill, decode_at = rows["prefill-0"], rows["decode-0"]
        assert lines[prefill].split()[5] == "0/32" and not lines[prefill + 1].strip().startswith(
            "rank "
        )  # plain
        assert lines[decode_at].split()[5] == "0/64"  # two ranks' 32 blocks, summed
        rank_lines = [ln.split() for ln in lines[decode_at + 1 : decode_at + 3]]
        assert [ln[:2] for ln in rank_lines] == [["rank", "0"], ["rank", "1"]]
        assert all(ln[6] == "0/32" for ln in rank_lines)
        rank_rss = [int(ln[7]) for ln in rank_lines]  # MiB
        assert all(rss > 50 for rss in rank_rss) and int(lines[decode_at].split()[9]) > sum(rank_rss)
        pids = [int(ln.split()[3]) for ln in lines if ln.strip().startswith("rank ")]
        # The ranks run at the worker's priority: `up`'s own Ray starts workers at nice 0, not 15.
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [0, 0]
        deadline = time.monotonic() + 20  # the overview, too, shows the last load reports
        while True:
            overview = httpx.get(f"http://127.0.0.1:{port}/admin/overview", timeout=10).json()
            decode = next(w for w in overview["workers"] if w["role"] == "decode")
            if all(r["expert_tokens"] > 0 for r in decode["ranks"]) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert overview["settings"]["expert_parallel"]["size"] == 2
        assert overview["settings"]["expert_parallel"]["roles"] == ["decode"]
        assert all(r["rss_bytes"] > 50 * 2**20 for r in decode["ranks"])
        assert [r["rank"] for r in decode["ranks"]] == [0, 1]
        assert all(r["expert_tokens"] > 0 for r in decode["ranks"])  # both ranks' experts ran
        assert run("down", "--state-dir", str(state)).returncode == 0
        assert up.wait(30) == 0
        deadline = time.monotonic() + 30  # the ranks end with their workers
        while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(pids) == 2 and not any(process_alive(pid) for pid in pids)
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
