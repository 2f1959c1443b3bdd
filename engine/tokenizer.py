"""Tokenizer loading and checkpoint inspection that the engine needs before building the model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import safe_open

_MTP_BLOCK = re.compile(r"^model\.mtp_block\.(\d+)\.")


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer from a checkpoint or tokenizer directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types here; all mean the same to a user
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e


def checkpoint_tensor_names(path: Path) -> list[str]:
    """Tensor names of a safetensors checkpoint, single-file or sharded, without reading tensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    names: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            names.extend(f.keys())
    return names


def mtp_layers_in_checkpoint(path: Path) -> int:
    """How many ERNIE multi-token-prediction layers (`model.mtp_block.N`) a checkpoint holds."""
    layers = {int(m.group(1)) for name in checkpoint_tensor_names(path) if (m := _MTP_BLOCK.match(name))}
    return max(layers) + 1 if layers else 0
