"""Resolving what the user calls a model: a checkpoint directory or a bundled name."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# Bundled names -> config file in pdserve.engine.model_configs (config only: load_format="dummy").
BUNDLED_MODELS = {
    "ernie-4.5-0.3b": "ernie-4.5-0.3b.json",
    "ernie-4.5-21b-a3b": "ernie-4.5-21b-a3b.json",
    "ernie-4.5-300b-a47b": "ernie-4.5-300b-a47b.json",
}
HUB_IDS = {
    "baidu/ernie-4.5-0.3b-pt": "ernie-4.5-0.3b",
    "baidu/ernie-4.5-21b-a3b-pt": "ernie-4.5-21b-a3b",
    "baidu/ernie-4.5-300b-a47b-pt": "ernie-4.5-300b-a47b",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config, weights and tokenizer come from."""

    name: str
    path: Path | None  # None for a bundled config-only model
    hf_config: dict
    has_weights: bool
    has_tokenizer: bool


def _read_config(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return value


def resolve_model(model: str | os.PathLike) -> ModelSource:
    """A checkpoint directory, or a bundled model name (case-insensitive; hub ids accepted)."""
    name = str(model)
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"checkpoint directory {path} has no config.json")
        return ModelSource(
            name=name,
            path=path,
            hf_config=_read_config(config),
            has_weights=any(path.glob("*.safetensors")),
            has_tokenizer=any((path / f).is_file() for f in TOKENIZER_FILES),
        )
    key = HUB_IDS.get(name.lower(), name.lower())
    if key in BUNDLED_MODELS:
        file = resources.files("pdserve.engine.model_configs") / BUNDLED_MODELS[key]
        config = json.loads(file.read_text())
        return ModelSource(name=key, path=None, hf_config=config, has_weights=False, has_tokenizer=False)
    raise ValueError(
        f"model {name!r} is neither a checkpoint directory nor a bundled model name "
        f"(bundled: {', '.join(BUNDLED_MODELS)})"
    )
