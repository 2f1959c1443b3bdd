"""Loading safetensors checkpoints (hub tensor names) into a model, or dummy weights."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

_MTP_BLOCK = re.compile(r"^model\.mtp_block\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the tensor or file and how to fix it."""


@dataclass
class LoadReport:
    num_tensors: int
    num_bytes: int
    seconds: float
    ignored: list[str] = field(default_factory=list)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single-file or sharded checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        out = {}
        for name, shard in weight_map.items():
            file = path / shard
            if not file.is_file():
                raise CheckpointError(f"shard {shard} listed in {index.name} is missing from {path}")
            out[name] = file
        return out
    out: dict[str, Path] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name in out:
                        raise CheckpointError(f"tensor {name} is in both {out[name].name} and {file.name}")
                    out[name] = file
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); re-download it") from e
    if not out:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return out


def _preview(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def load_checkpoint(
    module: torch.nn.Module,
    path: Path,
    *,
    dtype: torch.dtype,
    progress: bool = True,
    allow_ignored: Sequence[str] = (),
) -> LoadReport:
    """Copies every tensor of the checkpoint into `module` (same names), validating all of them."""
    start = time.perf_counter()
    expected = module.state_dict()
    files = checkpoint_files(Path(path))
    ignored = [
        n
        for n in files
        if n not in expected and (n == "lm_head.weight" or n.startswith(tuple(allow_ignored)))
    ]
    missing = [n for n in expected if n not in files]
    extra = [n for n in files if n not in expected and n not in ignored]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensors the model needs: {_preview(missing)}"
        )
    if extra:
        raise CheckpointError(
            f"checkpoint {path} has {len(extra)} tensors this model does not have: {_preview(extra)} "
            "(wrong architecture or config.json?)"
        )
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    num_bytes = 0
    with tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress) as bar:
        for file, names in by_file.items():
            try:
                with safe_open(str(file), "pt") as f:
                    for name in names:
                        target = expected[name]
                        tensor = f.get_tensor(name)
                        if tensor.shape != target.shape:
                            if tensor.numel() == target.numel() and name.endswith("e_score_correction_bias"):
                                tensor = tensor.reshape(target.shape)
                            else:
                                raise CheckpointError(
                                    f"tensor {name} has shape {tuple(tensor.shape)} in {file.name}, the model "
                                    f"expects {tuple(target.shape)} (does config.json match the weights?)"
                                )
                        target.copy_(tensor.to(target.dtype))
                        num_bytes += tensor.numel() * tensor.element_size()
                        bar.update(1)
            except SafetensorError as e:
                raise CheckpointError(f"{file} is corrupt or truncated ({e}); re-download it") from e
    return LoadReport(len(expected), num_bytes, time.perf_counter() - start, ignored)


def mtp_layers_in_checkpoint(path: Path) -> int:
    """How many ERNIE multi-token-prediction layers (`model.mtp_block.N`) a checkpoint holds."""
    layers = {int(m.group(1)) for name in checkpoint_files(path) if (m := _MTP_BLOCK.match(name))}
    return max(layers) + 1 if layers else 0


def init_dummy_weights(module: torch.nn.Module, *, seed: int, dtype: torch.dtype, std: float = 0.02) -> None:
    """Deterministic random weights: N(0, std) matrices, unit norms, zero biases and router bias."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
            tensor.zero_()
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=torch.float32) * std)
