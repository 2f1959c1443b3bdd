"""The operator dashboard in a real browser (Debian's Chromium, headless, driven by Playwright)
against a real `pdserve up` cluster: it loads without console errors, shows every worker with its
role, its numbers move under a short load, a role switch done from the page changes the worker's
role (as `pdserve status` reports it), and an action without the admin key is refused.

Browser downloads are impossible here: the test uses /usr/bin/chromium, installing it with apt-get
when it is missing and apt-get can run (as .ci/run does), else it skips and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.pdserve.test_launcher import PDSERVE, run
from tests.pdserve.test_worker_fit import httpx_ready
from tests.redis_server import spare_port

CHROMIUM = "/usr/bin/chromium"
ADMIN = "admin-key-of-the-browser-test"
SCREENSHOT = Path(__file__).resolve().parents[2] / "bench-results" / "dashboard.png"


def chromium() -> str:
    """Debian's Chromium, installed now if missing and apt-get can run; else the test skips."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and apt-get cannot install it here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"cannot install chromium with apt-get: {done.stderr.strip()[-300:]}")
    return CHROMIUM


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`pdserve up` on the demo model: 1 prefill + 2 decode workers, an admin key, planner paused."""
    tmp = tmp_path_factory.mktemp("dashboard-up")
    port, state, out = spare_port(), tmp / "state", tmp / "up.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDSERVE_ADMIN_KEY": ADMIN}
    with open(out, "w") as log:
        up = subprocess.Popen(
            [*PDSERVE, "up", "--port", str(port), "--router-port", str(spare_port()), "--state-dir", str(state),
             "--name", "dashboard-browser-test", "--prefill", "1", "--decode", "2",
             # Every prompt through the prefill worker, so that the page has KV flows to show.
             "--role-planner", '{"enabled": false}', "--local-prefill-tokens", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not httpx_ready(port):
            assert up.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", state, env, out
        assert run("down", "--state-dir", str(state), "--name", "dashboard-browser-test").returncode == 0
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
    assert "Traceback" not in out.read_text()


def roles(state: Path, env: dict[str, str]) -> dict[str, str]:
    """Worker id -> role, as `pdserve status` prints them."""
    shown = run("status", "--state-dir", str(state), env=env).stdout
    return {
        ln.split()[0]: ln.split()[1] for ln in shown.splitlines() if ln.startswith(("prefill-", "decode-"))
    }


def load(url: str, seconds: float) -> list[int]:
    """Chat requests one after another for `seconds`; their statuses."""
    statuses, end = [], time.monotonic() + seconds
    body = {"messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
            "max_tokens": 24, "ignore_eos": True}  # fmt: skip
    while time.monotonic() < end:
        statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code)
    return statuses


def number(page, selector: str) -> float:
    text = page.inner_text(selector).replace(",", "")
    return 0.0 if text == "-" else float(text)


def test_the_dashboard_in_a_browser(cluster):
    from playwright.sync_api import sync_playwright

    url, state, env, out = cluster
    executable = chromium()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/dashboard")

            # Every worker, its role as text, serving; read-only without a key.
            page.wait_for_selector("tr[data-worker='decode-1']", timeout=30_000)
            shown = {row.get_attribute("data-worker"): row.query_selector("td[data-role]").inner_text()
                     for row in page.query_selector_all("tr[data-worker]")}  # fmt: skip
            assert shown == {"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"}
            assert page.inner_text("#access") == "read-only"
            assert page.inner_text("#model") == "demo" and page.inner_text("#policy") == "cache_aware"

            # Numbers move under a short load (the page is pushed, never reloaded).
            tokens_seen: list[float] = []
            loader = threading.Thread(target=lambda: tokens_seen.extend(load(url, 6)))
            loader.start()
            peak = 0.0
            while loader.is_alive():
                peak = max(peak, number(page, "#stat-tokens"))
                time.sleep(0.25)
            loader.join()
            assert set(tokens_seen) == {200}, tokens_seen
            assert peak > 0, "tokens/s never moved on the page"
            page.wait_for_function(
                "() => [...document.querySelectorAll('td[data-total]')].some(td => +td.dataset.total > 0)",
                timeout=10_000,
            )
            assert page.query_selector_all("#chart-tps polyline"), "the throughput chart drew nothing"
            assert not errors, errors

            # Without the key the page may not act: the gateway refuses and nothing changes.
            refuse_switch(page)
            assert roles(state, env)["decode-1"] == "decode"

            # With the admin key, a role switch from the page, checked with `pdserve status`.
            page.fill("#key", ADMIN)
            page.click("#key-form button[type=submit]")
            page.wait_for_function("() => document.getElementById('access').textContent === 'admin'")
            page.select_option("select[data-role-select='decode-1']", "prefill")
            page.click("tr[data-worker='decode-1'] button[data-action='role']")
            page.wait_for_selector("#confirm[open]")
            assert "Switch decode-1 to prefill" in page.inner_text("#confirm-text")
            page.click("#confirm-yes")
            page.wait_for_function(
                "() => document.getElementById('action-status').textContent.includes('done')", timeout=60_000
            )
            assert roles(state, env) == {"prefill-0": "prefill", "decode-0": "decode", "decode-1": "prefill"}
            page.wait_for_selector("tr[data-worker='decode-1'] td[data-role='prefill']", timeout=10_000)
            page.wait_for_selector("#events li[data-kind='switch']", timeout=10_000)
            assert "by dashboard 127.0.0.1" in page.inner_text("#events li[data-kind='switch']")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert not [e for e in errors if "401" not in e], errors
        finally:
            browser.close()
    command_line_actions(url, state, env)
    audit = out.read_text()
    assert "pdserve.audit: admin action by dashboard 127.0.0.1: switch decode-1 to prefill: done" in audit
    assert "POST /admin/workers/decode-1/role: refused (missing or wrong admin key)" in audit


def refuse_switch(page) -> None:
    """Asks for a role switch from the page with no key: the confirmation, then the refusal."""
    page.select_option("select[data-role-select='decode-1']", "prefill")
    page.click("tr[data-worker='decode-1'] button[data-action='role']")
    page.wait_for_selector("#confirm[open]")
    page.click("#confirm-yes")
    page.wait_for_function(
        "() => document.getElementById('action-status').textContent.includes('refused (401)')", timeout=30_000
    )
    assert "admin key" in page.inner_text("#action-status")


def command_line_actions(url: str, state: Path, env: dict[str, str]) -> None:
    """`pdserve drain / undrain / restart / policy`: the same router calls the page makes."""

    def pdserve(*args: str, key: str = ADMIN):
        return run(*args, "--state-dir", str(state), env={**env, "PDSERVE_ADMIN_KEY": key})

    refused = pdserve("drain", "prefill-0", key="")
    assert refused.returncode == 1 and "admin key" in refused.stderr
    last = pdserve("restart", "decode-0")
    assert last.returncode == 1 and "last decode worker" in last.stderr
    drained = pdserve("drain", "prefill-0")
    assert drained.returncode == 0 and drained.stdout.strip() == "prefill-0 is now drained", drained.stderr
    undrained = pdserve("undrain", "prefill-0")
    assert undrained.stdout.strip() == "prefill-0 is now serving"
    policy = pdserve("policy", "round_robin")
    assert policy.stdout.strip() == "placement policy: cache_aware -> round_robin", policy.stderr
    events = httpx.get(f"{url}/admin/overview?samples=1", timeout=30).json()["events"]
    assert [e["kind"] for e in events if e["requested_by"].startswith("cli ")] == [
        "drain",
        "undrain",
        "policy",
    ]
