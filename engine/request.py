"""A request's state inside the engine, from arrival to finish."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import llguidance

    from pdserve.engine.detokenizer import IncrementalDetokenizer
    from pdserve.engine.outputs import TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREFILLED = "prefilled"  # prefill-only request whose KV waits to be exported
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Tokens, progress and KV blocks of one sequence.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the scheduler gives each
    request `len(all_token_ids) - num_computed_tokens` more (fewer when chunking), which covers
    prompt prefill, decode and recompute after preemption with one rule.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped by the context window
    arrival: int
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    prefill_only: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first scheduling
    # Prompt tokens [start, end) the context cache loaded from Redis into the pool for this request,
    # and how many of them the prefix cache served it at first scheduling (part of num_cached_tokens).
    context_cache_tokens: tuple[int, int] = (0, 0)
    num_context_cached_tokens: int = 0
    scheduled_once: bool = False
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Speculative decoding: this step's guessed tokens (verified, then cleared, by the step), and
    # for MTP the pre-norm hidden states [n, H] of positions num_computed_tokens - n .. - 1, whose
    # MTP cache entries are still to be written (the last one's next token is the newest token).
    spec_token_ids: list[int] = field(default_factory=list)
    mtp_hidden: torch.Tensor | None = None
    # Guided decoding: the grammar's state after the request's output tokens (None: unguided).
    matcher: llguidance.LLMatcher | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the step would compute for this request: the known ones plus this step's guesses."""
        return self.num_tokens + len(self.spec_token_ids)

    def token_ids_in(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of the known tokens followed by the guessed ones."""
        known = self.all_token_ids[start:end]
        if end <= self.num_tokens:
            return known
        return known + self.spec_token_ids[max(0, start - self.num_tokens) : end - self.num_tokens]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
