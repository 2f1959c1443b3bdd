"""Tokenizer loading: pdserve enforces the context window itself, quietly."""

from __future__ import annotations

from transformers import AutoTokenizer

from pdserve.engine.model_source import resolve_model
from pdserve.engine.tokenizer import load_tokenizer


def test_a_prompt_past_the_tokenizers_own_maximum_encodes_without_a_warning(capfd, caplog):
    path = resolve_model("demo").path
    own_limit = AutoTokenizer.from_pretrained(str(path)).model_max_length
    capfd.readouterr()
    tok = load_tokenizer(path)
    text = "x = 1\n" * (min(own_limit, 10**6) + 10)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > min(own_limit, 10**6)
    printed = capfd.readouterr().err + caplog.text  # transformers logs through logging, to stderr
    assert "longer than the specified maximum" not in printed
