"""deploy/cluster.yaml and cluster.local.yaml: what `ray up` accepts, and what their head runs serves."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from pdserve.config import load_config
from tests.deploy.isolated_node import IsolatedNode

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER_FILES = ["cluster.yaml", "cluster.local.yaml"]
PDSERVE_SETTINGS = DEPLOY / "pdserve.yaml"


def ray_up_config(raw: dict) -> dict:
    """The config as `ray up` has it before it contacts a machine: Ray's defaults for the
    provider filled in (`prepare_config`), then checked against ray-schema.json (`validate_config`)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def read(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_files_pass_rays_own_validation(name):
    config = ray_up_config(read(name))
    assert config["docker"]["image"].startswith("pdserve:")  # deploy/Dockerfile's image
    assert config["file_mounts"] == {"~/pdserve": "."}  # the checkout, installed by setup_commands
    assert config["setup_commands"] == ["pip install --quiet --no-deps ~/pdserve"]
    serve = [c for c in config["head_start_ray_commands"] if "pdserve up" in c]
    assert serve == [
        "nohup pdserve up --config ~/pdserve/deploy/pdserve.yaml < /dev/null > ~/pdserve.log 2>&1 &"
    ]


def test_the_aws_cluster_has_gpu_and_cpu_worker_types():
    types = ray_up_config(read("cluster.yaml"))["available_node_types"]
    assert set(types) == {"head", "gpu", "cpu"}
    assert types["head"]["resources"] == {"CPU": 0}  # engines go to the worker nodes
    assert types["gpu"]["docker"] == {
        "worker_image": "pdserve:0.1.0-cuda",
        "worker_run_options": ["--gpus all"],
    }
    assert types["gpu"]["min_workers"] >= 2  # a prefill and a decode worker, one GPU each


def test_pdserve_settings_of_the_cluster_load_with_pdserves_schema():
    settings = load_config({}, {}, PDSERVE_SETTINGS)
    assert settings.address == "auto" and settings.prefill + settings.decode >= 2
    assert settings.host == "127.0.0.1"  # reached through `ray attach -p`, not opened to the internet


def test_rays_validation_refuses_a_misspelled_key():
    # The check above is only worth something if Ray's schema refuses what it does not know.
    raw = read("cluster.yaml")
    raw["available_node_types"]["gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        ray_up_config(raw)


@pytest.mark.slow
def test_the_heads_start_commands_serve_and_leave_nothing_behind(tmp_path):
    if not IsolatedNode.available():
        pytest.skip("needs Linux namespaces (root): the head's commands bind fixed ports and run `ray stop`")
    config = ray_up_config(read("cluster.yaml"))
    head = IsolatedNode(tmp_path / "head")
    try:
        # What `ray up` leaves on the head before it runs the start commands: the checkout (its
        # setup_commands installed it; here it is this one) and the filled-in config. Ray would
        # also pass the head type's resources (CPU 0); without worker nodes here the head keeps
        # its CPUs, so pdserve's workers run on it.
        (head.home / "pdserve").symlink_to(ROOT)
        (head.home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config))
        for command in config["head_start_ray_commands"]:
            done = head.run(command)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        log = head.home / "pdserve.log"
        head.wait_http_ok(
            "http://127.0.0.1:8000/health", 150, alive=lambda: any(" up " in p for p in head.processes())
        )

        status, body = head.http(
            "POST", "http://127.0.0.1:8000/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
             "max_tokens": 4, "ignore_eos": True},
        )  # fmt: skip
        assert status == 200, body
        answer = json.loads(body)
        assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["message"]["content"]

        shown = head.run("pdserve status")
        assert shown.returncode == 0, shown.stderr
        rows = {line.split()[0]: line.split() for line in shown.stdout.splitlines()[3:]}
        assert rows["prefill-0"][1:3] == ["prefill", "yes"] and rows["decode-0"][1:3] == ["decode", "yes"]

        stopped = head.run("pdserve down")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert head.run("ray stop").returncode == 0
        deadline = time.monotonic() + 20
        while head.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert head.processes() == [], log.read_text()[-2000:]
    finally:
        head.close()
