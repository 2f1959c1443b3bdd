"""Start-up as a user meets it: a line that says what each worker is doing, and workers that fit
the model they serve (the demo's used to hold a fixed 1 GiB KV pool each: 1.5 GB per worker)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pdserve.engine import EngineConfig
from pdserve.launcher import _phases_line
from pdserve.roles.process_usage import ProcessUsage
from pdserve.roles.worker import Worker
from tests.pdserve.test_launcher import PDSERVE, run
from tests.pdserve.test_worker_fit import httpx_ready
from tests.redis_server import spare_port

DEMO_WORKER_RSS_LIMIT = 600 * 2**20


def test_a_worker_reports_each_phase_while_it_builds_its_engine(moe_checkpoint):
    worker = Worker("w-0", EngineConfig(model=str(moe_checkpoint), progress=False), role="both")
    seen: list[str] = []
    set_phase = worker._set_phase
    worker._set_phase = lambda phase: (seen.append(phase), set_phase(phase))  # type: ignore[method-assign]

    async def start() -> tuple[str, str]:
        before = await worker.startup_phase()
        await worker.ready()
        return before, await worker.startup_phase()

    before, after = asyncio.run(start())
    assert (before, after) == ("starting", "ready")
    loads = [p for p in seen if p.startswith("loading weights ")]
    total = int(loads[-1].split("/")[1])
    assert loads == [f"loading weights {i}/{total}" for i in range(1, total + 1)]
    assert any(p.startswith("allocating KV cache (") and p.endswith(" MiB)") for p in seen)
    assert seen.index(loads[-1]) < seen.index(next(p for p in seen if p.startswith("allocating")))
    assert seen[-1] == "ready"


def test_the_progress_line_groups_workers_by_phase():
    line = _phases_line({"prefill-0": "starting", "decode-0": "loading weights 3/57", "decode-1": "starting"})
    assert line == "decode-0 loading weights 3/57, decode-1 prefill-0 starting"
    assert _phases_line({}) == "connecting"


def test_the_default_kv_pool_is_sized_from_the_window_and_max_num_seqs():
    block_bytes = 16 * 2048  # 16 tokens of 2 KiB (the demo model's fp32 K and V over its 4 layers)
    # 256 sequences of a sixteenth of a 2048-token window: 32768 tokens, 2048 blocks (64 MiB).
    assert EngineConfig(model="demo").kv_pool_blocks(block_bytes, 2048) == 2048
    assert EngineConfig(model="demo", max_num_seqs=8).kv_pool_blocks(block_bytes, 2048) == 128  # one window
    assert EngineConfig(model="demo", max_model_len=1024).kv_pool_blocks(block_bytes, 2048) == 1024
    # A big model's window: capped at 1 GiB, as before.
    big = EngineConfig(model="demo").kv_pool_blocks(28 * 2 * 16 * 4 * 128 * 4, 131072)
    assert big == 2**30 // (28 * 2 * 16 * 4 * 128 * 4)
    # Told: exactly what was asked.
    assert (
        EngineConfig(model="demo", kv_cache_memory_gb=0.5).kv_pool_blocks(block_bytes, 2048)
        == 2**29 // block_bytes
    )
    assert EngineConfig(model="demo", kv_cache_blocks=7).kv_pool_blocks(block_bytes, 2048) == 7


def test_process_usage_sees_a_new_file_descriptor():
    before = ProcessUsage.of_this_process()
    with open(__file__) as f:
        during = ProcessUsage.of_this_process()
        assert f.readable()
    assert before.rss_bytes > 10 * 2**20 and before.threads >= 1
    assert during.open_fds == before.open_fds + 1


def test_the_demo_cluster_names_worker_phases_and_each_worker_fits_600_mb(tmp_path):
    port, state, out = spare_port(), tmp_path / "state", tmp_path / "up.log"
    with open(out, "w") as log:
        up = subprocess.Popen(
            [*PDSERVE, "up", "--port", str(port), "--router-port", str(spare_port()), "--state-dir", str(state)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while not httpx_ready(port):
                assert up.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.5)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"prompt": "def add(a, b):", "max_tokens": 8}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            status = run("status", "--state-dir", str(state))
            assert status.returncode == 0, status.stderr
            rows = [ln.split() for ln in status.stdout.splitlines() if ln.startswith(("prefill-", "decode-"))]
            assert "RSS MiB" in status.stdout and status.stdout.split("\n")[2].split()[-3:] == [
                "MiB",
                "fds",
                "threads",
            ]
            rss_mib = {row[0]: float(row[-3]) for row in rows}  # the last columns: RSS MiB, fds, threads
            assert sorted(rss_mib) == ["decode-0", "prefill-0"]
            assert all(0 < mib <= DEMO_WORKER_RSS_LIMIT / 2**20 for mib in rss_mib.values()), rss_mib
            assert run("down", "--state-dir", str(state)).returncode == 0
            assert up.wait(60) == 0
        finally:
            if up.poll() is None:
                up.kill()
    printed = Path(out).read_text()
    assert "starting workers" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "999.1.1.1"], "--host 999.1.1.1: not an address"),
        (["--host", "10.255.255.254"], "--host 10.255.255.254: not an address of this machine"),
        (
            ["--state-dir", "/proc/pdserve-cannot-write-here"],
            "state_dir /proc/pdserve-cannot-write-here: cannot",
        ),
        (["--port", "8150", "--router-port", "8150"], "port and router_port are both 8150"),
    ],
)
def test_a_setting_that_cannot_work_is_one_line_before_anything_starts(args, message, tmp_path):
    # Each used to surface late: a bad host as "port in use", equal ports after 45 s with a
    # 70-line traceback, an unwritable state directory only once everything had started.
    cmd = [
        "up",
        "--port",
        str(spare_port()),
        "--router-port",
        str(spare_port()),
        "--state-dir",
        str(tmp_path),
        *args,
    ]
    done = run(*cmd)
    assert done.returncode in (1, 2) and message in done.stderr, done.stderr
    assert (
        len(done.stderr.strip().splitlines()) == 1 and "Started a local Ray" not in done.stderr + done.stdout
    )


def test_sigterm_while_starting_stops_cleanly_and_leaves_no_ray_process(tmp_path):
    # Ray's failure handler used to answer with a C stack dump and leave its agents running.
    out = tmp_path / "up.log"
    with open(out, "w") as log:
        up = subprocess.Popen(
            [*PDSERVE, "up", "--port", str(spare_port()), "--router-port", str(spare_port()),
             "--state-dir", str(tmp_path / "state")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "starting workers" not in out.read_text():  # Ray is up, the workers are loading
                assert up.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
                time.sleep(0.05)
            up.send_signal(signal.SIGTERM)
            assert up.wait(60) == 1
        finally:
            if up.poll() is None:
                up.kill()
    printed = out.read_text()
    assert "pdserve up: error: interrupted (starting workers)" in printed
    assert "SIGTERM received" not in printed and "Traceback" not in printed
    # Ray names its session after the driver's pid: nothing of that session may be left running.
    left = subprocess.run(
        ["pgrep", "-f", f"session_[0-9_-]*_{up.pid}( |/|$)"], capture_output=True, text=True
    )
    assert left.stdout == "", left.stdout
