"""The `pdserve` command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdserve.cli import main


def test_generate_with_token_ids_on_a_checkpoint(moe_checkpoint, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(moe_checkpoint),
            "--prompt-token-ids",
            "5,6,7",
            "--max-tokens",
            "4",
            "--json",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt_token_ids"] == [5, 6, 7] and len(out["token_ids"]) == 4


def test_generate_text_prompt(moe_checkpoint, capsys):
    assert (
        main(["generate", "--model", str(moe_checkpoint), "def add(a, b):", "--max-tokens", "5", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt"] == "def add(a, b):" and isinstance(out["text"], str)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--model", "no-such-model", "--prompt-token-ids", "1"],
            "neither a checkpoint directory",
        ),
        (["generate", "--model", "ernie-4.5-0.3b", "--prompt-token-ids", "1"], "load_format='dummy'"),
        (
            [
                "generate",
                "--model",
                "ernie-4.5-0.3b",
                "--load-format",
                "dummy",
                "--hf-overrides",
                '{"num_hidden_layers": 1, "no_such_key": 3}',
                "--prompt-token-ids",
                "1",
            ],
            "no_such_key",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_flag_values_are_rejected_by_the_parser():
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "generate", "--hf-overrides", "[1]"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--hf-overrides must be a JSON object" in proc.stderr
