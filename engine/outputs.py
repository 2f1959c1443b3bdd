"""What the engine hands back: per-step deltas, and the whole results `LLM.generate` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine.sampler import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams


@dataclass
class RequestDelta:
    """What one `Engine.step()` produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort" once finished
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_cached_tokens: int
    kv_ready: bool = False  # prefill-only request: its KV can now be exported


@dataclass
class Logprob:
    """vLLM's shape: the logprob of one candidate token, its rank and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


@dataclass
class KVPayload:
    """A prefilled request, ready to continue decoding on another engine.

    `kv` holds the request's own blocks only, [L, 2, n_blocks, block_size, KVH, D]; the rest
    is plain data, so the payload can cross a process boundary as is.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the first token, sampled by the prefill engine
    params: SamplingParams
    num_computed_tokens: int
    num_cached_tokens: int
    block_hashes: list[int]
    kv: torch.Tensor
    generator_state: torch.Tensor | None = None  # so seeded sampling continues exactly
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # MTP speculation: pre-norm hidden states [n, H] of the last n computed positions, whose MTP
    # cache entries the decode side writes before its first guess (the rest travel in `kv`).
    mtp_hidden: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return int(self.kv.shape[2])
