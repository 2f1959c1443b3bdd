"""Checkpoint loading into a module with hub tensor names, its validation, and dummy weights."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pdserve.engine.loader import (
    CheckpointError,
    checkpoint_files,
    init_dummy_weights,
    load_checkpoint,
    mtp_layers_in_checkpoint,
)

# Tensors the real model keeps in fp32 whatever the compute dtype.
FP32_SUFFIXES = ("mlp.gate.weight", "e_score_correction_bias")


class NamedTensors(nn.Module):
    """A module whose state_dict has exactly the given names, shapes and dtypes (filled with -7)."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        for name, (shape, dtype) in specs.items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            owner.register_parameter(
                leaf, nn.Parameter(torch.full(shape, -7.0, dtype=dtype), requires_grad=False)
            )


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def module_for(path: Path, dtype: torch.dtype = torch.bfloat16, drop=(), **reshape) -> NamedTensors:
    """A module fitting the checkpoint at `path`, in `dtype` except the fp32-kept router tensors."""
    specs = {}
    for name, tensor in read_all(path).items():
        if name in drop:
            continue
        keep_fp32 = name.endswith(FP32_SUFFIXES)
        specs[name] = (reshape.get(name, tuple(tensor.shape)), torch.float32 if keep_fp32 else dtype)
    return NamedTensors(specs)


@pytest.fixture()
def moe_copy(tiny_moe_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny MoE checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_moe_checkpoint, tmp_path / "ckpt"))


def rewrite(path: Path, change) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def test_single_file_loads_every_tensor_keeping_module_dtypes(tiny_moe_checkpoint):
    module = module_for(tiny_moe_checkpoint)
    report = load_checkpoint(module, tiny_moe_checkpoint, dtype=torch.bfloat16, progress=False)

    disk = read_all(tiny_moe_checkpoint)
    state = module.state_dict()
    assert report.num_tensors == len(state) == len(disk)
    assert report.num_bytes == sum(t.numel() * t.element_size() for t in disk.values())
    assert report.ignored == [] and report.seconds >= 0
    for name, tensor in state.items():
        expected_dtype = torch.float32 if name.endswith(FP32_SUFFIXES) else torch.bfloat16
        assert tensor.dtype == expected_dtype, name
        assert torch.equal(tensor, disk[name].to(expected_dtype)), name
    # The router bias really came from disk (it is non-zero there), not from an init.
    bias = state["model.layers.1.mlp.moe_statics.e_score_correction_bias"]
    assert bias.shape == (1, 4) and bias.abs().sum() > 0


