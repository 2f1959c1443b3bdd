"""Role switching as an operator meets it, through `pdserve up`: the planner moves a worker when the
load turns prompt-heavy, every request completes, and the manual paths (`pdserve role`,
`pdserve planner`, the gateway's admin routes) work and refuse what they must."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from pathlib import Path

import httpx

from tests.pdserve.test_launcher import PDSERVE, run
from tests.pdserve.test_worker_fit import httpx_ready
from tests.redis_server import spare_port

ADMIN = "admin-key-for-tests"
WORDS = [
    "river",
    "lantern",
    "orchard",
    "copper",
    "meadow",
    "harbor",
    "violet",
    "thunder",
    "pebble",
    "summit",
    "canvas",
    "ember",
]


async def prompt_heavy_load(url: str, switched, limit_s: float) -> list[int]:
    """Long prompts with short answers, from 6 per second up by 6 more every 10 s (so that prefill
    falls behind however fast this machine is), until `switched()` or `limit_s`; statuses."""
    rng = random.Random(7)

    async def one(client: httpx.AsyncClient) -> int:
        text = " ".join(rng.choice(WORDS) for _ in range(500))
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "ignore_eos": True}
        return (await client.post(url + "/v1/chat/completions", json=body, timeout=300)).status_code

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1000)) as client:
        tasks, start = [], time.monotonic()
        while time.monotonic() - start < limit_s and not await asyncio.to_thread(switched):
            per_tick = 3 * (1 + int((time.monotonic() - start) // 10))
            tasks += [asyncio.create_task(one(client)) for _ in range(per_tick)]
            await asyncio.sleep(0.5)
        return list(await asyncio.gather(*tasks))


def test_the_planner_moves_a_worker_under_prompt_heavy_load_and_operators_can_switch(tmp_path):
    port, state, out = spare_port(), tmp_path / "state", tmp_path / "up.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDSERVE_ADMIN_KEY": ADMIN}
    with open(out, "w") as log:
        up = subprocess.Popen(
            [*PDSERVE, "up", "--port", str(port), "--router-port", str(spare_port()), "--state-dir", str(state),
             "--prefill", "2", "--decode", "2", "--role-planner", '{"hysteresis": 2, "cooldown_s": 5}'],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while not httpx_ready(port):
                assert up.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.5)
            url = f"http://127.0.0.1:{port}"

            def status() -> str:
                return run("status", "--state-dir", str(state), env=env).stdout

            statuses = asyncio.run(prompt_heavy_load(url, lambda: "(prefill_queue)" in status(), 120))
            assert set(statuses) == {200}, statuses  # every request completed, across the switch
            shown = status()
            assert "decode->prefill (prefill_queue)" in shown, shown
            roles = [ln.split()[1] for ln in shown.splitlines() if ln.startswith(("prefill-", "decode-"))]
            assert sorted(roles) == ["decode", "prefill", "prefill", "prefill"]
            operator_paths(url, state, env)
            assert run("down", "--state-dir", str(state)).returncode == 0
            assert up.wait(60) == 0
        finally:
            if up.poll() is None:
                up.kill()
    assert "Traceback" not in Path(out).read_text()


def operator_paths(url: str, state: Path, env: dict[str, str]) -> None:
    """The admin routes, `pdserve role` and `pdserve planner`, on the running cluster."""
    decode = next(
        ln.split()[0]
        for ln in run("status", "--state-dir", str(state), env=env).stdout.splitlines()
        if ln.startswith(("prefill-", "decode-")) and ln.split()[1] == "decode"
    )
    path = f"{url}/admin/workers/{decode}/role"
    nokey = httpx.post(path, json={"role": "prefill"}, timeout=60)
    assert nokey.status_code == 401 and "admin key" in nokey.json()["error"]["message"]
    last = httpx.post(
        path, json={"role": "prefill"}, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
    )
    assert last.status_code == 409 and "last decode worker" in last.json()["error"]["message"]
    # A prefill worker back to decode, by the CLI; and the planner paused and resumed.
    prefill = next(
        ln.split()[0]
        for ln in run("status", "--state-dir", str(state), env=env).stdout.splitlines()
        if ln.startswith(("prefill-", "decode-")) and ln.split()[1] == "prefill"
    )
    switched = run("role", prefill, "decode", "--state-dir", str(state), env=env)
    assert switched.returncode == 0 and f"{prefill}: prefill -> decode in" in switched.stdout, switched.stderr
    paused = run("planner", "pause", "--state-dir", str(state), env=env)
    assert paused.returncode == 0 and "role planner: paused" in paused.stdout
    refused = run("planner", "resume", "--state-dir", str(state), env={**env, "PDSERVE_ADMIN_KEY": ""})
    assert refused.returncode == 1 and "admin key" in refused.stderr
    state_now = httpx.get(
        f"{url}/admin/planner", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
    ).json()
    assert state_now["running"] is False and state_now["switches"][-1]["reason"] == "manual"
