"""What importing `pdserve` does to the process: it asks OpenMP for passive waiting (DECISIONS.md)."""

from __future__ import annotations

import os
import subprocess
import sys


def _policy_after(code: str, env_policy: str | None = None) -> str:
    """OMP_WAIT_POLICY as a fresh interpreter sees it after running `code`."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    script = f"{code}\nimport os\nprint(os.environ.get('OMP_WAIT_POLICY', '<unset>'))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_importing_pdserve_before_torch_asks_for_passive_waiting():
    assert _policy_after("import pdserve") == "PASSIVE"
    # `from pdserve.engine import ...` loads the package first, so torch comes after it.
    assert _policy_after("import pdserve.engine.layers.linear") == "PASSIVE"


def test_a_policy_the_user_set_is_kept():
    assert _policy_after("import pdserve", env_policy="ACTIVE") == "ACTIVE"


def test_after_torch_is_loaded_the_variable_is_left_alone():
    # OpenMP has read the policy by then; setting it would only make the engine's check lie.
    assert _policy_after("import torch\nimport pdserve") == "<unset>"