def test_sharded_checkpoint_loads_the_same_values(tiny_moe_checkpoint, tiny_sharded_moe_checkpoint):
    index = json.loads((tiny_sharded_moe_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    single, sharded = module_for(tiny_moe_checkpoint), module_for(tiny_moe_checkpoint)
    load_checkpoint(single, tiny_moe_checkpoint, dtype=torch.bfloat16, progress=False)
    report = load_checkpoint(sharded, tiny_sharded_moe_checkpoint, dtype=torch.bfloat16, progress=False)
    assert report.num_tensors == len(index["weight_map"])
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (
        checkpoint_files(tiny_sharded_moe_checkpoint)["model.norm.weight"].name
        == index["weight_map"]["model.norm.weight"]
    )


def test_missing_tensors_are_named_and_nothing_is_loaded(moe_copy):
    module = module_for(moe_copy)
    rewrite(moe_copy, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"lacks 1 tensors.*layers\.2\.mlp\.experts\.3\.up_proj\.weight"
    ):
        load_checkpoint(module, moe_copy, dtype=torch.bfloat16, progress=False)
    # Validation runs before any copy: the module still holds its sentinel values.
    assert all((t == -7).all() for t in module.state_dict().values())


def test_many_missing_tensors_list_ten_and_count_the_rest(moe_copy):
    module = module_for(moe_copy)
    rewrite(moe_copy, lambda t: [t.pop(k) for k in list(t) if ".experts." in k])
    with pytest.raises(CheckpointError, match=r"lacks 24 tensors") as err:
        load_checkpoint(module, moe_copy, dtype=torch.bfloat16, progress=False)
    assert "and 14 more" in str(err.value)
    assert str(err.value).count(".experts.") == 10


def test_unexpected_tensor_is_named_unless_allowed(moe_copy):
    rewrite(moe_copy, lambda t: t.update({"model.layers.9.self_attn.q_proj.weight": torch.zeros(2, 2)}))
    module = module_for(moe_copy, drop={"model.layers.9.self_attn.q_proj.weight"})
    with pytest.raises(
        CheckpointError, match=r"1 tensors this model does not have: model\.layers\.9\.self_attn"
    ):
        load_checkpoint(module, moe_copy, dtype=torch.bfloat16, progress=False)
    for allow in ("model.layers.9.", r"model\.layers\.\d+\.self_attn\.q_proj"):
        report = load_checkpoint(
            module, moe_copy, dtype=torch.bfloat16, progress=False, allow_ignored=[allow]
        )
        assert report.ignored == ["model.layers.9.self_attn.q_proj.weight"]


def test_lm_head_of_a_tied_model_is_ignored_with_a_note(tiny_moe_checkpoint):
    module = module_for(tiny_moe_checkpoint, drop={"lm_head.weight"})
    report = load_checkpoint(module, tiny_moe_checkpoint, dtype=torch.bfloat16, progress=False)
    assert report.ignored == ["lm_head.weight"]
    assert any("lm_head.weight" in note for note in report.notes)


def test_wrong_shape_names_tensor_file_and_both_shapes(moe_copy):
    rewrite(moe_copy, lambda t: t.update({"model.norm.weight": torch.ones(33)}))
    module = module_for(moe_copy, **{"model.norm.weight": (32,)})
    with pytest.raises(
        CheckpointError, match=r"model\.norm\.weight has shape \(33,\) in model\.safetensors.*expects \(32,\)"
    ):
        load_checkpoint(module, moe_copy, dtype=torch.bfloat16, progress=False)
    assert all((t == -7).all() for t in module.state_dict().values())


def test_router_bias_without_its_group_dim_is_reshaped(moe_copy):
    name = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    flat = torch.tensor([0.5, -0.25, 0.125, 1.0])
    rewrite(moe_copy, lambda t: t.update({name: flat}))
    module = module_for(moe_copy, **{name: (1, 4)})
    load_checkpoint(module, moe_copy, dtype=torch.bfloat16, progress=False)
    assert torch.equal(module.state_dict()[name], flat.view(1, 4))


def test_quantized_tensor_is_refused(moe_copy):
    rewrite(moe_copy, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int8)}))
    module = module_for(moe_copy, **{"model.norm.weight": (32,)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is stored as I8"):
        load_checkpoint(module, moe_copy, dtype=torch.bfloat16, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_is_named(moe_copy, damage):
    module = module_for(moe_copy)
    file = moe_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        data[:-300] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00not json" + data
    )
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        load_checkpoint(module, moe_copy, dtype=torch.bfloat16, progress=False)


def test_missing_shard_is_named(tiny_sharded_moe_checkpoint, tmp_path):
    path = Path(shutil.copytree(tiny_sharded_moe_checkpoint, tmp_path / "sharded"))
    module = module_for(path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {re.escape(shard.name)} listed in .* is missing"):
        load_checkpoint(module, path, dtype=torch.bfloat16, progress=False)


def test_tensor_in_two_shards_is_refused(tiny_sharded_moe_checkpoint, tmp_path):
    path = Path(shutil.copytree(tiny_sharded_moe_checkpoint, tmp_path / "sharded"))
    first, last = sorted(path.glob("model-*.safetensors"))[0], sorted(path.glob("model-*.safetensors"))[-1]
    with safe_open(str(first), "pt") as f:
        name = next(iter(f.keys()))
    tensors = load_file(str(last))
    tensors[name] = load_file(str(first))[name]
    save_file(tensors, str(last))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is in both {first.name} and {last.name}"):
        checkpoint_files(path)


def test_bad_index_and_empty_directory_are_named(tiny_sharded_moe_checkpoint, tmp_path):
    path = Path(shutil.copytree(tiny_sharded_moe_checkpoint, tmp_path / "sharded"))
    (path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not a valid index"):
        checkpoint_files(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*in .*empty"):
        checkpoint_files(tmp_path / "empty")


def test_progress_bar_only_when_asked(tiny_dense_checkpoint, capsys):
    load_checkpoint(
        module_for(tiny_dense_checkpoint), tiny_dense_checkpoint, dtype=torch.float32, progress=False
    )
    assert "loading weights" not in capsys.readouterr().err
    load_checkpoint(
        module_for(tiny_dense_checkpoint), tiny_dense_checkpoint, dtype=torch.float32, progress=True
    )
    assert "loading weights" in capsys.readouterr().err


def test_mtp_layers_are_counted_from_tensor_names(moe_copy, tiny_dense_checkpoint):
    assert mtp_layers_in_checkpoint(tiny_dense_checkpoint) == 0
    block = {
        k: v
        for k, v in load_file(str(moe_copy / "model.safetensors")).items()
        if k.startswith("model.layers.1.")
    }
    rewrite(
        moe_copy, lambda t: t.update({k.replace("layers.1.", "mtp_block.0."): v for k, v in block.items()})
    )
    assert mtp_layers_in_checkpoint(moe_copy) == 1


DUMMY_SPECS = {
    "model.embed_tokens.weight": ((50, 8), torch.bfloat16),
    "model.layers.0.input_layernorm.weight": ((8,), torch.float32),
    "model.layers.0.self_attn.q_proj.weight": ((8, 8), torch.bfloat16),
    "model.layers.0.self_attn.q_proj.bias": ((8,), torch.bfloat16),
    "model.layers.0.self_attn.k_proj.weight": ((8, 8), torch.bfloat16),
    "model.layers.0.mlp.gate.weight": ((4, 8), torch.float32),
    "model.layers.0.mlp.moe_statics.e_score_correction_bias": ((1, 4), torch.float32),
    "model.mtp_emb_norm.0.weight": ((8,), torch.float32),
    "model.norm.weight": ((8,), torch.float32),
}


def test_dummy_weights_follow_the_init_rules():
    module = NamedTensors(DUMMY_SPECS)
    init_dummy_weights(module, seed=3, dtype=torch.bfloat16)
    state = module.state_dict()
    for name in ("model.layers.0.input_layernorm.weight", "model.mtp_emb_norm.0.weight", "model.norm.weight"):
        assert (state[name] == 1).all(), name
    assert (state["model.layers.0.self_attn.q_proj.bias"] == 0).all()
    assert (state["model.layers.0.mlp.moe_statics.e_score_correction_bias"] == 0).all()
    assert {n: t.dtype for n, t in state.items()} == {n: d for n, (_, d) in DUMMY_SPECS.items()}
    big = NamedTensors({"w": ((256, 256), torch.float32)})
    init_dummy_weights(big, seed=0, dtype=torch.float32, std=0.5)
    assert abs(big.w.std().item() - 0.5) < 0.01 and abs(big.w.mean().item()) < 0.01


def test_dummy_weights_depend_only_on_seed_and_name():
    a, b, c = NamedTensors(DUMMY_SPECS), NamedTensors(DUMMY_SPECS), NamedTensors(DUMMY_SPECS)
    init_dummy_weights(a, seed=1, dtype=torch.bfloat16)
    init_dummy_weights(b, seed=1, dtype=torch.bfloat16)
    init_dummy_weights(c, seed=2, dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.state_dict()[name], c.state_dict()[name])
    # An extra tensor (say an untied lm_head) leaves the others' values alone.
    d = NamedTensors({"lm_head.weight": ((50, 8), torch.bfloat16), **DUMMY_SPECS})
    init_dummy_weights(d, seed=1, dtype=torch.bfloat16)
    assert torch.equal(d.state_dict()[name], a.state_dict()[name])
    # Same shape, different names: different values.
    assert not torch.equal(a.state_dict()[name], a.state_dict()["model.layers.0.self_attn.k_proj.weight"])
