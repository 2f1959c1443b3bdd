"""Loading safetensors checkpoints (hub tensor names) into a model, or deterministic dummy weights.

Loading is name-for-name: the module's `state_dict()` keys are the checkpoint's tensor names.
Everything that can be checked from the file headers (names, shapes, dtypes, shard layout) is
checked before the first tensor is copied, so a bad checkpoint never leaves a half-loaded model.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MTP_BLOCK = re.compile(r"^model\.mtp_block\.(\d+)\.")
# Norm weights by name: `model.norm.weight`, `...input_layernorm.weight`, `model.mtp_emb_norm.0.weight`.
_NORM_WEIGHT = re.compile(r"norm(\.\d+)?\.weight$")
# safetensors dtype codes that hold real numbers; anything else (int8, fp8...) is a quantized format.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# A quantized layer's tensors (engine/quantization/formats.py) and the only dtype each may have.
_PACKED_DTYPES = {"weight_packed": "U8", "weight_scale": "F16", "weight_offset": "F16"}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the tensor or file and how to fix it."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did."""

    num_tensors: int
    num_bytes: int
    seconds: float
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors deliberately not loaded
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors code: "BF16", "F32", ...


def _read_header(file: Path) -> dict[str, _TensorInfo]:
    """Name -> shape/dtype of every tensor in one safetensors file, from its header only."""
    try:
        with safe_open(str(file), "pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                sl = f.get_slice(name)
                out[name] = _TensorInfo(file, tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({e}); it is corrupt or truncated, re-download it"
        ) from e


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files making up the checkpoint in directory `path`."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid index file ({e}); re-download it") from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'; re-download it")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(
                f"shard {missing[0]} listed in {INDEX_FILE} is missing from {path}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; download the complete checkpoint"
            )
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files in {path}")
    return files


def _checkpoint_index(path: Path) -> dict[str, _TensorInfo]:
    """Tensor name -> where it is and what it looks like, over all shards; each name exactly once."""
    out: dict[str, _TensorInfo] = {}
    for file in _shard_files(path):
        for name, info in _read_header(file).items():
            if name in out:
                raise CheckpointError(
                    f"tensor {name} is in both {out[name].file.name} and {file.name}; "
                    "the checkpoint is inconsistent, re-download it"
                )
            out[name] = info
    return out


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single-file or sharded checkpoint."""
    return {name: info.file for name, info in _checkpoint_index(Path(path)).items()}


def mtp_layers_in_checkpoint(path: Path) -> int:
    """How many ERNIE multi-token-prediction layers (`model.mtp_block.N`) a checkpoint holds."""
    layers = {int(m.group(1)) for name in checkpoint_files(path) if (m := _MTP_BLOCK.match(name))}
    return max(layers) + 1 if layers else 0


def _preview(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def _matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether `name` starts with one of `patterns`, taken as a plain prefix or as a regex."""
    for p in patterns:
        if name.startswith(p):
            return True
        try:
            if re.match(p, name):
                return True
        except re.error:
            continue
    return False


def _fits(name: str, found: tuple[int, ...], target: torch.Tensor) -> bool:
    if found == tuple(target.shape):
        return True
    # Some exporters drop the modality dim of the router bias: [E] where the hub has [1, E].
    return name.endswith("e_score_correction_bias") and torch.Size(found).numel() == target.numel()


