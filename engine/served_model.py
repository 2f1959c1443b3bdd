"""`ServedModel`: what one engine serves and its limits, worked out once by the engine.

Workers return it when ready; the controller keeps it, and the router and the gateway check
requests against it instead of deriving limits of their own (a context window computed from
config.json alone, without the KV pool's cap, once let prompts through that no engine could
hold). Plain data without torch, so the router and gateway read it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServedModel:
    """The served model's identity and limits, as the engine computed them."""

    name: str  # the model id clients send
    tokenizer_path: str | None  # directory with the tokenizer files; None when the model has none
    max_model_len: int  # the context window: the model's, capped by max_model_len and by the KV pool
    vocab_size: int
    block_size: int  # tokens per KV block (prompts are hashed into blocks of this size)
    num_kv_blocks: int
    dtype: str  # the weights' and KV cache's dtype, e.g. "float32"
    speculative_method: str | None = None  # "ngram", "mtp", "draft", or None when off
    num_speculative_tokens: int = 0
    # The Redis key prefix of this model's context-cache blocks (None: the context cache is off),
    # and the Redis holding them: the router counts a prompt's blocks there.
    context_cache_namespace: str | None = None
    context_cache_url: str | None = field(default=None, repr=False)  # it may carry a password
    quantization: str | None = None  # weight-only scheme ("wint4", ...), None in full precision
