"""Bad speculative configurations fail at start-up, naming what is wrong."""

from __future__ import annotations

import pytest

from pdserve.engine import LLM, EngineConfig


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"method": "draft", "num_speculative_tokens": 2}, "model is required for method 'draft'"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "demo-draft"}, "only applies to method"),
        ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown keys ['lookahead']"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
            "disable_by_batch_size",
        ),
        ("ngram", "must be a JSON object"),
    ],
)
def test_bad_values_are_named(spec, needle):
    with pytest.raises(ValueError) as e:
        EngineConfig(model="demo", speculative_config=spec)
    assert needle in str(e.value)


def test_mtp_needs_mtp_weights(dense_checkpoint):
    with pytest.raises(ValueError, match="MTP layer"):
        LLM(
            str(dense_checkpoint),
            progress=False,
            speculative_config={"method": "mtp", "num_speculative_tokens": 1},
        )


def test_draft_must_share_the_vocabulary(moe_checkpoint):
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        LLM(
            "demo",
            progress=False,
            speculative_config={"method": "draft", "model": str(moe_checkpoint), "num_speculative_tokens": 2},
        )
