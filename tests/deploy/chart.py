"""The Helm chart as `helm install` would render it, and a check of what it renders, for the tests.

Helm's own engine (`helm-python-sdk`: Helm v4 as a library, no helm binary) lints and renders
the chart; built-in objects are checked with `kubernetes-validate` against KUBE_VERSION, and the
custom resources (KubeRay's RayCluster, Prometheus Operator's ServiceMonitor) against their CRDs'
schemas, kept in crd_schemas/ (SOURCES.md says where each comes from).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "pdserve"
# The oldest Kubernetes still in upstream support when this was written; Chart.yaml asks >= 1.25.
KUBE_VERSION = "1.33.0"
RELEASE = "pdserve"
NAMESPACE = "serving"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster.ray.io-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com-v1.json",
}


def render(values: dict | None = None) -> list[dict]:
    """Every object `helm install pdserve deploy/helm/pdserve` makes with `values` (NOTES.txt aside).

    Raises helm_python.HelmValuesError for values the chart's schema refuses, as install does."""
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def lint(values: dict | None = None) -> list[dict]:
    """`helm lint --strict` findings of warning severity or worse (info ones, like a missing icon, pass)."""
    import helm_python

    report = helm_python.lint(CHART, values or {}, strict=True, kube_version=f"v{KUBE_VERSION}")
    return [m for m in report["messages"] if m["severity"] >= 2]


def validate(obj: dict) -> None:
    """Raises when Kubernetes (or the resource's CRD) would refuse `obj`; strict: no unknown fields."""
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is None:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        return
    schema = json.loads((Path(__file__).parent / "crd_schemas" / crd).read_text())
    jsonschema.Draft7Validator(_strict(schema)).validate(obj)


def _strict(schema):
    """A CRD schema that refuses unknown fields, as kubernetes-validate's strict schemas do.

    (The API server would drop them silently: a misspelled field would simply not apply.)"""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def find(objects: list[dict], kind: str, name: str) -> dict:
    """The one rendered object of `kind` called `name`."""
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def secret_value(objects: list[dict], name: str, key: str) -> str:
    """A key of a rendered Secret, decoded."""
    return base64.b64decode(find(objects, "Secret", name)["data"][key]).decode()
