"""Resolving what the user calls a model: a checkpoint directory or a bundled model name."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# Files that let transformers build the tokenizer (tokenizer_config.json alone does not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside `pdserve.engine`: a config.json-style file (config only, for
    `load_format="dummy"`) or a directory holding a full checkpoint."""

    resource: str  # path relative to the pdserve.engine package
    hub_id: str | None = None  # the Hugging Face id it stands for, accepted as a name too


# Lower-case name -> what it resolves to. One line per model.
BUNDLED_MODELS: dict[str, BundledModel] = {
    "ernie-4.5-0.3b": BundledModel("model_configs/ernie-4.5-0.3b.json", "baidu/ERNIE-4.5-0.3B-PT"),
    "ernie-4.5-21b-a3b": BundledModel("model_configs/ernie-4.5-21b-a3b.json", "baidu/ERNIE-4.5-21B-A3B-PT"),
    "ernie-4.5-300b-a47b": BundledModel(
        "model_configs/ernie-4.5-300b-a47b.json", "baidu/ERNIE-4.5-300B-A47B-PT"
    ),
    "demo": BundledModel("demo_models/demo"),
    "demo-draft": BundledModel("demo_models/demo-draft"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config, weights and tokenizer come from."""

    name: str  # what the user passed
    path: Path | None  # checkpoint directory; None for a bundled config-only model
    hf_config: dict  # raw config.json content
    has_weights: bool  # *.safetensors present
    has_tokenizer: bool  # tokenizer.json or tokenizer.model present


def _read_config(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); fix or re-download it") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value


def _from_directory(name: str, path: Path) -> ModelSource:
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(
            f"checkpoint directory {path} has no config.json; point at the directory that holds "
            "config.json and the *.safetensors files"
        )
    return ModelSource(
        name=name,
        path=path,
        hf_config=_read_config(config),
        has_weights=any(path.glob("*.safetensors")),
        has_tokenizer=any((path / f).is_file() for f in TOKENIZER_FILES),
    )


def _bundled(key: str) -> BundledModel | None:
    if key in BUNDLED_MODELS:
        return BUNDLED_MODELS[key]
    for model in BUNDLED_MODELS.values():
        # "baidu/ERNIE-4.5-0.3B-PT" and plain "ERNIE-4.5-0.3B-PT" both name the bundled 0.3B.
        if model.hub_id and key in (model.hub_id.lower(), model.hub_id.lower().rpartition("/")[2]):
            return model
    return None


def resolve_model(model: str | os.PathLike) -> ModelSource:
    """A checkpoint directory, or a bundled model name (case-insensitive; hub ids accepted)."""
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_directory(name, path)
    if path.is_file():
        raise ValueError(f"model {name!r} is a file; pass the checkpoint directory that contains it")
    bundled = _bundled(name.strip().lower())
    if bundled is not None:
        resource = Path(str(resources.files("pdserve.engine").joinpath(bundled.resource)))
        if resource.is_dir():
            return _from_directory(name, resource)
        return ModelSource(
            name=name, path=None, hf_config=_read_config(resource), has_weights=False, has_tokenizer=False
        )
    raise ValueError(
        f"model {name!r} is neither a checkpoint directory nor a bundled model name "
        f"(bundled: {', '.join(BUNDLED_MODELS)})"
    )
