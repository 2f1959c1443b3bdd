"""`pdserve.config`: the one configuration schema of `pdserve up`.

Every setting has one snake_case name, used as is in the YAML file (`--config FILE` or
`PDSERVE_CONFIG`), upper-cased behind `PDSERVE_` in the environment (`PDSERVE_REDIS_URL`) and
dashed behind `--` as a flag (`--redis-url`); the flags are generated from `ClusterConfig`, so
the three cannot drift apart. Flags win over the environment, which wins over the file, which
wins over the defaults. Environment variables and flags are text: an empty value leaves an
optional setting unset, and dict-valued settings take a JSON object (a mapping in YAML).
Unknown keys, unknown `PDSERVE_*` variables and bad values are refused with the key's name and
where it came from. This module imports neither torch nor Ray (the router's and the gateway's
defaults come from their light `pdserve.router.config` and `pdserve.gateway.config`), so a bad
configuration is refused before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    InstanceOf,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pdserve.cluster.expert_parallel_workers import ExpertParallelWorkers
from pdserve.cluster.planner import RolePlannerConfig
from pdserve.engine.context_cache_config import ContextCacheConfig
from pdserve.engine.expert_parallel.config import ExpertParallelConfig
from pdserve.engine.quantization.config import METHODS as QUANTIZATION_METHODS
from pdserve.engine.quantization.config import QuantizationConfig
from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.prompt_tokenizer import INLINE_CHARS
from pdserve.router.config import RouterConfig
from pdserve.router.policies import POLICIES

ENV_PREFIX = "PDSERVE_"
CONFIG_ENV = "PDSERVE_CONFIG"  # the YAML file's path, when no --config is given
# Variables the test suite reads (PDSERVE_TEST_REDIS_URL); a test run must be able to start
# `pdserve up` with them set.
RESERVED_ENV_PREFIX = "PDSERVE_TEST_"
T = TypeVar("T")
# The router owns its policies and defaults, the planner its settings; all three modules are light
# (no torch, Ray or gRPC).
Policy = Literal[tuple(POLICIES)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and its source."""


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads YAML `port: true` as 1; a boolean is never a count or a port.
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "booleans are not integers")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


def settings_group(cls: type[T], value: Any, extra_keys: tuple[str, ...] = ()) -> T:
    """A mapping-valued setting read into its owner's frozen dataclass `cls`, which checks the values.

    Keys are checked here, so an unknown one is named with a suggestion; a partial mapping keeps
    the owner's defaults for the keys it leaves out. `extra_keys`: keys of the setting that the
    caller took out of `value` before (named in the suggestions too). Raises ValueError (without
    the setting's name, which the caller adds: the schema adds the key and its source).
    """
    if isinstance(value, cls):
        return value
    keys = [f.name for f in dataclasses.fields(cls)] + list(extra_keys)  # type: ignore[arg-type]
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object (a mapping in YAML) of {', '.join(keys)}, got {value!r}")
    for key in value:
        if key not in keys:
            raise ValueError(f"unknown key {key!r}{_suggest(str(key), keys)}; keys are {', '.join(keys)}")
    return cls(**value)  # its __post_init__ raises ValueError naming the key


def expert_parallel_setting(value: Any) -> ExpertParallelWorkers:
    """The `expert_parallel` mapping: `roles` says which slots run groups, the other keys are the
    group's own (`ExpertParallelConfig`). Raises ValueError naming the key."""
    if isinstance(value, ExpertParallelWorkers):
        return value
    has_roles = isinstance(value, dict) and "roles" in value
    rest = {key: v for key, v in value.items() if key != "roles"} if has_roles else value
    group = settings_group(ExpertParallelConfig, rest, extra_keys=("roles",))
    return ExpertParallelWorkers(group, value["roles"]) if has_roles else ExpertParallelWorkers(group)


def _settings_group(cls: type) -> Any:
    """The field type of a `settings_group` setting."""
    return Annotated[InstanceOf[cls], BeforeValidator(lambda value: settings_group(cls, value))]


