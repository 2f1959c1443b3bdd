"""One Ray instance for the whole test session, on loopback, sized for a 2-core machine."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # More logical CPUs than cores: test actors mostly wait, and each needs one CPU slot.
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
