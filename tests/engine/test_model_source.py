"""resolve_model: checkpoint directories, bundled names and hub ids, and clear refusals."""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest

from pdserve.engine.config import ModelConfig
from pdserve.engine.model_source import BUNDLED_MODELS, resolve_model


def test_checkpoint_directory(tiny_moe_checkpoint, tmp_path):
    path = Path(shutil.copytree(tiny_moe_checkpoint, tmp_path / "ck"))
    source = resolve_model(path)  # an os.PathLike works as well as a str
    assert source.name == str(path) and source.path == path
    assert source.hf_config == json.loads((path / "config.json").read_text())
    assert source.has_weights and not source.has_tokenizer
    (path / "tokenizer.json").write_text("{}")
    assert resolve_model(str(path)).has_tokenizer


def test_directory_without_weights_or_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Ernie4_5ForCausalLM"]}))
    (tmp_path / "tokenizer_config.json").write_text("{}")  # not enough to build a tokenizer
    source = resolve_model(tmp_path)
    assert (source.has_weights, source.has_tokenizer) == (False, False)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    assert resolve_model(tmp_path).has_tokenizer


def test_directory_without_config_names_it(tmp_path):
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))} has no config\.json"):
        resolve_model(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [("{not json", r"config\.json is not valid JSON"), ("[1, 2]", "must hold a JSON object")],
)
def test_bad_config_json_names_the_file(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        resolve_model(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


@pytest.mark.parametrize(
    "name, key",
    [
        ("ernie-4.5-0.3b", "ernie-4.5-0.3b"),
        ("ERNIE-4.5-21B-A3B", "ernie-4.5-21b-a3b"),
        ("baidu/ERNIE-4.5-0.3B-PT", "ernie-4.5-0.3b"),
        ("baidu/ernie-4.5-300b-a47b-pt", "ernie-4.5-300b-a47b"),
        ("ERNIE-4.5-21B-A3B-PT", "ernie-4.5-21b-a3b"),
    ],
)
def test_bundled_names_and_hub_ids(name, key):
    source = resolve_model(name)
    file = resources.files("pdserve.engine").joinpath(BUNDLED_MODELS[key].resource)
    assert source.name == name and source.path is None
    assert source.hf_config == json.loads(file.read_text())
    assert (source.has_weights, source.has_tokenizer) == (False, False)


@pytest.mark.parametrize("key", sorted(BUNDLED_MODELS))
def test_every_bundled_model_resolves_and_parses(key):
    mc = ModelConfig.from_hf_dict(resolve_model(key).hf_config)
    assert mc.architecture in ("Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM")
    if key.startswith("ernie-4.5-"):  # the published family shares ERNIE 4.5's tokenizer
        assert mc.vocab_size == 103424


def test_a_local_directory_wins_over_a_bundled_name(tiny_dense_checkpoint, tmp_path, monkeypatch):
    shutil.copytree(tiny_dense_checkpoint, tmp_path / "ernie-4.5-0.3b")
    monkeypatch.chdir(tmp_path)
    source = resolve_model("ernie-4.5-0.3b")
    assert source.path == Path("ernie-4.5-0.3b") and source.has_weights


def test_a_file_is_refused_with_a_hint(tiny_dense_checkpoint):
    with pytest.raises(ValueError, match="is a file; pass the checkpoint directory"):
        resolve_model(tiny_dense_checkpoint / "config.json")


@pytest.mark.parametrize("name", ["nonsense", "baidu/ERNIE-4.5-0.3B-Paddle", "/no/such/dir"])
def test_unknown_model_lists_the_bundled_names(name):
    expected = f"model '{name}' is neither a checkpoint directory nor a bundled model name (bundled: "
    with pytest.raises(ValueError, match=re.escape(expected)) as err:
        resolve_model(name)
    assert all(key in str(err.value) for key in BUNDLED_MODELS)