class ClusterConfig(BaseModel):
    """Everything `pdserve up` takes; field descriptions are the flags' help."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(
        None,
        description="this cluster's name (state file, `down --name`, Redis keys); unset: pdserve-<port>",
    )
    model: str = Field("demo", min_length=1, description="checkpoint directory or bundled model name")
    load_format: Literal["auto", "safetensors", "dummy"] = Field("auto", description="how weights load")
    hf_overrides: dict[str, Any] = Field(
        default_factory=dict, description='config.json keys to override, e.g. {"num_hidden_layers": 2}'
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weight dtype")
    device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="where each worker's engine runs; cuda: one GPU per worker, which Ray places on a node "
        "with a free GPU, and KV moves over NCCL",
    )
    seed: Int = Field(0, description="engine seed")
    threads: Int | None = Field(None, ge=1, description="torch threads per worker, 1 when unset")
    cpu_gemm: Literal["auto", "torch", "openblas"] = Field(
        "auto",
        description="BLAS for fp32 CPU matmuls: auto (OpenBLAS on AMD, MKL elsewhere), torch or openblas",
    )
    cpu_binding: Literal["auto", "off"] = Field(
        "auto",
        description="auto: when `up` starts its own Ray with CPU workers, each decode (and colocated) "
        "worker keeps --threads cores to itself, prefill workers next while cores last, and the gateway, "
        "router and Ray share the rest (nothing is bound when that leaves no core over); off: the OS "
        "places every process",
    )
    prefill: Int = Field(1, ge=0, description="prefill workers")
    decode: Int = Field(1, ge=0, description="decode workers")
    both: Int = Field(0, ge=0, description="colocated (prefill+decode) workers")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="address the HTTP gateway binds (0.0.0.0: every interface); Ray, the workers and the "
        "router stay on loopback unless joined to a Ray cluster (--address) or given --router-host",
    )
    port: Int = Field(8000, ge=1, le=65535, description="HTTP gateway port")
    router_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="address the gRPC router binds; 0.0.0.0 serves gRPC clients on other machines",
    )
    router_port: Int = Field(RouterConfig.port, ge=1, le=65535, description="gRPC router port")
    drain_timeout_s: Float = Field(
        30.0,
        ge=0,
        description="on Ctrl-C, SIGTERM or `down`: new requests are refused at once and streams in "
        "flight get this many seconds to finish before the cluster stops",
    )
    policy: Policy = Field(RouterConfig.policy, description="prefill placement policy")
    local_prefill_tokens: Int = Field(
        RouterConfig.local_prefill_tokens,
        ge=0,
        description="a decode worker computes a prompt itself (no prefill worker, no KV transfer) when at "
        "most this many of its tokens are missing from its prefix cache; 0: always disaggregate",
    )
    redis_url: str | None = Field(None, description="share the prefix index through this Redis")
    address: str | None = Field(None, description="join this Ray cluster instead of starting one")
    api_key: str | None = Field(
        None,
        repr=False,
        description="require 'Authorization: Bearer KEY' on the gateway's /v1 routes and on every router call",
    )
    admin_key: str | None = Field(
        None,
        repr=False,
        description="the key operator actions need (role switches, pausing the planner): the gateway's "
        "/admin routes are off without it",
    )
    max_body_bytes: Int = Field(
        GatewayConfig.max_body_bytes, ge=1024, description="largest request body, counted as it is read"
    )
    body_timeout_s: Float = Field(
        GatewayConfig.body_timeout_s,
        gt=0,
        description="seconds to receive a request's body once its headers are in",
    )
    header_timeout_s: Float = Field(
        GatewayConfig.header_timeout_s,
        gt=0,
        description="seconds to receive a request's headers, from the connection's start or previous response",
    )
    keep_alive_timeout_s: Float = Field(
        GatewayConfig.keep_alive_timeout_s, gt=0, description="seconds an idle connection stays open"
    )
    tokenizer_threads: Int = Field(
        GatewayConfig.tokenizer_threads,
        ge=1,
        description=f"gateway threads that render chat templates and tokenize prompts over {INLINE_CHARS} characters",
    )
    max_chars_per_token: Int = Field(
        GatewayConfig.max_chars_per_token,
        ge=1,
        description="a prompt over the context window times this many characters is refused untokenized",
    )
    metrics_cache_s: Float = Field(
        GatewayConfig.metrics_cache_s,
        ge=0,
        description="seconds /metrics reuses the workers' metrics (concurrent scrapes share one fetch)",
    )
    kv_cache_blocks: Int | None = Field(None, ge=1, description="KV blocks per worker")
    state_dir: Path = Field(
        default_factory=lambda: Path.home() / ".pdserve", description="where up records what it started"
    )
    speculative_config: dict[str, Any] | None = Field(
        None,
        description="speculative decoding, passed to every worker's engine (requests are guessed for "
        'where they decode), e.g. {"method": "ngram", "num_speculative_tokens": 4}',
    )
    quantization: str | dict[str, Any] | None = Field(
        None,
        description="weight-only quantization of every worker's model: "
        + ", ".join(QUANTIZATION_METHODS)
        + ', or {"method": ..., "group_size": ..., "lm_head": ...}; unset: full precision (a quantized '
        "checkpoint runs as its config.json says)",
    )
    role_planner: _settings_group(RolePlannerConfig) = Field(  # type: ignore[valid-type]
        default_factory=RolePlannerConfig,
        description="the planner that moves workers between prefill and decode by load; keys "
        + ", ".join(f.name for f in dataclasses.fields(RolePlannerConfig))
        + ', e.g. {"ttft_target_ms": 800}; keys left out keep their defaults',
    )

    context_cache: _settings_group(ContextCacheConfig) = Field(  # type: ignore[valid-type]
        default_factory=ContextCacheConfig,
        description="KV blocks of reused prefixes kept in Redis, so any worker loads a prefix another computed; "
        "keys "
        + ", ".join(f.name for f in dataclasses.fields(ContextCacheConfig))
        + ', e.g. {"redis_url": "redis://127.0.0.1:6379", "max_bytes": 4294967296}; off without redis_url',
    )

    expert_parallel: Annotated[  # type: ignore[valid-type]
        InstanceOf[ExpertParallelWorkers], BeforeValidator(expert_parallel_setting)
    ] = Field(
        default_factory=ExpertParallelWorkers,
        description="run workers as expert-parallel groups of `size` rank processes (one MoE replica, "
        "the routed experts split over the ranks, the worker's threads shared among them); keys "
        + ", ".join(f.name for f in dataclasses.fields(ExpertParallelConfig))
        + ", and roles: the roles whose workers are groups (all when left out; a group keeps being one "
        'when it switches role), e.g. {"size": 2, "roles": ["decode"]}; size 1: no expert parallelism',
    )

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        QuantizationConfig.from_value(value)  # ValueError names the key and what it takes
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {value!r}")
        return value

    @field_validator("api_key", "admin_key")
    @classmethod
    def _key_chars(cls, value: str | None) -> str | None:
        # It travels in an HTTP header and gRPC metadata, which carry printable ASCII only.
        if value is not None and not re.fullmatch(r"[!-~]+", value):
            raise ValueError("must be printable ASCII without spaces (it is sent in an HTTP header)")
        return value

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str | None) -> str | None:
        # The name becomes a file name and part of Redis keys: nothing that could escape either.
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise ValueError(f"must be letters, digits, '-' or '_', got {value!r}")
        return value

    @model_validator(mode="after")
    def _workers_and_ports(self) -> ClusterConfig:
        # `--both N` alone means N colocated workers, not N more beside the default 1P+1D.
        if self.both and not {"prefill", "decode"} & self.model_fields_set:
            self.__dict__.update(prefill=0, decode=0)  # frozen model: set once, while validating
        if not self.prefill + self.decode + self.both:
            raise PydanticCustomError("no_workers", "no workers: set prefill and decode, or both, above 0")
        if not self.both and (not self.prefill or not self.decode):
            raise PydanticCustomError(
                "half_pair",
                "{prefill} prefill and {decode} decode workers cannot serve a request: a prompt needs "
                "both kinds, or set both for colocated workers",
                {"prefill": self.prefill, "decode": self.decode},
            )
        self._expert_parallel_fits()
        if self.port == self.router_port:
            raise PydanticCustomError(
                "same_ports",
                "port and router_port are both {port}; the gateway and the router need a port each",
                {"port": self.port},
            )
        return self

    def _expert_parallel_fits(self) -> None:
        size = self.expert_parallel.group.size
        if size > 1 and self.device == "cuda":
            raise PydanticCustomError(
                "ep_on_gpu",
                "expert_parallel.size {size} with device cuda: an expert-parallel worker needs a GPU per rank "
                "and a worker gets one; use device cpu, or expert_parallel.size 1",
                {"size": size},
            )
        counts = {role: getattr(self, role) for role in ("prefill", "decode", "both")}
        if size > 1 and not any(counts[role] for role in self.expert_parallel.roles):
            raise PydanticCustomError(
                "ep_no_slots",
                "expert_parallel.roles {roles} names no role this cluster has workers in ({counts}): "
                "no worker would be a group; list one of the roles with workers, or leave roles out",
                {
                    "roles": list(self.expert_parallel.roles),
                    "counts": ", ".join(f"{r} {n}" for r, n in counts.items()),
                },
            )

    @model_validator(mode="after")
    def _default_name(self) -> ClusterConfig:
        # One cluster per gateway port on a machine, so the port names a cluster by default.
        if self.name is None:
            self.__dict__["name"] = f"pdserve-{self.port}"  # frozen model: set once, while validating
        return self

    @field_validator("state_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        # A quoted "~/x" in YAML or a variable reaches us unexpanded by any shell.
        return value.expanduser()


FIELDS = ClusterConfig.model_fields


def env_name(name: str) -> str:
    """`redis_url` -> `PDSERVE_REDIS_URL`."""
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """`redis_url` -> `--redis-url`."""
    return "--" + name.replace("_", "-")


def _base_type(name: str) -> tuple[Any, bool]:
    """The field's type without `| None`, and whether None is allowed."""
    ann = FIELDS[name].annotation
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(ann))
    return ann, False


