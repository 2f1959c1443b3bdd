"""Issue 26, items 11 and 12 as a user meets them: `pdserve up --api-key` never prints the key,
its router refuses calls without it, and `pdserve status` finds the key where `up` found it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest

from pdserve.cluster_state import running
from pdserve.proto import pdserve_pb2, pdserve_pb2_grpc
from tests.pdserve.test_launcher import PDSERVE, run
from tests.redis_server import spare_port

KEY = "Up-k3y-never-printed"


def test_up_with_a_key_hides_it_guards_the_router_and_status_reads_it_from_the_environment(
    moe_checkpoint, tmp_path
):
    port, router_port, state, out = spare_port(), spare_port(), tmp_path / "state", tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_API_KEY"}
    with open(out, "w") as log:
        up = subprocess.Popen(
            [*PDSERVE, "up", "--model", str(moe_checkpoint), "--port", str(port), "--router-port", str(router_port),
             "--kv-cache-blocks", "64", "--state-dir", str(state), "--api-key", KEY],
            stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not any(c.ready for c in running(state)):
                assert up.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.5)
            printed = Path(out).read_text()
            assert KEY not in printed
            assert (
                '-H "Authorization: Bearer $PDSERVE_API_KEY"' in printed
                and "export PDSERVE_API_KEY=" in printed
            )

            url, body = f"http://127.0.0.1:{port}/v1/completions", {"prompt": "def f", "max_tokens": 2}
            assert httpx.post(url, json=body, timeout=60).status_code == 401
            ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            assert ok.status_code == 200, ok.text

            channel = grpc.insecure_channel(f"127.0.0.1:{router_port}")
            with channel, pytest.raises(grpc.RpcError) as info:
                pdserve_pb2_grpc.RouterStub(channel).ClusterState(
                    pdserve_pb2.ClusterStateRequest(), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

            keyless = run("status", "--state-dir", str(state), env=env)
            assert keyless.returncode == 1 and "set PDSERVE_API_KEY" in keyless.stderr, keyless.stderr
            keyed = run("status", "--state-dir", str(state), env={**env, "PDSERVE_API_KEY": KEY})
            assert keyed.returncode == 0 and "prefill-0" in keyed.stdout and "decode-0" in keyed.stdout, (
                keyed.stderr
            )

            assert run("down", "--state-dir", str(state), env=env).returncode == 0
            assert up.wait(60) == 0
        finally:
            if up.poll() is None:
                up.kill()
    assert KEY not in Path(out).read_text()
