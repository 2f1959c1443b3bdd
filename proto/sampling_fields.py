"""The sampling fields a request carries from the gateway over the wire to the engine, named once.

`pdserve.proto`'s `SamplingParams` message, the gateway's request models and the engine's
`SamplingParams` dataclass are each checked against these names (tests/proto/test_sampling_fields.py),
so a field added to one of them and not the others fails a test instead of being dropped silently.
"""

from __future__ import annotations

# Proto3 `optional` fields: unset on the wire means the engine's default.
OPTIONAL_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "skip_special_tokens",
)
# Plain proto3 scalars, always sent: their zero values are the engine's defaults.
SCALAR_FIELDS = ("min_tokens", "ignore_eos", "include_stop_str_in_output")
# Repeated on the wire, lists in the engine.
LIST_FIELDS = ("stop", "stop_token_ids")

# A map on the wire (token id -> bias), a dict in the engine.
MAP_FIELDS = ("logit_bias",)
# A message on the wire (unset: none), the engine's `GuidedDecoding`.
MESSAGE_FIELDS = ("guided_decoding",)

SAMPLING_FIELDS = OPTIONAL_FIELDS + SCALAR_FIELDS + LIST_FIELDS + MAP_FIELDS + MESSAGE_FIELDS

# The engine's fields the wire leaves out, and why.
ENGINE_ONLY_FIELDS = {
    "n": "the gateway sends n choices as n requests",
    "detokenize": "the router always streams text",
}