def _is_dict(name: str) -> bool:
    """Whether the setting takes a mapping (JSON in variables and flags)."""
    base, _ = _base_type(name)
    return typing.get_origin(base) is dict or base is dict or dataclasses.is_dataclass(base)


def _expected(name: str) -> str:
    """What a field accepts, in words, for error messages."""
    base, optional = _base_type(name)
    while typing.get_origin(base) is Annotated:
        base = typing.get_args(base)[0]
    if typing.get_origin(base) is Literal:
        what = "one of " + ", ".join(repr(v) for v in typing.get_args(base))
    elif base is int:
        lo = next((m.ge for m in FIELDS[name].metadata if isinstance(m, annotated_types.Ge)), None)
        hi = next((m.le for m in FIELDS[name].metadata if isinstance(m, annotated_types.Le)), None)
        what = "an integer" + (f" in {lo}..{hi}" if hi is not None else f" >= {lo}" if lo is not None else "")
    elif base is float:
        gt = next((m.gt for m in FIELDS[name].metadata if isinstance(m, annotated_types.Gt)), None)
        ge = next((m.ge for m in FIELDS[name].metadata if isinstance(m, annotated_types.Ge)), None)
        what = "a number" + (f" > {gt:g}" if gt is not None else f" >= {ge:g}" if ge is not None else "")
    elif _is_dict(name):
        what = "a JSON object (a mapping in YAML)"
    else:
        non_empty = any(isinstance(m, annotated_types.MinLen) for m in FIELDS[name].metadata)
        what = "a non-empty string" if non_empty else "a string"
    return "must be " + what + (" or unset" if optional else "")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _from_text(name: str, text: Any, where: str) -> Any:
    """An environment variable's or flag's text as the field's input (JSON for dicts)."""
    if not isinstance(text, str):
        return text  # already a value (load_config called from Python)
    if text == "" and _base_type(name)[1]:
        return None
    if _is_dict(name):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: must be a JSON object, got {text!r} ({e})") from None
    return text


