"""Tokenizer loading."""

from __future__ import annotations

import os


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer from a checkpoint or tokenizer directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types here; all mean the same to a user
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e
