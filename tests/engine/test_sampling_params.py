import pytest

from pdserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingParamsError


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens) == (None, 16, 0)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logprobs is None and p.skip_special_tokens and p.detokenize
    assert not p.greedy


def test_normalisation() -> None:
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(7, 8), temperature=0)
    assert p.top_k == 0
    assert p.stop == ["###"]
    assert p.stop_token_ids == [7, 8]
    assert isinstance(p.temperature, float)
    assert p.greedy
    assert SamplingParams(stop=("a", "bcd")).max_stop_str_len == 3
    assert SamplingParams().max_stop_str_len == 0


def test_greedy_threshold() -> None:
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"n": 0}, "n", "at least 1"),
        ({"n": 1.5}, "n", "integer"),
        ({"temperature": -0.1}, "temperature", "non-negative"),
        ({"temperature": "a"}, "temperature", "number"),
        ({"temperature": float("nan")}, "temperature", "number"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", "at least 1"),
        ({"top_k": 2.0}, "top_k", "integer"),
        ({"min_p": 1.1}, "min_p", "[0, 1]"),
        ({"min_p": -0.1}, "min_p", "[0, 1]"),
        ({"seed": True}, "seed", "integer"),
        ({"seed": "1"}, "seed", "integer"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "(0, inf)"),
        ({"logprobs": -1}, "logprobs", f"[0, {MAX_LOGPROBS}]"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs", f"[0, {MAX_LOGPROBS}]"),
        ({"stop": ["ok", ""]}, "stop", "empty"),
        ({"stop": [1]}, "stop", "string"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "non-negative"),
        ({"stop_token_ids": [True]}, "stop_token_ids", "non-negative"),
        ({"ignore_eos": 1}, "ignore_eos", "bool"),
        ({"detokenize": "no"}, "detokenize", "bool"),
        ({"detokenize": False, "stop": ["x"]}, "detokenize=True", "stop_token_ids"),
    ],
)
def test_invalid_values_name_field_and_range(kwargs: dict, field: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert field in message
    assert fragment in message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"seed": "1"}, "seed"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"detokenize": False, "stop": ["x"]}, "stop"),
    ],
)
def test_errors_carry_the_field_for_callers_to_point_at(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_boundary_values_accepted() -> None:
    SamplingParams(
        temperature=0.0,
        top_p=1.0,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        logprobs=0,
        max_tokens=None,
        min_tokens=100,
        seed=0,
    )
    SamplingParams(min_tokens=4, max_tokens=4, logprobs=MAX_LOGPROBS, repetition_penalty=0.01)


def test_message_example_from_spec() -> None:
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)


def test_clone_revalidates_and_copies() -> None:
    p = SamplingParams(stop=["x"], seed=3)
    q = p.clone(temperature=0.5, top_k=-1)
    assert q.temperature == 0.5 and q.top_k == 0 and q.seed == 3 and q.stop == ["x"]
    assert p.temperature == 1.0
    with pytest.raises(ValueError, match="top_p"):
        p.clone(top_p=2.0)
