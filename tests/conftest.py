"""Session-wide fixtures: tiny ERNIE 4.5 checkpoints made with transformers (hub format and names)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

# One thread per pool: the machine has two cores, and results then do not depend on thread timing.
torch.set_num_threads(1)
threadpool_limits(1, user_api="blas")

# Large enough init that logits are decisive: with transformers' default 0.02 the tiny random
# models produce near-uniform logits and greedy decoding sits on ties.
INIT_STD = 0.3

TOKENIZER_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. naïve café 日本語 😀",
    "import os\nimport sys\nprint('hello world')\n",
    "class Engine:\n    def step(self):\n        pass\n",
] * 20


def build_tokenizer(path: Path, vocab_size: int = 280):
    """A byte-level BPE tokenizer with ERNIE's special tokens, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return fast


def make_checkpoint(
    path: Path,
    *,
    moe: bool,
    tokenizer: bool = False,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Saves a random tiny ERNIE 4.5 model with `save_pretrained` (the hub's file format)."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Ernie4_5Config, Ernie4_5ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=2,
        initializer_range=INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=4096,
    )
    if moe:
        common.update(
            num_hidden_layers=3,
            moe_intermediate_size=32,
            moe_k=2,
            moe_num_experts=6,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
        )
        common.update(overrides)
        model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**common))
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.normal_(0, 0.05)
    else:
        common.update(num_hidden_layers=2, head_dim=16)
        common.update(overrides)
        model = Ernie4_5ForCausalLM(Ernie4_5Config(**common))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    if tokenizer:
        build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory) -> Path:
    """Tiny Ernie4_5_MoeForCausalLM with a tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("moe"), moe=True, tokenizer=True)


@pytest.fixture(scope="session")
def dense_checkpoint(tmp_path_factory) -> Path:
    """Tiny Ernie4_5ForCausalLM with a tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("dense"), moe=False, tokenizer=True)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session, on loopback, sized for a 2-core machine."""
    import ray

    # More logical CPUs than cores: test actors mostly wait, and each needs one CPU slot.
    ray.init(
        num_cpus=16,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def redis_port():
    """A redis-server of the test module's own (tests/redis_server.py): for tests that fill, flush,
    slow down or stop it without touching the shared one."""
    from tests.redis_server import spare_port, start_redis, stop_redis

    port = spare_port()
    proc = start_redis(port)
    yield port
    stop_redis(proc)


@pytest.fixture(scope="module")
def redis_url(redis_port) -> str:
    """`redis_port`'s server as a URL."""
    return f"redis://127.0.0.1:{redis_port}"
