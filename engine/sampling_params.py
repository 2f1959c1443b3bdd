"""Per-request sampling options, with the names, defaults and valid ranges of vLLM's `SamplingParams`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Below this temperature a request is treated as greedy (same threshold as vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5
# vLLM's default `max_logprobs`; returning more would make every step pay for a large top-k.
MAX_LOGPROBS = 20
# OpenAI's range for a `logit_bias` value.
MAX_LOGIT_BIAS = 100.0
# The kinds of guided decoding, as llguidance's `grammar_from` names their text forms: a JSON
# schema, any JSON object (no text), a regular expression, a JSON list of strings, and a Lark or
# GBNF grammar.
GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `seed=True` or `n=True` is always a caller's mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and not math.isnan(value)


@dataclass(frozen=True)
class GuidedDecoding:
    """What a request's output must match: `kind` (one of `GUIDED_KINDS`) and its text.

    Plain data, so it crosses the wire and the KV handoff as is; the engine compiles it
    (`pdserve.engine.guided_grammar` checks and translates it, torch-free).
    """

    kind: str
    value: str = ""
    # The prompt's last n tokens are output the grammar has matched already: a request resumed on
    # another worker after a failure carries its output so far in its prompt (the router sets it).
    num_output_in_prompt: int = 0


class SamplingParamsError(ValueError):
    """A sampling field's value is out of its range; `field` names it (so does the message)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """How to sample the completion of one request.

    Fields, defaults and accepted ranges follow vLLM, so OpenAI-style request bodies map onto it
    unchanged. `__post_init__` normalises the loose forms (`top_k=-1`, `stop="x"`, `None` lists)
    and raises `SamplingParamsError` (a `ValueError`) naming the offending field and its allowed range.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, normalised to 0) disables top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Number of top logprobs returned besides the sampled token's; 0 = only the sampled token's.
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # False: token ids only, no text (as transformers' `generate` returns); stop strings need text.
    detokenize: bool = True
    # Added to the logits of these token ids before any other transform (OpenAI's logit_bias).
    logit_bias: dict[int, float] | None = None
    # The output is constrained to this grammar (structured outputs, constrained tool calls).
    guided_decoding: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._validate()

    @property
    def greedy(self) -> bool:
        """Whether this request is decoded by argmax (temperature ~ 0)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def max_stop_str_len(self) -> int:
        """Length of the longest stop string (0 without stop strings)."""
        stops: list[str] = self.stop if isinstance(self.stop, list) else []
        return max((len(s) for s in stops), default=0)

    def clone(self, **changes: Any) -> SamplingParams:
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def _normalise(self) -> None:
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        # Integral floats from JSON bodies (e.g. "temperature": 1) arrive as int: store floats.
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if _is_int(value):
                setattr(self, name, float(value))
        if _is_int(self.repetition_penalty):
            self.repetition_penalty = float(self.repetition_penalty)

    def _validate(self) -> None:
        _check_int(self.n, "n", "n must be an integer >= 1")
        if self.n < 1:
            raise SamplingParamsError("n", f"n must be at least 1, got {self.n}")

        _check_real(self.temperature, "temperature", "temperature must be a number >= 0")
        if self.temperature < 0.0 or math.isinf(self.temperature):
            raise SamplingParamsError(
                "temperature", f"temperature must be non-negative and finite, got {self.temperature}"
            )

        _check_real(self.top_p, "top_p", "top_p must be a number in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")

        _check_int(self.top_k, "top_k", "top_k must be an integer: -1 or 0 (disabled) or >= 1")
        if self.top_k < 0:
            raise SamplingParamsError(
                "top_k", f"top_k must be -1 or 0 (disabled), or at least 1, got {self.top_k}"
            )

        _check_real(self.min_p, "min_p", "min_p must be a number in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p}")

        if self.seed is not None:
            _check_int(self.seed, "seed", "seed must be an integer or None")

        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens", "max_tokens must be an integer >= 1 or None")
            if self.max_tokens < 1:
                raise SamplingParamsError(
                    "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}"
                )

        _check_int(self.min_tokens, "min_tokens", "min_tokens must be an integer >= 0")
        if self.min_tokens < 0:
            raise SamplingParamsError(
                "min_tokens", f"min_tokens must be greater than or equal to 0, got {self.min_tokens}"
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens",
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}",
            )

        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_real(value, name, f"{name} must be a number in [-2, 2]")
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"{name} must be in [-2, 2], got {value}")

        _check_real(self.repetition_penalty, "repetition_penalty", "repetition_penalty must be a number > 0")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise SamplingParamsError(
                "repetition_penalty", f"repetition_penalty must be in (0, inf), got {self.repetition_penalty}"
            )

        if self.logprobs is not None:
            _check_int(
                self.logprobs, "logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None"
            )
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise SamplingParamsError(
                    "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}"
                )

        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError(
                "stop", f"stop must be a string, a list of strings or None, got {self.stop!r}"
            )
        if any(s == "" for s in self.stop):
            raise SamplingParamsError("stop", "stop must not contain empty strings")

        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise SamplingParamsError(
                "stop_token_ids",
                f"stop_token_ids must be a list of non-negative integers or None, got {self.stop_token_ids!r}",
            )

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.stop and not self.detokenize:
            raise SamplingParamsError(
                "stop", "stop strings need detokenize=True (they are matched on the text); use stop_token_ids"
            )
        self._validate_logit_bias()
        self._validate_guided()

    def _validate_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise SamplingParamsError(
                "logit_bias", f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
            )
        for token, bias in self.logit_bias.items():
            if not (_is_int(token) and token >= 0):
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias keys must be token ids >= 0, got {token!r}"
                )
            if not _is_real(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}"
                )

    def _validate_guided(self) -> None:
        g = self.guided_decoding
        if g is None:
            return
        if (
            not isinstance(g, GuidedDecoding)
            or g.kind not in GUIDED_KINDS
            or not isinstance(g.value, str)
            or not (_is_int(g.num_output_in_prompt) and g.num_output_in_prompt >= 0)
        ):
            raise SamplingParamsError(
                "guided_decoding",
                f"guided_decoding must be a GuidedDecoding of kind {GUIDED_KINDS}, got {g!r}",
            )
        # The grammar decides where a guided output ends: a rule that forbids ending would leave
        # a finished grammar no token to pick.
        if self.min_tokens:
            raise SamplingParamsError(
                "min_tokens",
                "min_tokens cannot be combined with guided decoding: the grammar decides where the output ends",
            )
        if self.ignore_eos:
            raise SamplingParamsError(
                "ignore_eos",
                "ignore_eos cannot be combined with guided decoding: the grammar decides where the output ends",
            )


def _check_int(value: Any, name: str, message: str) -> None:
    if not _is_int(value):
        raise SamplingParamsError(name, f"{message}, got {value!r} ({type(value).__name__}) for {name}")


def _check_real(value: Any, name: str, message: str) -> None:
    if not _is_real(value):
        raise SamplingParamsError(name, f"{message}, got {value!r} ({type(value).__name__}) for {name}")
