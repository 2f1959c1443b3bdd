"""What the engine hands back: per-step deltas, and the whole results `LLM.generate` returns.

Plain data without torch: deltas cross process seams (worker to router to gateway), and the
processes on the far side of them do not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprobs:
    """Logprob of the sampled token, its rank, and the requested top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely; ties count against the sampled token, as in vLLM
    top: list[tuple[int, float]]  # top-`params.logprobs` (token_id, logprob), best first


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
    num_cached_tokens: int  # prompt tokens served from a prefix cache: the pool's or Redis'
    kv_ready: bool = False  # prefill-only request: its KV can now be exported
    num_context_cached_tokens: int = 0  # of num_cached_tokens, those loaded from the Redis context cache


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
    num_context_cached_tokens: int = 0  # of num_cached_tokens, those loaded from the Redis context cache
