"""The verification rule keeps the target distribution: chi-square tests on a small vocabulary."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pdserve.engine.sampler import Sampler, SamplingRow, apply_sampling_transforms
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec_decode.verifier import VerifyGroup, verify

# chi-square 0.999 quantiles by degrees of freedom: a correct sampler fails one run in 1000.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
TRIALS = 3000
LOGITS = torch.tensor(
    [
        [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0],
        [0.1, 2.2, -1.0, 1.7, 0.3, 0.0, 1.1, -0.4],
    ]
)


def target_probs(params: SamplingParams, row: int, outputs: list[int]) -> torch.Tensor:
    r = SamplingRow(params, None, [3], outputs)
    return apply_sampling_transforms(LOGITS[row : row + 1], [r])[0].softmax(-1)


def chi_square(counts: Counter, probs: torch.Tensor, n: int) -> tuple[float, int]:
    support = [t for t in range(len(probs)) if probs[t] > 0]
    assert all(t in support for t in counts), "sampled a token the target forbids"
    stat = sum((counts[t] - n * float(probs[t])) ** 2 / (n * float(probs[t])) for t in support)
    return stat, len(support) - 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
        SamplingParams(temperature=1.3, min_p=0.05, presence_penalty=0.8, repetition_penalty=1.3),
    ],
    ids=["plain", "top-k-top-p", "penalties"],
)
@pytest.mark.parametrize("guess", [0, 3], ids=["likely-guess", "unlikely-guess"])
def test_emitted_tokens_follow_the_target_distribution(params, guess):
    sampler = Sampler(eos_token_ids=[])
    first: Counter = Counter()
    second: Counter = Counter()
    for seed in range(TRIALS):
        g = torch.Generator().manual_seed(seed)
        rows = [SamplingRow(params, g, [3], []), SamplingRow(params, g, [3], [guess])]
        (v,) = verify(sampler, LOGITS.clone(), [VerifyGroup(rows, [guess])])
        first[v.token_ids[0]] += 1
        if v.token_ids[0] == guess:
            assert len(v.token_ids) == 2  # an accepted guess is followed by the next position's token
            second[v.token_ids[1]] += 1
        else:
            assert len(v.token_ids) == 1  # the first rejection ends the step

    p0 = target_probs(params, 0, [])
    stat, df = chi_square(first, p0, TRIALS)
    assert stat < CHI2_999[df], (stat, df, first, p0)
    # Given the guess was accepted, the bonus token follows the next position's distribution,
    # which sees the guess among the outputs (penalties apply to it).
    n = first[guess]
    if p0[guess] == 0:
        assert n == 0  # a guess the target forbids is never accepted
        return
    assert n > 50
    p1 = target_probs(params, 1, [guess])
    stat, df = chi_square(second, p1, n)
    assert stat < CHI2_999[df], (stat, df, second, p1)


def test_seeded_verification_replays_plain_sampling():
    """With the same generator, the first emitted token is the one plain sampling picks."""
    params = SamplingParams(temperature=0.9, top_p=0.95)
    sampler = Sampler(eos_token_ids=[])
    for seed in range(50):
        plain = sampler(
            LOGITS[:1].clone(), [SamplingRow(params, torch.Generator().manual_seed(seed), [3], [])]
        )
        g = torch.Generator().manual_seed(seed)
        rows = [SamplingRow(params, g, [3], []), SamplingRow(params, g, [3], [1])]
        (v,) = verify(sampler, LOGITS.clone(), [VerifyGroup(rows, [1])])
        assert v.token_ids[0] == plain.token_ids[0]


def test_greedy_accepts_exactly_the_argmax_prefix():
    sampler = Sampler(eos_token_ids=[])
    params = SamplingParams(temperature=0, logprobs=2)
    logits = torch.tensor([[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    rows = [SamplingRow(params, None, [0], [])] * 3
    (accept_all,) = verify(sampler, logits, [VerifyGroup(rows, [1, 0])])
    assert accept_all.token_ids == [1, 0, 2] and accept_all.num_accepted == 2
    (reject_second,) = verify(sampler, logits, [VerifyGroup(rows, [1, 2])])
    assert reject_second.token_ids == [1, 0]
    assert [lp.token_id for lp in reject_second.logprobs] == [1, 0]
    assert reject_second.logprobs[0].rank == 1 and len(reject_second.logprobs[0].top) == 2
