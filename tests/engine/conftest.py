"""Tiny ERNIE 4.5 checkpoints written by transformers' own `save_pretrained` (hub file format)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_checkpoint

TINY_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=[2, 5],
)
TINY_MOE = dict(
    num_hidden_layers=3,
    moe_num_experts=4,
    moe_k=2,
    moe_intermediate_size=16,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    tie_word_embeddings=False,
)
TINY_DENSE = dict(num_hidden_layers=2, head_dim=8)


def save_tiny_ernie(path: Path, *, moe: bool, max_shard_size: str | None = None, seed: int = 0, **overrides):
    """Saves a random tiny `Ernie4_5(_Moe)ForCausalLM` of the loader tests' shape; returns `path`."""
    shape = {**TINY_COMMON, **(TINY_MOE if moe else TINY_DENSE), **overrides}
    return make_checkpoint(path, moe=moe, seed=seed, max_shard_size=max_shard_size, **shape)


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory) -> Path:
    """Tiny MoE checkpoint (3 layers, 4 experts, untied lm_head), single model.safetensors."""
    return save_tiny_ernie(tmp_path_factory.mktemp("tiny_moe"), moe=True)


@pytest.fixture(scope="session")
def tiny_sharded_moe_checkpoint(tmp_path_factory) -> Path:
    """Same weights as `tiny_moe_checkpoint`, split into several shards with an index."""
    return save_tiny_ernie(tmp_path_factory.mktemp("tiny_moe_sharded"), moe=True, max_shard_size="20KB")


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tmp_path_factory) -> Path:
    """Tiny dense checkpoint (2 layers, tied embeddings), single model.safetensors."""
    return save_tiny_ernie(tmp_path_factory.mktemp("tiny_dense"), moe=False)
