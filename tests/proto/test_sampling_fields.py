"""The gateway, the wire and the engine agree on the sampling fields (proto/sampling_fields.py)."""

from __future__ import annotations

import dataclasses

from pdserve.engine.sampling_params import GuidedDecoding, SamplingParams
from pdserve.gateway.protocol import (
    ENDPOINT_SAMPLING_FIELDS,
    REQUEST_FIELDS,
    UNOFFERED_SAMPLING_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from pdserve.proto import pdserve_pb2
from pdserve.proto.sampling_fields import (
    ENGINE_ONLY_FIELDS,
    LIST_FIELDS,
    OPTIONAL_FIELDS,
    SAMPLING_FIELDS,
    SCALAR_FIELDS,
)
from pdserve.router.server import to_sampling_params

WIRE = pdserve_pb2.SamplingParams.DESCRIPTOR


def test_the_proto_message_has_exactly_the_listed_fields_in_their_kinds():
    assert len(set(SAMPLING_FIELDS)) == len(SAMPLING_FIELDS)
    assert sorted(f.name for f in WIRE.fields) == sorted(SAMPLING_FIELDS)
    fields = WIRE.fields_by_name
    assert [n for n in OPTIONAL_FIELDS if not fields[n].has_presence] == []
    assert [n for n in LIST_FIELDS if not fields[n].is_repeated] == []
    assert [n for n in SCALAR_FIELDS if fields[n].has_presence or fields[n].is_repeated] == []


def test_the_engine_takes_every_listed_field_and_only_its_own_others():
    engine = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(SAMPLING_FIELDS) <= engine
    assert engine - set(SAMPLING_FIELDS) == set(ENGINE_ONLY_FIELDS)
    # Scalars are always sent, so their wire zero values must be the engine's defaults.
    defaults = SamplingParams()
    assert [
        n for n in SCALAR_FIELDS if getattr(defaults, n) != getattr(pdserve_pb2.SamplingParams(), n)
    ] == []


def test_the_gateway_offers_every_listed_field_it_does_not_declare_otherwise():
    shared = set(SamplingFields.model_fields)
    # guided_decoding: made from response_format, the guided_* fields or the tools (REQUEST_FIELDS).
    assert shared - set(REQUEST_FIELDS) == set(SAMPLING_FIELDS) - {
        "logprobs",
        "guided_decoding",
        *UNOFFERED_SAMPLING_FIELDS,
    }
    assert set(ENDPOINT_SAMPLING_FIELDS) <= set(SAMPLING_FIELDS)
    # logprobs: each endpoint has its own form of it.
    assert "logprobs" in CompletionRequest.model_fields and "logprobs" in ChatCompletionRequest.model_fields


def test_every_offered_value_reaches_the_engine_unchanged():
    body = CompletionRequest(
        prompt="x", max_tokens=9, min_tokens=2, temperature=0.5, top_p=0.75, top_k=7, min_p=0.125,
        stop="end", stop_token_ids=[3, 4], ignore_eos=True, seed=42, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.25, logit_bias={"7": 2.5, "11": -100},
    )  # fmt: skip
    engine = to_sampling_params(body.to_sampling_proto(max_tokens=9, logprobs=3))
    sent = body.sampling_values(max_tokens=9, logprobs=3)
    assert {name: getattr(engine, name) for name in sent} == sent
    assert sent["stop"] == ["end"] and sent["logprobs"] == 3
    assert engine.logit_bias == {7: 2.5, 11: -100.0}


def test_guided_decoding_reaches_the_engine_unchanged():
    body = CompletionRequest(prompt="x", guided_regex="[a-z]+")
    guided, param = body.guided_decoding()
    assert param == "guided_regex"
    engine = to_sampling_params(body.to_sampling_proto(max_tokens=9, logprobs=None, guided=guided))
    assert engine.guided_decoding == GuidedDecoding("regex", "[a-z]+")
