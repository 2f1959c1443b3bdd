"""`SpeculativeConfig`: which proposer guesses tokens, how many, and when to stop guessing."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

METHODS = ("draft", "mtp", "ngram")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Validated `speculative_config` (vLLM's key names where vLLM has the same knob).

    `disable_by_batch_size`: speculate only while at most this many requests are decoding; a
    large batch already keeps the machine busy, and verifying k guesses per request then costs
    more than the tokens it saves. None speculates at every batch size.
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None  # draft: a checkpoint directory or bundled name with the same vocabulary
    # ngram: shortest suffix to look up. 2, not 1: a one-token match guesses poorly, and rejected
    # guesses cost verification work (demo, code: acceptance 0.48 at 1, 0.67 at 2, 0.80 at 3).
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4  # ngram: longest suffix to look up (tried first)
    disable_by_batch_size: int | None = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be an integer in "
                f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}"
            )
        if self.method == "draft":
            if not isinstance(self.model, str) or not self.model:
                raise ValueError(
                    "speculative_config.model is required for method 'draft': a checkpoint directory or "
                    "bundled model name sharing the target's tokenizer, e.g. 'demo-draft'"
                )
        elif self.model is not None:
            raise ValueError(f"speculative_config.model only applies to method 'draft', not {self.method!r}")
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config.{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                "speculative_config.prompt_lookup_min must not exceed prompt_lookup_max, got "
                f"{self.prompt_lookup_min} > {self.prompt_lookup_max}"
            )
        b = self.disable_by_batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(
                f"speculative_config.disable_by_batch_size must be a positive integer or null, got {b!r}"
            )

    @classmethod
    def from_dict(cls, value: dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        """Builds from the user's JSON object; unknown keys are refused by name."""
        if isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                "speculative_config must be a JSON object such as "
                '{"method": "ngram", "num_speculative_tokens": 4}, got ' + type(value).__name__
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known keys: {sorted(known)}")
        for required in ("method", "num_speculative_tokens"):
            if required not in value:
                raise ValueError(f"speculative_config.{required} is required")
        return cls(**value)
