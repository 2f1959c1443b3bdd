"""The chart's head and worker containers, run as processes, make a cluster that serves.

Each container's rendered command runs with its rendered environment on one `IsolatedNode`: the
chart's Services resolve to its loopback (as cluster DNS resolves them to the pods), the Secret's
keys are read from the rendered Secret, and the ConfigMap's files sit in a folder that stands
for the container's mount path. The head's Ray has no CPUs, so every engine runs on a worker pod.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.deploy.chart import RELEASE, find, render, secret_value
from tests.deploy.isolated_node import IsolatedNode

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/helm/pdserve/dashboards/pdserve.json"
VALUES = {"redis": {"enabled": False}}  # Redis and Ray's head both listen on 6379: pods, not one loopback


def container_env(container: dict, objects: list[dict], mounts: dict[str, Path]) -> dict[str, str]:
    """A container's environment as the kubelet would give it, with mount paths mapped to folders."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            value = item["value"]
            for mount, folder in mounts.items():
                value = value.replace(mount, str(folder))
            env[item["name"]] = value
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_value(objects, ref["name"], ref["key"])
    return env


def mount_configmaps(pod: dict, container: dict, objects: list[dict], root: Path) -> dict[str, Path]:
    """Writes each ConfigMap the container mounts into a folder; mount path -> folder."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    folders = {}
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue  # an emptyDir (/dev/shm): the machine's own serves
        folder = root / mount["name"]
        folder.mkdir(parents=True)
        for key, text in find(objects, "ConfigMap", source["name"])["data"].items():
            (folder / key).write_text(text)
        folders[mount["mountPath"]] = folder
    return folders


def wait_for_log(log: Path, line: str, process, timeout: float = 90) -> None:
    """Waits until `process` has written `line` to `log`."""
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {line!r} within {timeout:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.mark.slow
def test_rendered_head_and_worker_pods_serve_a_chat_completion(tmp_path):
    if not IsolatedNode.available():
        pytest.skip("needs Linux namespaces (root): the pods' commands bind fixed ports (6379, 8000)")
    objects = render(VALUES)
    services = [o["metadata"]["name"] for o in objects if o["kind"] == "Service"]
    node = IsolatedNode(tmp_path / "node", hosts={name: "127.0.0.1" for name in services})
    pods, envs = [], {}
    try:
        for deployment in (f"{RELEASE}-head", f"{RELEASE}-prefill", f"{RELEASE}-decode"):
            spec = find(objects, "Deployment", deployment)["spec"]
            pod = spec["template"]["spec"]
            (container,) = pod["containers"]
            mounts = mount_configmaps(pod, container, objects, tmp_path / deployment)
            env = envs[deployment] = container_env(container, objects, mounts)
            for replica in range(spec["replicas"]):
                log = tmp_path / f"{deployment}-{replica}.log"
                pods.append((deployment, node.spawn(container["command"], log, env), log))
                # One Ray node at a time: three booting at once on two loaded cores can outlast
                # Ray's start-up timeout (a pod would restart; a process here would just be gone).
                wait_for_log(log, "Ray runtime started", pods[-1][1])
            if deployment == f"{RELEASE}-head":
                # Pods start in any order: the head's `pdserve up` waits for the workers' Ray
                # nodes (its own has no CPUs) rather than refusing to start.
                wait_for_log(log, "waiting for Ray nodes to join", pods[-1][1])
        head = pods[0][1]

        def logs() -> str:
            return "\n".join(f"--- {name}\n{log.read_text()[-1500:]}" for name, _, log in pods)

        gateway = "http://127.0.0.1:8000"
        try:
            node.wait_http_ok(f"{gateway}/health", 180, alive=lambda: head.poll() is None)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{logs()}") from None
        key = secret_value(objects, f"{RELEASE}-keys", "api-key")
        chat = {"messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
                "max_tokens": 4, "ignore_eos": True}  # fmt: skip
        assert node.http("POST", f"{gateway}/v1/chat/completions", chat)[0] == 401  # the Secret's key is on
        status, body = node.http(
            "POST", f"{gateway}/v1/chat/completions", chat, headers={"Authorization": f"Bearer {key}"}
        )
        assert status == 200, f"{body}\n{logs()}"
        assert json.loads(body)["usage"]["completion_tokens"] == 4

        # Every metric the Grafana dashboard charts is one the cluster declares (a labelled counter
        # such as failed transfers has no sample before its first failure, but has its TYPE line).
        metrics = node.http("GET", f"{gateway}/metrics")[1]
        exported = set(re.findall(r"^# TYPE (pdserve_\w+) ", metrics, re.M))
        charted = {
            re.sub(r"_bucket$", "", name)  # a histogram's series; its TYPE line names the histogram
            for panel in json.loads(DASHBOARD.read_text())["panels"]
            for target in panel["targets"]
            for name in re.findall(r"pdserve_\w+", target["expr"])
        }
        assert charted <= exported, charted - exported

        # `kubectl exec deploy/pdserve-head -- pdserve status` (exec runs with the container's env)
        shown = node.run("pdserve status", envs[f"{RELEASE}-head"])
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"^prefill-0 +prefill +yes", shown.stdout, re.M), shown.stdout
        assert re.search(r"^decode-0 +decode +yes", shown.stdout, re.M), shown.stdout

        # Deleting the pods: SIGTERM to each container's process; pdserve up stops cleanly.
        node.terminate(head)
        assert head.wait(60) == 0, logs()
        assert "stopping" in pods[0][2].read_text()
        for _, process, log in pods[1:]:
            node.terminate(process)
            # `ray start --block` drains its node, stops its processes and exits 1 by design.
            assert process.wait(60) == 1 and "received SIGTERM" in log.read_text(), logs()
        # No engine, controller or pdserve left (the head's Ray daemons go with its container).
        pdserve_parts = ("ray::Worker", "ray::Controller", "pdserve")
        assert [p for p in node.processes() if p.startswith(pdserve_parts) or "pdserve.cli" in p] == []
    finally:
        node.close()
