"""`pdserve.config`: one schema for the YAML file, `PDSERVE_*` variables and `pdserve up` flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pdserve.cli import build_parser, main
from pdserve.config import FIELDS, ClusterConfig, ConfigError, env_name, flag_name, load_config

# One valid, non-default value per setting: a new setting must add one here, and so is checked
# in all three sources.
SAMPLES: dict[str, Any] = {
    "name": "team-a_1",
    "model": "/models/ernie",
    "load_format": "dummy",
    "hf_overrides": {"num_hidden_layers": 2},
    "dtype": "bfloat16",
    "seed": 7,
    "threads": 2,
    "device": "cuda",
    "cpu_gemm": "openblas",
    "cpu_binding": "off",
    "prefill": 3,
    "decode": 2,
    "both": 1,
    "host": "0.0.0.0",
    "port": 9000,
    "router_port": 9001,
    "policy": "round_robin",
    "redis_url": "redis://10.0.0.5:6379/0",
    "address": "10.0.0.1:6379",
    "api_key": "sk-test",
    "admin_key": "adm-test",
    "max_body_bytes": 8 * 2**20,
    "body_timeout_s": 12.5,
    "header_timeout_s": 4.0,
    "keep_alive_timeout_s": 2.0,
    "tokenizer_threads": 4,
    "max_chars_per_token": 48,
    "metrics_cache_s": 0.5,
    "router_host": "0.0.0.0",
    "local_prefill_tokens": 128,
    "drain_timeout_s": 45.0,
    "kv_cache_blocks": 64,
    "state_dir": Path("/var/run/pdserve"),
    "speculative_config": {"method": "ngram", "num_speculative_tokens": 4},
    "quantization": "wint4",
    "role_planner": {"enabled": False, "ttft_target_ms": 800, "hysteresis": 2},
    "context_cache": {"redis_url": "redis://10.0.0.5:6379/1", "max_bytes": 2**30, "min_reuse": 2},
    "expert_parallel": {"size": 1, "timeout_s": 30},  # size 2 would be refused on cuda
}


def text(value: Any) -> str:
    """A value as typed in an environment variable or on the command line."""
    return json.dumps(value) if isinstance(value, dict) else str(value)


def write_yaml(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def flags_of(argv: list[str]) -> dict[str, Any]:
    """The schema flags `pdserve up ARGV` passes to `load_config`, through the real parser."""
    args = build_parser().parse_args(["up", *argv])
    return {k: v for k, v in vars(args).items() if k in FIELDS}


def test_every_setting_has_the_same_name_in_file_env_and_flags(tmp_path):
    assert set(SAMPLES) == set(FIELDS)
    lines = [f"{k}: {json.dumps(text(v) if isinstance(v, Path) else v)}" for k, v in SAMPLES.items()]
    from_file = load_config({}, {}, write_yaml(tmp_path / "all.yaml", "\n".join(lines)))
    from_env = load_config({}, {env_name(k): text(v) for k, v in SAMPLES.items()})
    from_flags = load_config(flags_of([a for k, v in SAMPLES.items() for a in (flag_name(k), text(v))]), {})
    expected = ClusterConfig(**SAMPLES)
    assert from_file == from_env == from_flags == expected
    assert expected != ClusterConfig()  # every sample differs from the default


def test_flags_win_over_env_over_file_over_defaults(tmp_path):
    file = write_yaml(tmp_path / "c.yaml", "port: 8101\nrouter_port: 8201\npolicy: least_load\n")
    env = {"PDSERVE_PORT": "8102", "PDSERVE_ROUTER_PORT": "8202"}
    c = load_config(flags_of(["--port", "8103"]), env, file)
    assert (c.port, c.router_port, c.policy, c.prefill) == (8103, 8202, "least_load", 1)
    assert load_config({}, env, file).port == 8102
    assert load_config({}, {}, file).port == 8101
    assert load_config({}, {}).port == 8000
    # PDSERVE_CONFIG names the file when --config does not.
    assert load_config({}, {"PDSERVE_CONFIG": str(file)}).port == 8101


def test_empty_env_or_flag_value_unsets_an_optional_setting(tmp_path):
    file = write_yaml(tmp_path / "c.yaml", "redis_url: redis://127.0.0.1:6379\nthreads: 4\n")
    c = load_config(flags_of(["--threads", ""]), {"PDSERVE_REDIS_URL": ""}, file)
    assert c.redis_url is None and c.threads is None
    assert load_config({}, {"PDSERVE_STATE_DIR": "~/pd"}).state_dir == Path.home() / "pd"


def test_dict_settings_from_yaml_mapping_env_json_and_flag_json(tmp_path):
    file = write_yaml(tmp_path / "c.yaml", "hf_overrides:\n  num_hidden_layers: 2\n  rope_theta: 10000.0\n")
    assert load_config({}, {}, file).hf_overrides == {"num_hidden_layers": 2, "rope_theta": 10000.0}
    spec = {"method": "draft", "model": "demo-draft", "num_speculative_tokens": 3}
    c = load_config({}, {"PDSERVE_SPECULATIVE_CONFIG": json.dumps(spec)})
    assert c.speculative_config == spec and c.hf_overrides == {}
    c = load_config(flags_of(["--speculative-config", json.dumps(spec), "--hf-overrides", "{}"]), {}, file)
    assert c.speculative_config == spec and c.hf_overrides == {}


@pytest.mark.parametrize(
    "flags, env, yaml_body, message",
    [
        ({}, {}, "redis_ur: redis://x\n", "config file {file}: unknown key 'redis_ur' (did you mean 'redis_url'?)"),
        ({}, {"PDSERVE_REDIS_UR": "redis://x"}, None, "PDSERVE_REDIS_UR: unknown setting (did you mean 'PDSERVE_REDIS_URL'?)"),
        ({"prefil": "2"}, {}, None, "--prefil: unknown flag (did you mean 'prefill'?)"),
        ({}, {"PDSERVE_PORT": "abc"}, None, "PDSERVE_PORT: must be an integer in 1..65535, got 'abc'"),
        ({}, {}, "port: 0\n", "config file {file}: port: must be an integer in 1..65535, got 0"),
        ({}, {}, "prefill: true\n", "config file {file}: prefill: must be an integer >= 0, got True"),
        ({"policy": "fastest"}, {}, None, "--policy: must be one of 'round_robin', 'least_load', 'power_of_two', 'cache_aware', got 'fastest'"),
        ({"kv_cache_blocks": "0"}, {}, None, "--kv-cache-blocks: must be an integer >= 1 or unset, got '0'"),
        ({}, {"PDSERVE_REDIS_URL": "localhost:6379"}, None, "PDSERVE_REDIS_URL: must be a redis://, rediss:// or unix:// URL"),
        ({}, {"PDSERVE_HF_OVERRIDES": "{num_hidden_layers: 2}"}, None, "PDSERVE_HF_OVERRIDES: must be a JSON object"),
        ({"speculative_config": "[4]"}, {}, None, "--speculative-config: must be a JSON object (a mapping in YAML) or unset, got [4]"),
        ({}, {}, "hf_overrides: [1, 2]\n", "config file {file}: hf_overrides: must be a JSON object"),
        ({}, {}, "model: 3\n", "config file {file}: model: must be a non-empty string, got 3"),
        ({}, {}, "- port\n", "config file {file}: must be a mapping of settings, got list"),
        ({}, {"PDSERVE_ROLE_PLANNER": '{"ttft_target": 800}'}, None, "PDSERVE_ROLE_PLANNER: unknown key 'ttft_target' (did you mean 'ttft_target_ms'?); keys are enabled, interval_s,"),
        ({"role_planner": '{"interval_s": 0}'}, {}, None, "--role-planner: interval_s must be > 0, got 0"),
        ({}, {}, "role_planner:\n  min_decode: true\n", "config file {file}: role_planner: min_decode must be an integer >= 1, got True"),
        ({}, {}, "role_planner:\n  cooldown_s: soon\n", "config file {file}: role_planner: cooldown_s must be a number, got 'soon'"),
        ({}, {}, "role_planner: on\n", "config file {file}: role_planner: must be a JSON object (a mapping in YAML) of enabled,"),
        ({"role_planner": "{enabled: true}"}, {}, None, "--role-planner: must be a JSON object"),
        ({"context_cache": '{"ttl": 5}'}, {}, None, "--context-cache: unknown key 'ttl' (did you mean 'ttl_s'?)"),
        ({}, {"PDSERVE_CONTEXT_CACHE": '{"redis_url": "localhost:6379"}'}, None,
         "PDSERVE_CONTEXT_CACHE: redis_url must be a redis://, rediss:// or unix:// URL"),
        ({}, {}, "context_cache:\n  max_bytes: 0\n", "config file {file}: context_cache: max_bytes must be a positive integer, got 0"),
        ({}, {}, "port: [\n", "config file {file}: not valid YAML at line 2"),
    ],
)  # fmt: skip
def test_unknown_keys_and_bad_values_are_refused_by_name_and_source(tmp_path, flags, env, yaml_body, message):
    file = write_yaml(tmp_path / "deploy.yaml", yaml_body) if yaml_body is not None else None
    with pytest.raises(ConfigError) as e:
        load_config(flags, env, file)
    assert message.format(file=file) in str(e.value)


def test_every_bad_key_is_named_in_one_line():
    with pytest.raises(ConfigError) as e:
        load_config({"port": "x"}, {"PDSERVE_DECODE": "-1"})
    assert "--port:" in str(e.value) and "PDSERVE_DECODE:" in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file_and_test_variables(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml: no such file"):
        load_config({}, {}, tmp_path / "nope.yaml")
    # The test suite's own variables (PDSERVE_TEST_*) are not settings and do not stop `up`.
    assert (
        load_config({}, {"PDSERVE_TEST_REDIS_URL": "redis://127.0.0.1:6379", "HOME": "/x"}).redis_url is None
    )


def test_flags_are_exact_names(capsys):
    # No argparse abbreviations: --redis-ur is refused, as PDSERVE_REDIS_UR and redis_ur are.
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["up", "--redis-ur", "redis://x"])
    assert e.value.code == 2 and "--redis-ur" in capsys.readouterr().err


def test_policy_names_match_the_router():
    from typing import get_args

    from pdserve.router.policies import POLICIES

    assert set(get_args(FIELDS["policy"].annotation)) == set(POLICIES)


def test_bad_env_in_up_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PDSERVE_PORT", "abc")
    assert main(["up", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "pdserve up: error: PDSERVE_PORT: must be an integer in 1..65535, got 'abc'"


def test_up_with_a_bad_config_file_starts_nothing(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", f"model: demo\nstate_dir: {tmp_path}\nredis_ur: redis://x\n")
    # -X importtime lists every module imported: Ray is not even imported, so nothing was started.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pdserve.cli", "up", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    printed = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and printed == [
        f"pdserve up: error: config file {bad}: unknown key 'redis_ur' (did you mean 'redis_url'?)"
    ]
    assert "pdserve.config" in imported and "ray" not in imported and "torch" not in imported
    assert not (tmp_path / "clusters").exists()


def test_launch_settings_come_from_the_config():
    from pdserve import launcher  # imports Ray: only this test needs it

    config = ClusterConfig(**{**SAMPLES, "speculative_config": None})
    router = launcher.router_config(config)
    assert (router.port, router.policy, router.redis_url) == (9001, "round_robin", SAMPLES["redis_url"])
    engine = launcher.engine_config(config)
    assert (engine.model, engine.num_threads, engine.kv_cache_blocks) == ("/models/ernie", 2, 64)
    assert engine.hf_overrides == {"num_hidden_layers": 2} and engine.progress is False
    assert launcher.engine_config(ClusterConfig()).num_threads == 1  # workers share the cores
    cc = launcher.controller_config(config)
    assert (cc.prefill, cc.decode, cc.both) == (3, 2, 1)

    spec = SAMPLES["speculative_config"]
    cc = launcher.controller_config(ClusterConfig(model="demo", speculative_config=spec))
    # One engine for every role: roles switch without reloading, and MTP's KV moves in handoffs.
    assert cc.engine.speculative_config is not None and cc.engine.speculative_config.method == "ngram"
    with pytest.raises(ValueError, match="speculative_config"):  # refused before anything starts
        launcher.engine_config(ClusterConfig(model="demo", speculative_config={"method": "guess"}))


def test_role_planner_settings_keep_defaults_for_missing_keys_and_reach_the_controller(tmp_path):
    from pdserve import launcher  # imports Ray: only the controller part needs it
    from pdserve.cluster.planner import RolePlannerConfig

    assert load_config({}, {}).role_planner == RolePlannerConfig()
    file = write_yaml(tmp_path / "c.yaml", "role_planner:\n  cooldown_s: 0\n  min_decode: 2\n")
    planner = load_config({}, {}, file).role_planner
    assert (planner.cooldown_s, planner.min_decode, planner.interval_s) == (
        0.0,
        2,
        RolePlannerConfig.interval_s,
    )
    # A variable replaces the file's mapping as a whole, as for every mapping-valued setting.
    planner = load_config({}, {"PDSERVE_ROLE_PLANNER": '{"itl_target_ms": 80}'}, file).role_planner
    assert (planner.itl_target_ms, planner.min_decode) == (80.0, 1)
    config = load_config(flags_of(["--role-planner", '{"enabled": false, "hysteresis": 4}']), {})
    cc = launcher.controller_config(config)
    assert cc.role_planner == RolePlannerConfig(enabled=False, hysteresis=4)
    up = next(a for a in build_parser()._actions if a.dest == "command").choices["up"]
    flag = next(a for a in up._actions if a.dest == "role_planner")
    assert flag.metavar == "JSON" and '"ttft_target_ms": 500.0' in flag.help  # defaults shown as JSON


def test_context_cache_settings_keep_defaults_and_reach_every_engine():
    from pdserve import launcher
    from pdserve.engine.context_cache_config import ContextCacheConfig

    assert not load_config({}, {}).context_cache.enabled  # off unless a Redis is named
    config = load_config(
        flags_of(["--context-cache", '{"redis_url": "redis://127.0.0.1:6399", "ttl_s": 60}']), {}
    )
    engine = launcher.engine_config(config)
    assert engine.context_cache == ContextCacheConfig(redis_url="redis://127.0.0.1:6399", ttl_s=60)
    assert launcher.controller_config(config).engine.context_cache == engine.context_cache


def test_expert_parallel_settings_reach_every_engine_and_bad_ones_are_named(
    tmp_path, moe_checkpoint, dense_checkpoint
):
    from pdserve import launcher
    from pdserve.engine.engine import check_model
    from pdserve.engine.expert_parallel.config import ExpertParallelConfig

    assert load_config({}, {}).expert_parallel.group == ExpertParallelConfig()  # size 1: plain workers
    file = write_yaml(tmp_path / "ep.yaml", "expert_parallel:\n  size: 2\n  rebalance_interval_s: 30\n")
    ep = load_config({}, {}, file).expert_parallel
    assert ep.group == ExpertParallelConfig(size=2, rebalance_interval_s=30)
    assert ep.roles == ("prefill", "decode", "both")  # every worker a group unless roles says which
    config = load_config({}, {"PDSERVE_EXPERT_PARALLEL": '{"size": 2}'})
    controller = launcher.controller_config(config)
    assert controller.engine.expert_parallel == ExpertParallelConfig(size=2)
    assert controller.slot_engine("prefill") == controller.slot_engine("decode") == controller.engine
    with pytest.raises(ConfigError, match=r"--expert-parallel: unknown key 'sise' \(did you mean 'size'\?\)"):
        load_config(flags_of(["--expert-parallel", '{"sise": 2}']), {})
    with pytest.raises(
        ConfigError, match=r"unknown key 'role' \(did you mean 'roles'\?\); keys are .*, roles"
    ):
        load_config(flags_of(["--expert-parallel", '{"size": 2, "role": ["decode"]}']), {})
    with pytest.raises(
        ConfigError, match=r"PDSERVE_EXPERT_PARALLEL: expert_parallel\.size must be an integer"
    ):
        load_config({}, {"PDSERVE_EXPERT_PARALLEL": '{"size": 0}'})
    with pytest.raises(ConfigError, match="needs a GPU per rank"):
        load_config(flags_of(["--expert-parallel", '{"size": 2}', "--device", "cuda"]), {})
    # What needs the model is checked before any worker starts (`up` runs check_model first).
    engine = launcher.engine_config(
        load_config({"model": str(moe_checkpoint), "expert_parallel": '{"size": 2}'}, {})
    )
    check_model(engine)
    with pytest.raises(ValueError, match=r"expert_parallel\.size \(8\) exceeds the model's 6 routed experts"):
        check_model(
            launcher.engine_config(
                load_config({"model": str(moe_checkpoint), "expert_parallel": '{"size": 8}'}, {})
            )
        )
    with pytest.raises(ValueError, match="has no routed experts"):
        check_model(
            launcher.engine_config(
                load_config({"model": str(dense_checkpoint), "expert_parallel": '{"size": 2}'}, {})
            )
        )


def test_expert_parallel_roles_make_a_mixed_cluster_and_bad_roles_are_named(tmp_path):
    from pdserve import launcher
    from pdserve.engine.expert_parallel.config import ExpertParallelConfig

    file = write_yaml(tmp_path / "mixed.yaml", "expert_parallel:\n  size: 2\n  roles: [decode]\n")
    config = load_config({}, {}, file)
    assert config.expert_parallel.roles == ("decode",)
    controller = launcher.controller_config(config)
    assert controller.expert_parallel_roles == ("decode",)
    assert controller.slot_engine("decode").expert_parallel == ExpertParallelConfig(size=2)
    assert controller.slot_engine("prefill").expert_parallel == ExpertParallelConfig()  # a plain engine
    assert controller.slot_engine("prefill").model == controller.engine.model
    with pytest.raises(ConfigError, match=r"--expert-parallel: expert_parallel\.roles: unknown role 'decod' "
                                          r"\(did you mean 'decode'\?\); roles are prefill, decode, both"):  # fmt: skip
        load_config(flags_of(["--expert-parallel", '{"size": 2, "roles": ["decod"]}']), {})
    with pytest.raises(ConfigError, match=r"expert_parallel\.roles must be a non-empty list"):
        load_config(flags_of(["--expert-parallel", '{"size": 2, "roles": "decode"}']), {})
    with pytest.raises(ConfigError, match=r"expert_parallel\.roles lists a role twice"):
        load_config(flags_of(["--expert-parallel", '{"size": 2, "roles": ["decode", "decode"]}']), {})
    with pytest.raises(
        ConfigError, match=r"expert_parallel\.roles \['decode'\] names no role this cluster has workers in "
        r"\(prefill 0, decode 0, both 2\)"
    ):  # fmt: skip
        load_config(flags_of(["--expert-parallel", '{"size": 2, "roles": ["decode"]}', "--both", "2"]), {})


def test_the_gateway_takes_its_limits_from_the_served_model():
    from pdserve import launcher
    from pdserve.engine.served_model import ServedModel

    served = ServedModel("tiny", "/models/tiny", max_model_len=2048, vocab_size=100, block_size=16,
                         num_kv_blocks=128, dtype="float32")  # fmt: skip
    gateway = launcher.gateway_config(ClusterConfig(**{**SAMPLES, "speculative_config": None}), served, 9001)
    assert (gateway.model_name, gateway.tokenizer_path, gateway.max_model_len) == (
        "tiny",
        "/models/tiny",
        2048,
    )
    # The router binds every interface (router_host 0.0.0.0); the gateway beside it dials loopback.
    assert (gateway.router_address, gateway.api_key) == ("127.0.0.1:9001", "sk-test")


def test_engine_settings_reach_every_workers_engine_config():
    from pdserve import launcher  # imports Ray: only this test needs it

    config = ClusterConfig(
        **{
            k: SAMPLES[k]
            for k in ("model", "load_format", "hf_overrides", "dtype", "seed", "threads", "cpu_gemm")
        },
        kv_cache_blocks=64,
        speculative_config=SAMPLES["speculative_config"],
    )
    engine = launcher.engine_config(config)
    assert (engine.model, engine.load_format, engine.hf_overrides) == (
        "/models/ernie",
        "dummy",
        {"num_hidden_layers": 2},
    )
    assert (engine.dtype, engine.seed, engine.num_threads, engine.cpu_gemm) == ("bfloat16", 7, 2, "openblas")
    assert engine.kv_cache_blocks == 64 and engine.speculative_config.num_speculative_tokens == 4


def test_down_and_status_find_the_state_dir_the_way_up_does(tmp_path, monkeypatch, capsys):
    from_file, from_env, from_flag = (tmp_path / name for name in ("file-state", "env-state", "flag-state"))
    config = write_yaml(tmp_path / "cluster.yaml", f"state_dir: {from_file}\nmodel: demo\n")
    monkeypatch.delenv("PDSERVE_STATE_DIR", raising=False)
    monkeypatch.delenv("PDSERVE_CONFIG", raising=False)

    def looked_in(*argv: str) -> str:
        assert main(list(argv)) == 1  # nothing is running in any of them
        return capsys.readouterr().err

    assert str(from_file) in looked_in("status", "--config", str(config))
    monkeypatch.setenv("PDSERVE_CONFIG", str(config))
    assert str(from_file) in looked_in("down")
    monkeypatch.setenv("PDSERVE_STATE_DIR", str(from_env))
    assert str(from_env) in looked_in("status")
    assert str(from_flag) in looked_in("down", "--state-dir", str(from_flag))
    write_yaml(config, "state_dir: 5\nmodle: demo\n")
    assert (
        main(["status", "--state-dir", str(from_flag)]) == 2
    )  # the file `up` would refuse is refused here too
    assert "modle" in capsys.readouterr().err


def test_name_defaults_to_the_port_and_is_checked():
    assert load_config({}, {}).name == "pdserve-8000"
    assert load_config(flags_of(["--port", "8123"]), {}).name == "pdserve-8123"
    assert load_config({}, {"PDSERVE_NAME": "a"}).name == "a"
    with pytest.raises(ConfigError, match=r"--name: must be letters, digits"):
        load_config(flags_of(["--name", "../x"]), {})


def test_both_alone_means_that_many_colocated_workers():
    assert (load_config({"both": "2"}, {}).prefill, load_config({"both": "2"}, {}).decode) == (0, 0)
    mixed = load_config({"both": "2", "prefill": "1"}, {})  # a role named: the others keep their defaults
    assert (mixed.prefill, mixed.decode, mixed.both) == (1, 1, 2)
    assert load_config({}, {"PDSERVE_BOTH": "3"}).prefill == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"port": "8100", "router_port": "8100"}, "port and router_port are both 8100"),
        ({"prefill": "0", "decode": "0"}, "no workers"),
        ({"decode": "0"}, "1 prefill and 0 decode workers cannot serve a request"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(flags, {})
