"""The types that cross process seams load without torch, so the router and gateway do not need it."""

from __future__ import annotations

import subprocess
import sys

# Modules whose types travel between the gateway, router, controller and workers.
WIRE_MODULES = (
    "pdserve.engine",
    "pdserve.engine.sampling_params",
    "pdserve.engine.outputs",
    "pdserve.engine.stats",
    "pdserve.engine.block_pool",
    "pdserve.engine.block_hash",
    "pdserve.roles.messages",
    "pdserve.roles.cache_events",
    "pdserve.roles.kv_channel",
    "pdserve.roles.handoff",  # the router drives disaggregated requests through it
    "pdserve.cluster.load_pressure",  # the planner's inputs and outputs, read by `pdserve status`
    "pdserve.cluster.planner",
    "pdserve.cluster.planner_metrics",
)


def test_wire_modules_do_not_import_torch():
    script = "\n".join(
        [
            *(f"import {m}" for m in WIRE_MODULES),
            # The package's lazy names of plain data load no more than their own modules.
            "from pdserve.engine import SamplingParams, RequestDelta, EngineStats, KVCacheEvent",
            "from pdserve.roles.messages import TokenChunk, WorkerLoad, Handoff, PrefillResult",
            "import sys",
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))",
            "assert not loaded, loaded",
        ]
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_the_package_still_hands_out_every_public_name():
    script = (
        "import pdserve.engine as engine\n"
        "from pdserve.engine import *\n"
        "missing = [name for name in engine.__all__ if name not in globals()]\n"
        "assert not missing, missing\n"
        "from pdserve.engine.engine import Engine, EngineStats\n"
        "assert engine.Engine is Engine and engine.EngineStats is EngineStats\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
