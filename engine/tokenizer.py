"""Tokenizer loading."""

from __future__ import annotations

import os


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer from a checkpoint or tokenizer directory."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types here; all mean the same to a user
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e
    # The engine and the gateway enforce the context window themselves (ServedModel.max_model_len,
    # with a message naming it); transformers' own "sequence length is longer than the maximum"
    # warning for a prompt pdserve is about to refuse would only be noise in the logs.
    tokenizer.model_max_length = 2**62
    return tokenizer
