"""The built-in demo checkpoints: names, tokenizer and chat template, transformers/engine parity, packaging."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.loader import mtp_layers_in_checkpoint
from pdserve.engine.model_source import resolve_model
from tests.engine.reference import assert_same_greedy, engine_logits, hf_logits, hf_model

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "training" / "results" / "demo_training.json"
NAMES = ("demo", "demo-draft")
SYSTEM = {"role": "system", "content": "You write Python."}
USER = {"role": "user", "content": "Return the sum of two numbers."}


def path_of(name: str) -> Path:
    path = resolve_model(name).path
    assert path is not None
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path_of("demo")))


def num_params(path: Path) -> int:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def test_names_resolve_to_bundled_checkpoints():
    demo, draft = resolve_model("demo"), resolve_model("Demo-Draft")
    for source in (demo, draft):
        assert source.has_weights and source.has_tokenizer
    assert demo.hf_config["architectures"] == ["Ernie4_5_MoeForCausalLM"]
    assert draft.hf_config["architectures"] == ["Ernie4_5ForCausalLM"]
    assert demo.hf_config["num_nextn_predict_layers"] == 1
    assert demo.hf_config["vocab_size"] == draft.hf_config["vocab_size"]
    # One tokenizer for both, so draft tokens are target tokens.
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (demo.path / file).read_bytes() == (draft.path / file).read_bytes()


def test_chat_template_renders_ernie_turns(tokenizer):
    def render(messages, **kwargs) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    head = "<|begin_of_sentence|>You write Python.\nUser: Return the sum of two numbers.\nAssistant: "
    # Thinking is off unless asked for: an empty, closed reasoning section.
    assert render([SYSTEM, USER]) == head + "<think>\n\n</think>\n\n"
    assert render([SYSTEM, USER], enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    assert render([SYSTEM, USER], enable_thinking=True) == head + "<think>\n"
    assert render([USER], enable_thinking=True) == (
        "<|begin_of_sentence|>User: Return the sum of two numbers.\nAssistant: <think>\n"
    )
    # Earlier assistant turns lose their reasoning and end with <|end_of_sentence|>; list content works.
    history = [
        USER,
        {
            "role": "assistant",
            "content": "Signature: def add(a, b):\n</think>\n\ndef add(a, b):\n    return a + b",
        },
        {"role": "user", "content": [{"type": "text", "text": "Now subtract."}]},
    ]
    assert render(history) == (
        "<|begin_of_sentence|>User: Return the sum of two numbers.\n"
        "Assistant: def add(a, b):\n    return a + b<|end_of_sentence|>"
        "User: Now subtract.\nAssistant: <think>\n\n</think>\n\n"
    )
    assert tokenizer.apply_chat_template([USER], tokenize=False) == (
        "<|begin_of_sentence|>User: Return the sum of two numbers.\n"
    )
    ids = tokenizer(render([USER], enable_thinking=True), add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id == 3
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("\u010a")]


def test_tokenizer_round_trips_text(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0 and tokenizer.sep_token == "<|end_of_sentence|>"
    texts = [
        "def f(x):\n    return {'a': x ** 2}  # square\n",
        "naïve café, 日本語, Ελληνικά, emoji 😀🚀, zero-width\u200b, tab\tcr\r\n",
        "   leading and trailing spaces   \n\n\n",
        "<think>\nreasoning\n</think>\n\nanswer",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        # <think> tags are added but not special: reasoning parsers see them in decoded text.
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    sep = tokenizer.sep_token_id
    assert tokenizer.decode([sep], skip_special_tokens=True) == ""


def test_transformers_loads_both_and_sizes_fit():
    from transformers import AutoModelForCausalLM

    demo = AutoModelForCausalLM.from_pretrained(str(path_of("demo")))
    draft = AutoModelForCausalLM.from_pretrained(str(path_of("demo-draft")))
    assert type(demo).__name__ == "Ernie4_5_MoeForCausalLM"
    assert type(draft).__name__ == "Ernie4_5ForCausalLM"
    assert demo.config.vocab_size == draft.config.vocab_size
    assert demo.dtype == draft.dtype == torch.bfloat16
    # The MTP tensors are in the file but not in transformers' model.
    with safe_open(str(path_of("demo") / "model.safetensors"), "pt") as f:
        mtp = [k for k in f.keys() if k.startswith("model.mtp_")]  # noqa: SIM118
        hidden = demo.config.hidden_size
        assert f.get_slice("model.mtp_linear_proj.0.weight").get_shape() == [hidden, 2 * hidden]
    assert {k.split(".")[1] for k in mtp} == {
        "mtp_emb_norm",
        "mtp_hidden_norm",
        "mtp_linear_proj",
        "mtp_block",
    }
    assert not any("mtp" in k for k in demo.state_dict())
    assert num_params(path_of("demo")) >= 5 * num_params(path_of("demo-draft"))
    total = sum(f.stat().st_size for name in NAMES for f in path_of(name).iterdir())
    assert total <= 25_000_000, f"demo checkpoints take {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", NAMES)
def test_engine_matches_transformers_on_a_chat_prompt(name, tokenizer):
    path = path_of(name)
    prompt = tokenizer(
        tokenizer.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    llm = LLM(name, dtype="float32", progress=False)
    expected_mtp = 1 if name == "demo" else 0
    assert llm.engine.model_config.num_nextn_predict_layers == mtp_layers_in_checkpoint(path) == expected_mtp
    model = hf_model(path)
    ref = hf_logits(model, prompt)
    got = engine_logits(llm.engine, prompt, [len(prompt) - 3, 1, 1, 1])
    assert (got - ref).abs().max().item() <= 1e-4
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, min_tokens=24))[0]
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert len(out.outputs[0].token_ids) == 24
    assert_same_greedy(model, prompt, expected, out.outputs[0].token_ids)


def test_recorded_results_match_shipped_files():
    results = json.loads(RESULTS.read_text())
    uniform = math.log(results["tokenizer"]["vocab_size"])
    for name in NAMES:
        # Trained, not random: far below the loss of a uniform guess.
        assert results["models"][name]["held_out_loss"] < 0.5 * uniform
    # Any change to a shipped file (retraining included) must come with the matching results.
    root = path_of("demo").parent
    shipped = {
        f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for name in NAMES
        for f in sorted((root / name).iterdir())
    }
    assert shipped == results["file_sha256"]


@pytest.mark.slow
def test_wheel_ships_the_checkpoints(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("pdserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in NAMES:
        for file in (
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ):
            assert f"pdserve/engine/demo_models/{name}/{file}" in names
    assert "pdserve/engine/demo_models/__init__.py" in names
