"""A started controller for one test module (the fixtures of tests/cluster build their configs)."""

from __future__ import annotations

from collections.abc import Iterator

from pdserve.cluster.controller import ControllerConfig, start_controller


def running_controller(ray, config: ControllerConfig, name: str) -> Iterator:
    """Starts a controller named `name` with its workers, yields its handle, then shuts it down."""
    handle = start_controller(config, name=name)
    ray.get(handle.start.remote())
    yield handle
    ray.get(handle.shutdown.remote())
    ray.kill(handle)
