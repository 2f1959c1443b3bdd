"""The `device` setting: GPU workers for `pdserve up --address` on a cluster with GPU nodes."""

from __future__ import annotations

import pytest

from pdserve.config import ClusterConfig, ConfigError, load_config
from pdserve.launcher import LaunchError, controller_config, worker_cpus


def test_cuda_workers_each_take_a_gpu_and_nccl():
    config = load_config({"device": "cuda"}, {})
    controllers = controller_config(config)
    # start_worker gives an engine on CUDA num_gpus=1 (one worker per device) and NCCL transfers.
    assert controllers.engine.device == "cuda" and controllers.engine.on_gpu
    assert not controller_config(ClusterConfig()).engine.on_gpu  # cpu stays the default


def test_too_few_gpus_are_refused_with_the_numbers():
    with pytest.raises(LaunchError, match=r"2 GPU workers need 2 GPUs .* has 1"):
        worker_cpus(ClusterConfig(device="cuda"), {"CPU": 16.0, "GPU": 1.0}, on_gpu=True)


def test_a_bad_device_names_the_setting_and_the_choices():
    with pytest.raises(ConfigError) as refused:
        load_config({}, {"PDSERVE_DEVICE": "tpu"})
    assert "PDSERVE_DEVICE" in str(refused.value) and "'cpu', 'cuda'" in str(refused.value)
