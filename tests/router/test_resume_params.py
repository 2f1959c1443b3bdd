"""What a request resumed on another worker asks for: the rest of its budget, its grammar past its output."""

from __future__ import annotations

from pdserve.engine.sampling_params import GuidedDecoding, SamplingParams
from pdserve.router.request_runner import _remaining


def test_a_resumed_guided_request_says_how_much_of_its_prompt_is_output():
    params = SamplingParams(max_tokens=20, guided_decoding=GuidedDecoding("regex", "[a-z]+"))
    resumed = _remaining(params, 6)
    assert resumed.max_tokens == 14
    assert resumed.guided_decoding == GuidedDecoding("regex", "[a-z]+", num_output_in_prompt=6)
    assert _remaining(params, 0) is params
    assert _remaining(SamplingParams(max_tokens=5), 2).guided_decoding is None
