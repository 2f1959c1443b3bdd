"""deploy/helm/pdserve: lint, render with several value sets, validate every object, refuse bad values."""

from __future__ import annotations

import json
import shlex

import helm_python
import pytest
import yaml

from pdserve.config import load_config
from tests.deploy.chart import CHART, RELEASE, find, lint, render, secret_value, validate

GPU = {
    "device": "cuda",
    "workers": {
        "prefill": {"replicas": 2, "enginesPerPod": 1, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "decode": {"replicas": 1, "enginesPerPod": 2,
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
}  # fmt: skip
VALUE_SETS = {
    "defaults": {},
    "gpu": GPU,
    "external-redis": {"redisUrl": "redis://redis.cache.svc:6379/1"},
    "kuberay": {"kuberay": {"enabled": True}},
    "kuberay-gpu": {"kuberay": {"enabled": True}, **GPU},
    "everything-on": {
        "auth": {"adminKey": {"enabled": True}},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "tls": [{"secretName": "tls", "hosts": ["a.example"]}],
        },
        "metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
        "workers": {"prefill": {"replicas": 0}, "decode": {"replicas": 0}, "both": {"replicas": 2}},
    },
}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_chart_lints_clean(name):
    assert lint(VALUE_SETS[name]) == []


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_is_valid_for_kubernetes(name):
    objects = render(VALUE_SETS[name])
    assert objects
    for obj in objects:
        validate(obj)


def containers(obj: dict) -> list[dict]:
    """The containers of a Deployment's pods, or of every group of a RayCluster."""
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]["containers"]
    groups = [obj["spec"]["headGroupSpec"], *obj["spec"]["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def pdserve_settings(objects: list[dict], tmp_path) -> object:
    """The ConfigMap's settings file as `pdserve up` in the head reads it (pdserve's own schema)."""
    text = find(objects, "ConfigMap", f"{RELEASE}-config")["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(text)
    return load_config({}, {}, tmp_path / "config.yaml")


def test_defaults_deploy_a_head_and_a_worker_pod_per_role(tmp_path):
    objects = render()
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    assert deployments == {f"{RELEASE}-head", f"{RELEASE}-prefill", f"{RELEASE}-decode", f"{RELEASE}-redis"}
    settings = pdserve_settings(objects, tmp_path)
    assert (settings.prefill, settings.decode, settings.both) == (1, 1, 0)
    assert settings.address == "auto" and settings.host == "0.0.0.0" and settings.device == "cpu"
    assert settings.redis_url == f"redis://{RELEASE}-redis:6379/0"

    head = containers(find(objects, "Deployment", f"{RELEASE}-head"))[0]
    assert head["image"] == "pdserve:0.1.0-cpu"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert head[probe]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e for e in head["env"]}
    assert env["PDSERVE_CONFIG"]["value"] == "/etc/pdserve/config.yaml"
    assert env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{RELEASE}-keys",
        "key": "api-key",
    }
    assert "PDSERVE_ADMIN_KEY" not in env  # only when an admin key is configured
    assert len(secret_value(objects, f"{RELEASE}-keys", "api-key")) == 40  # generated

    service = find(objects, "Service", RELEASE)
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "head"
    pdb = find(objects, "PodDisruptionBudget", f"{RELEASE}-workers")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    prefill = containers(find(objects, "Deployment", f"{RELEASE}-prefill"))[0]
    assert "--num-gpus=0" in shlex.split(prefill["command"][2])
    assert "resources" in prefill and "nvidia.com/gpu" not in prefill["resources"].get("limits", {})


def test_gpu_workers_ask_for_one_gpu_per_engine_where_they_are_told(tmp_path):
    objects = render(GPU)
    settings = pdserve_settings(objects, tmp_path)
    assert (settings.prefill, settings.decode, settings.device) == (2, 2, "cuda")
    prefill = find(objects, "Deployment", f"{RELEASE}-prefill")
    decode = find(objects, "Deployment", f"{RELEASE}-decode")
    assert prefill["spec"]["replicas"] == 2 and decode["spec"]["replicas"] == 1
    for deployment, gpus in ((prefill, 1), (decode, 2)):
        (container,) = containers(deployment)
        assert container["image"] == "pdserve:0.1.0-cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        argv = shlex.split(container["command"][2])
        assert f"--num-gpus={gpus}" in argv and f"--num-cpus={gpus}" in argv
    pod = prefill["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == GPU["workers"]["prefill"]["nodeSelector"]
    assert pod["tolerations"] == GPU["workers"]["prefill"]["tolerations"]
    assert "nodeSelector" not in decode["spec"]["template"]["spec"]


def test_an_external_redis_turns_the_bundled_one_off(tmp_path):
    objects = render(VALUE_SETS["external-redis"])
    assert not [o for o in objects if "redis" in o["metadata"]["name"]]
    assert pdserve_settings(objects, tmp_path).redis_url == "redis://redis.cache.svc:6379/1"


def test_kuberay_renders_a_raycluster_with_the_same_pods(tmp_path):
    plain, kuberay = render(), render(VALUE_SETS["kuberay"])
    assert not [
        o for o in kuberay if o["kind"] == "Deployment" and o["metadata"]["name"] != f"{RELEASE}-redis"
    ]
    cluster = find(kuberay, "RayCluster", RELEASE)
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"} and groups["prefill"]["replicas"] == 1
    # The same commands as the plain pods; the workers join KubeRay's head Service.
    head, prefill = containers(cluster)[0], containers(cluster)[1]
    assert head["command"] == containers(find(plain, "Deployment", f"{RELEASE}-head"))[0]["command"]
    assert prefill["command"] == containers(find(plain, "Deployment", f"{RELEASE}-prefill"))[0]["command"]
    assert {"name": "RAY_HEAD_ADDRESS", "value": f"{RELEASE}-head-svc:6379"} in prefill["env"]
    # The gateway Service selects the head pod KubeRay makes from the template.
    labels = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    selector = find(kuberay, "Service", RELEASE)["spec"]["selector"]
    assert selector.items() <= labels.items()
    assert pdserve_settings(kuberay, tmp_path) == pdserve_settings(plain, tmp_path)


def test_optional_parts_render_when_asked(tmp_path):
    objects = render(VALUE_SETS["everything-on"])
    head = containers(find(objects, "Deployment", f"{RELEASE}-head"))[0]
    env = {e["name"]: e for e in head["env"]}
    assert env["PDSERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-key"
    assert len(secret_value(objects, f"{RELEASE}-keys", "admin-key")) == 40
    ingress = find(objects, "Ingress", RELEASE)
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == RELEASE
    monitor = find(objects, "ServiceMonitor", RELEASE)
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    dashboard = json.loads(find(objects, "ConfigMap", f"{RELEASE}-dashboard")["data"]["pdserve.json"])
    assert dashboard["uid"] == "pdserve" and dashboard["panels"]
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"} >= {f"{RELEASE}-both"}
    settings = pdserve_settings(objects, tmp_path)
    assert (settings.prefill, settings.decode, settings.both) == (0, 0, 2)


def test_given_and_existing_keys(tmp_path):
    given = render({"auth": {"apiKey": "sk-mine"}})
    assert secret_value(given, f"{RELEASE}-keys", "api-key") == "sk-mine"
    existing = render({"auth": {"existingSecret": "team-keys", "adminKey": {"enabled": True}}})
    assert not [o for o in existing if o["kind"] == "Secret"]
    env = {e["name"]: e for e in containers(find(existing, "Deployment", f"{RELEASE}-head"))[0]["env"]}
    assert env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-keys", "key": "api-key"}
    assert env["PDSERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-keys", "key": "admin-key"}
    open_gateway = render({"auth": {"enabled": False}})
    assert not [o for o in open_gateway if o["kind"] == "Secret"]


@pytest.mark.parametrize(
    "values, named",
    [
        ({"workers": {"prefill": {"replicas": -1}}}, "/workers/prefill/replicas"),
        ({"device": "tpu"}, "/device"),
        ({"workrs": {}}, "'workrs' not allowed"),
        ({"redisUrl": "http://redis:6379"}, "/redisUrl"),
        ({"gateway": {"port": 70000}}, "/gateway/port"),
        ({"pdserve": {"extraConfig": {"port": 9000}}}, "/pdserve/extraConfig"),
        ({"workers": {"decode": {"replicas": "2"}}}, "/workers/decode/replicas"),
    ],
)
def test_bad_values_are_refused_naming_the_key(values, named):
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(values)
    assert named in str(refused.value)


def test_prefill_without_decode_is_refused_with_the_fix():
    with pytest.raises(
        helm_python.HelmRenderError, match=r"workers\.prefill and workers\.decode come together"
    ):
        render({"workers": {"decode": {"replicas": 0}}})


def test_extra_pdserve_settings_reach_the_config_and_bad_ones_fail_in_pdserves_schema(tmp_path):
    objects = render({"pdserve": {"extraConfig": {"kv_cache_blocks": 4096, "dtype": "bfloat16"}}})
    settings = pdserve_settings(objects, tmp_path)
    assert settings.kv_cache_blocks == 4096 and settings.dtype == "bfloat16"
    # The chart passes extraConfig on; pdserve's own schema names a bad key when the head starts.
    objects = render({"pdserve": {"extraConfig": {"kv_cache_block": 4096}}})
    with pytest.raises(ValueError, match="kv_cache_block"):
        pdserve_settings(objects, tmp_path)


def test_values_yaml_documents_every_key_the_schema_knows():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]) - {"global"}


def test_the_validation_refuses_misspelled_fields():
    # What the checks above are worth: a typo in a built-in object or a custom resource fails.
    objects = render({"kuberay": {"enabled": True}})
    service = find(objects, "Service", RELEASE)
    service["spec"]["selectr"] = service["spec"].pop("selector")
    cluster = find(objects, "RayCluster", RELEASE)
    cluster["spec"]["workerGroupSpec"] = cluster["spec"].pop("workerGroupSpecs")
    for obj, typo in ((service, "selectr"), (cluster, "workerGroupSpec")):
        with pytest.raises(Exception, match=typo):
            validate(obj)