def _read_file(path: Path) -> dict[str, Any]:
    where = f"config file {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]  # one line, as every error here
        raise ConfigError(f"{where}: not valid YAML{at} ({problem})") from None
    if data is None:
        return {}  # an empty file sets nothing
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of settings, got {type(data).__name__}")
    for key in data:
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), list(FIELDS))}")
    return data


def load_config(
    flags: Mapping[str, Any], env: Mapping[str, str], config_file: Path | str | None = None
) -> ClusterConfig:
    """Merges defaults < YAML file < `PDSERVE_*` environment < flags into a `ClusterConfig`.

    `flags` holds only the flags the user gave (name -> text or value); `config_file` falls
    back to `PDSERVE_CONFIG`. Raises `ConfigError` naming every bad key and where it came from.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    path = config_file or env.get(CONFIG_ENV) or None
    if path is not None:
        for key, value in _read_file(Path(path)).items():
            values[key], where[key] = value, f"config file {path}: {key}"
    known_env = {env_name(n): n for n in FIELDS}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV or var.startswith(RESERVED_ENV_PREFIX):
            continue
        if var not in known_env:
            raise ConfigError(f"{var}: unknown setting{_suggest(var, list(known_env))}")
        name = known_env[var]
        values[name], where[name] = _from_text(name, text, var), var
    for name, text in flags.items():
        if name not in FIELDS:
            raise ConfigError(f"{flag_name(name)}: unknown flag{_suggest(name, list(FIELDS))}")
        values[name], where[name] = _from_text(name, text, flag_name(name)), flag_name(name)
    try:
        return ClusterConfig(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            if not err["loc"]:  # a rule across settings (_workers_and_ports): its message names them
                problems.append(err["msg"])
                continue
            name, inner = str(err["loc"][0]), err["loc"][1:]
            if err["type"] == "value_error":  # our own validators say what they want
                problems.append(f"{where[name]}: {err['ctx']['error']}")
            elif inner:  # inside a dict setting, e.g. a non-string key
                problems.append(f"{where[name]}: key {'.'.join(map(str, inner))}: {err['msg']}")
            else:
                problems.append(f"{where[name]}: {_expected(name)}, got {err['input']!r}")
        raise ConfigError("; ".join(problems)) from None


def _shown(default: Any) -> str:
    """A default as a user would type it."""
    if default is None:
        return "unset"
    if isinstance(default, ExpertParallelWorkers):
        default = default.as_mapping()
    elif dataclasses.is_dataclass(default):
        default = dataclasses.asdict(default)
    return json.dumps(default) if isinstance(default, dict) else str(default)


def add_flags(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> None:
    """Adds one flag per `ClusterConfig` field (or per field in `names`), plus `--config FILE`.

    Flags take text and default to absent (`argparse.SUPPRESS`), so `flags_given` sees only
    what the user typed and `load_config` validates flags exactly as it validates the
    environment. `aliases` gives a field a second flag (`{"router_port": "--port"}`).
    """
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help=f"YAML file of settings (env {CONFIG_ENV})"
    )
    for name in FIELDS if names is None else names:
        field = FIELDS[name]
        base, _ = _base_type(name)
        choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
        default = field.get_default(call_default_factory=True)
        extra = (aliases or {}).get(name)
        parser.add_argument(
            flag_name(name),
            *([extra] if extra else []),
            dest=name,
            default=argparse.SUPPRESS,
            metavar="{" + ",".join(choices) + "}" if choices else ("JSON" if _is_dict(name) else None),
            help=f"{field.description} (default {_shown(default)}; env {env_name(name)})",
        )


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    """The schema flags present in parsed `args` (those `add_flags` added and the user gave)."""
    return {name: value for name, value in vars(args).items() if name in FIELDS}