def _validate(
    path: Path, index: dict[str, _TensorInfo], expected: dict[str, torch.Tensor], allow_ignored: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Raises CheckpointError unless the checkpoint fits `expected`; returns (ignored, notes)."""
    missing = [n for n in expected if n not in index]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensors the model needs: {_preview(missing)} "
            "(does config.json belong to these weights? check num_hidden_layers, moe_*, "
            "tie_word_embeddings and quantization_config)"
        )
    ignored, notes, extra = [], [], []
    for name in index:
        if name in expected:
            continue
        if name == "lm_head.weight":
            # Some exporters write the head even for tied embeddings; the model uses embed_tokens.
            ignored.append(name)
            notes.append("lm_head.weight ignored: config.json ties it to model.embed_tokens.weight")
        elif _matches_any(name, allow_ignored):
            ignored.append(name)
        else:
            extra.append(name)
    if extra:
        raise CheckpointError(
            f"checkpoint {path} has {len(extra)} tensors this model does not have: {_preview(extra)} "
            "(wrong architecture or config.json? pass allow_ignored to skip them deliberately)"
        )
    for name, target in expected.items():
        info = index[name]
        if not _fits(name, info.shape, target):
            raise CheckpointError(
                f"tensor {name} has shape {info.shape} in {info.file.name}, the model expects "
                f"{tuple(target.shape)} (does config.json match the weights?)"
            )
        if target.is_floating_point() and info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name} is stored as {info.dtype} in {info.file.name}; only checkpoints that "
                "`pdserve quantize` wrote load quantized, use the bf16/fp16/fp32 release otherwise"
            )
        packed_dtype = _PACKED_DTYPES.get(name.rpartition(".")[2])
        if packed_dtype is not None and info.dtype != packed_dtype:
            raise CheckpointError(
                f"tensor {name} is stored as {info.dtype} in {info.file.name}, a quantized layer's "
                f"{name.rpartition('.')[2]} must be {packed_dtype}; the checkpoint does not match its "
                "quantization_config, re-run pdserve quantize"
            )
    return ignored, notes


def check_checkpoint(module: torch.nn.Module, path: Path, allow_ignored: Sequence[str] = ()) -> None:
    """Raises CheckpointError unless the checkpoint in `path` fits `module` (a meta-device model
    will do): names, shapes and dtypes from the file headers, nothing loaded."""
    path = Path(path)
    _validate(path, _checkpoint_index(path), module.state_dict(), allow_ignored)


def load_checkpoint(
    module: torch.nn.Module,
    path: Path,
    *,
    dtype: torch.dtype,
    progress: bool = True,
    allow_ignored: Sequence[str] = (),
    on_tensor: Callable[[int, int], None] | None = None,
) -> LoadReport:
    """Copies every tensor of the checkpoint in directory `path` into `module`, in place.

    Each tensor keeps the dtype the module gave it (the router gate and its bias stay fp32 while
    `dtype` is the model's compute dtype), and is streamed from disk one at a time, so peak memory
    stays about one model. Checkpoint tensors the module lacks are an error unless they match an
    `allow_ignored` prefix or regex (or are a tied `lm_head.weight`). `on_tensor(done, total)`
    hears each copied tensor (for a caller's own progress line).
    """
    del dtype  # the module's own tensors already carry the dtype each must be kept in
    start = time.perf_counter()
    path = Path(path)
    expected = module.state_dict()
    index = _checkpoint_index(path)
    ignored, notes = _validate(path, index, expected, allow_ignored)

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(index[name].file, []).append(name)
    num_bytes = copied = 0
    with (
        torch.no_grad(),
        tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress) as bar,
    ):
        for file, names in by_file.items():
            try:
                with safe_open(str(file), "pt") as f:
                    for name in names:
                        target = expected[name]
                        tensor = f.get_tensor(name)
                        target.copy_(tensor.reshape(target.shape))
                        num_bytes += tensor.numel() * tensor.element_size()
                        bar.update(1)
                        copied += 1
                        if on_tensor is not None:
                            on_tensor(copied, len(expected))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{file} could not be read ({e}); loading stopped part-way, re-download the file"
                ) from e
    return LoadReport(len(expected), num_bytes, time.perf_counter() - start, ignored, notes)


def _is_norm_weight(name: str, owner: torch.nn.Module | None) -> bool:
    return bool(_NORM_WEIGHT.search(name)) or (
        owner is not None and "norm" in type(owner).__name__.lower() and name.endswith(".weight")
    )


def init_dummy_weights(module: torch.nn.Module, *, seed: int, dtype: torch.dtype, std: float = 0.02) -> None:
    """Deterministic random weights for running a model without its checkpoint.

    Matrices and embeddings ~ N(0, std), norm weights 1, biases and `e_score_correction_bias` 0.
    Each tensor is seeded from (seed, its name), so it does not change when other tensors are
    added or removed (an MTP head, an untied lm_head). Tensors keep their own dtypes; `dtype` is
    the model's compute dtype, accepted for symmetry with `load_checkpoint`.
    """
    del dtype
    modules = dict(module.named_modules())
    g = torch.Generator()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            owner = modules.get(name.rpartition(".")[0])
            if _is_norm_weight(name, owner):
                tensor.fill_(1.0)
            elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                tensor.zero_()
            elif tensor.is_floating_point():
                # crc32, not hash(): Python salts str hashes per process.
                g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                if tensor.device.type == "cpu":
                    tensor.normal_(0.0, std, generator=g)
                else:
                    # Drawn on the CPU so a GPU instance gets the same weights as a CPU one.
                    cpu = torch.empty(tensor.shape, dtype=tensor.dtype).normal_(0.0, std, generator=g)
                    tensor.copy_(cpu)


# Shards of about this many bytes: writing a shard at a time keeps one shard's contiguous copies
# alive rather than the model's (the 21B-A3B shape at 2 layers peaked at 16 GB in one file).
SHARD_BYTES = 1 << 30


def save_sharded(state: dict[str, torch.Tensor], out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Writes `state` as `model-0000i-of-0000n.safetensors` shards plus the hub's index file.

    Each tensor is copied out on its own: the engine keeps CPU weights input-major (transposed
    views) and fused layers as views of one matrix, and safetensors wants contiguous tensors
    that share no storage.
    """
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = total = 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
        total += tensor.nbytes
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: state[n].detach().clone(memory_format=torch.contiguous_format) for n in names}
        save_file(tensors, str(Path(out) / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(out) / INDEX_FILE).write_text(json.dumps(index))
