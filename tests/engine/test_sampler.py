import math
from collections.abc import Sequence

import pytest
import torch

from pdserve.engine import sampler as sampler_module
from pdserve.engine.sampler import Sampler, SamplingRow, apply_sampling_transforms
from pdserve.engine.sampling_params import SamplingParams

torch.set_num_threads(1)

NEG_INF = -float("inf")
EOS = 0


def row(
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    generator: torch.Generator | None = None,
    **params: object,
) -> SamplingRow:
    return SamplingRow(
        params=SamplingParams(**params),  # type: ignore[arg-type]
        generator=generator,
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits_for_probs(probs: Sequence[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def test_greedy_is_argmax_after_penalties_and_leaves_generator_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    generator = seeded(1)
    state = generator.get_state()
    rows = [row(temperature=0.0, generator=generator) for _ in range(4)]
    out = Sampler(eos_token_ids=[EOS], seed=0)(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert torch.equal(generator.get_state(), state)
    assert out.logprobs == [None] * 4

    # A repetition penalty on the current best token moves the greedy choice to the runner-up.
    logits = torch.tensor([[0.0, 2.0, 1.5, -1.0]])
    out = Sampler([EOS], seed=0)(logits, [row(temperature=0.0, output=[1], repetition_penalty=2.0)])
    assert out.token_ids == [2]


def test_repetition_penalty_covers_prompt_and_output() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    out = apply_sampling_transforms(logits, [row(prompt=[0, 0], output=[1], repetition_penalty=2.0)])
    # positive logits are divided, negative multiplied; unseen tokens untouched
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -0.5]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0, -0.5]], "input must not be modified"


def test_frequency_and_presence_penalties_count_output_only() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    rows = [row(prompt=[3, 3], output=[2, 2, 1], frequency_penalty=0.5, presence_penalty=0.25)]
    out = apply_sampling_transforms(logits, rows)
    expected = [1.0, 1.0 - (0.5 * 1 + 0.25), 1.0 - (0.5 * 2 + 0.25), 1.0]
    assert out[0].tolist() == pytest.approx(expected)


def test_penalties_only_touch_rows_that_ask_for_them() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 10)
    rows = [
        row(output=[1, 2]),
        row(output=[1, 2], frequency_penalty=1.0),
        row(prompt=[5], output=[1, 2]),
        row(prompt=[5], output=[4], repetition_penalty=1.5, presence_penalty=-1.0),
    ]
    out = apply_sampling_transforms(logits, rows)
    assert torch.equal(out[0], logits[0])
    assert torch.equal(out[2], logits[2])
    expected1 = logits[1].clone()
    expected1[[1, 2]] -= 1.0
    assert torch.allclose(out[1], expected1)
    expected3 = logits[3].clone()
    for t in (5, 4):
        expected3[t] = expected3[t] / 1.5 if expected3[t] > 0 else expected3[t] * 1.5
    expected3[4] += 1.0
    assert torch.allclose(out[3], expected3)


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached() -> None:
    logits = torch.zeros(3, 6)
    logits[:, EOS] = 10.0
    logits[:, 3] = 9.0
    rows = [
        row(output=[1], min_tokens=2, stop_token_ids=[3], temperature=0.0),
        row(output=[1, 2], min_tokens=2, stop_token_ids=[3], temperature=0.0),
        row(output=[], min_tokens=1, temperature=0.0),
    ]
    processed = apply_sampling_transforms(logits, rows, eos_token_ids=[EOS])
    assert processed[0, EOS] == NEG_INF and processed[0, 3] == NEG_INF
    assert torch.isfinite(processed[0, 1:3]).all()
    assert torch.equal(processed[1], logits[1])
    assert processed[2, EOS] == NEG_INF and processed[2, 3] == 9.0
    out = Sampler(eos_token_ids=[EOS], seed=0)(logits, rows)
    assert out.token_ids[1] == EOS
    assert out.token_ids[0] not in (EOS, 3)
    assert out.token_ids[2] == 3


PROBS = [0.5, 0.3, 0.1, 0.06, 0.04]


def draw_many(n: int, **params: object) -> list[int]:
    """n samples of one row, drawn as an n-row batch from the sampler's own generator."""
    logits = logits_for_probs(PROBS).expand(n, -1).contiguous()
    return Sampler([EOS], seed=123)(logits, [row(**params) for _ in range(n)]).token_ids


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 1}, {0}),
        ({"top_p": 0.75}, {0, 1}),  # 0.5 < 0.75 <= 0.5 + 0.3
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"top_p": 0.01}, {0}),  # the top token always survives
        ({"min_p": 0.15}, {0, 1, 2}),  # keep p >= 0.075
        ({"min_p": 0.7}, {0}),
        ({"top_k": 3, "top_p": 0.75}, {0, 1}),
        ({"top_k": 2, "min_p": 0.7}, {0}),
        ({"top_k": 4, "temperature": 0.5, "top_p": 0.9}, {0, 1}),  # sharper: 0.5^2 : 0.3^2 : ...
    ],
)
def test_truncation_never_samples_outside_allowed_set(params: dict, allowed: set[int]) -> None:
    tokens = draw_many(4000, **params)
    assert set(tokens) == allowed


def test_truncation_rows_with_different_settings_in_one_batch() -> None:
    logits = logits_for_probs(PROBS).expand(5, -1).contiguous()
    rows = [row(top_k=2), row(), row(top_p=0.75), row(min_p=0.15), row(top_k=1, top_p=0.99)]
    processed = apply_sampling_transforms(logits, rows)
    kept = [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in processed]
    assert kept == [{0, 1}, {0, 1, 2, 3, 4}, {0, 1}, {0, 1, 2}, {0}]
    # Surviving logits are unchanged (temperature 1): the renormalised distribution is the target.
    assert torch.equal(processed[1], logits[1])
    assert torch.equal(processed[0, :2], logits[0, :2])


def reference_nucleus(logits: torch.Tensor, p: float) -> set[int]:
    """Smallest set of most likely tokens with mass >= p, by a full sort."""
    probs, order = logits.softmax(dim=-1).sort(descending=True)
    mass_before = probs.cumsum(dim=-1) - probs
    return set(order[mass_before < p].tolist()) | {int(order[0])}


def test_top_p_matches_full_sort_reference_on_wide_and_narrow_rows() -> None:
    torch.manual_seed(11)
    vocab = 3000  # above TOP_P_CANDIDATES, so flat rows need the full-vocabulary fallback
    scales = [0.1, 0.5, 2.0, 8.0, 0.1, 8.0]
    ps = [0.9, 0.5, 0.95, 0.9, 0.3, 0.999]
    logits = torch.stack([torch.randn(vocab) * s for s in scales])
    processed = apply_sampling_transforms(logits, [row(top_p=p) for p in ps])
    sizes = []
    for i, p in enumerate(ps):
        kept = set(torch.isfinite(processed[i]).nonzero().flatten().tolist())
        assert kept == reference_nucleus(logits[i], p)
        sizes.append(len(kept))
    assert max(sizes) > sampler_module.TOP_P_CANDIDATES and min(sizes) < 50


def test_top_p_fallback_when_candidates_fall_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", 2)
    logits = logits_for_probs(PROBS).expand(3, -1).contiguous()
    processed = apply_sampling_transforms(logits, [row(top_p=0.75), row(top_p=0.85), row(top_p=0.95)])
    kept = [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in processed]
    assert kept == [{0, 1}, {0, 1, 2}, {0, 1, 2, 3}]


def test_temperature_scales_sampled_rows_but_not_greedy_rows() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    processed = apply_sampling_transforms(logits, [row(temperature=0.5), row(temperature=0.0)])
    assert processed[0].tolist() == [2.0, 4.0, 6.0]
    assert processed[1].tolist() == [1.0, 2.0, 3.0]


def chi_square(tokens: list[int], probs: Sequence[float]) -> float:
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).tolist()
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


# chi-square critical value, 4 degrees of freedom, p = 0.001
CHI2_4DOF_999 = 18.467


def test_unseeded_frequencies_match_softmax() -> None:
    tokens = draw_many(20_000)
    assert chi_square(tokens, PROBS) < CHI2_4DOF_999


def test_seeded_frequencies_match_tempered_softmax() -> None:
    logits = torch.tensor([0.0, 0.5, 1.0, -1.0, 0.2])
    target = torch.softmax(logits / 0.7, dim=-1).tolist()
    generator = seeded(42)
    n = 20_000
    rows = [row(temperature=0.7, generator=generator) for _ in range(n)]
    tokens = Sampler([EOS], seed=0)(logits.expand(n, -1).contiguous(), rows).token_ids
    assert chi_square(tokens, target) < CHI2_4DOF_999
    # Sanity check on the test itself: the untempered distribution is clearly rejected.
    assert chi_square(tokens, torch.softmax(logits, dim=-1).tolist()) > CHI2_4DOF_999


def test_seeded_rows_reproduce_alone_and_in_any_batch_position() -> None:
    torch.manual_seed(7)
    vocab = 64
    steps = 12
    step_logits = [torch.randn(vocab) * 2 for _ in range(steps)]
    params = {"seed": 99, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "presence_penalty": 0.3}

    def run(batch_size: int, position: int) -> list[int]:
        sampler = Sampler([EOS], seed=batch_size)
        generator = seeded(99)
        others = [seeded(1000 + j) for j in range(batch_size)]
        out_tokens: list[int] = []
        for t in range(steps):
            logits = torch.randn(batch_size, vocab)
            logits[position] = step_logits[t]
            rows = [
                row(output=[1, 2, 3], generator=others[j], seed=1000 + j, top_p=0.5)
                if j % 3 == 0
                else row(temperature=0.0 if j % 3 == 1 else 1.3, min_p=0.05)
                for j in range(batch_size)
            ]
            rows[position] = row(prompt=[5, 6], output=out_tokens, generator=generator, **params)
            out_tokens.append(sampler(logits, rows).token_ids[position])
        return out_tokens

    alone = run(1, 0)
    assert len(set(alone)) > 1
    assert run(5, 2) == alone
    assert run(8, 7) == alone
    assert run(3, 0) == alone
    # A different seed gives a different stream (this is what makes the comparison meaningful).
    assert run_with_seed(step_logits, params, seed=100) != alone


def run_with_seed(step_logits: list[torch.Tensor], params: dict, seed: int) -> list[int]:
    generator = seeded(seed)
    sampler = Sampler([EOS], seed=0)
    out_tokens: list[int] = []
    for logits in step_logits:
        r = row(prompt=[5, 6], output=out_tokens, generator=generator, **{**params, "seed": seed})
        out_tokens.append(sampler(logits[None], [r]).token_ids[0])
    return out_tokens


def test_unseeded_sampler_is_reproducible_from_its_own_seed() -> None:
    logits = torch.randn(16, 30)
    rows = [row() for _ in range(16)]
    assert Sampler([EOS], seed=5)(logits, rows).token_ids == Sampler([EOS], seed=5)(logits, rows).token_ids
    draws = {tuple(Sampler([EOS], seed=s)(logits, rows).token_ids) for s in range(4)}
    assert len(draws) > 1


def test_logprobs_come_from_raw_logits_with_rank_and_top() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 20)
    first, second = logits[3].topk(2).indices.tolist()
    logits[3, second] = logits[3, first] - 0.5  # close enough for the penalty below to flip them
    rows = [
        row(logprobs=3, temperature=0.5, top_k=5, repetition_penalty=1.7, output=[0, 1, 2]),
        row(logprobs=0),
        row(),
        row(logprobs=5, temperature=0.0, frequency_penalty=2.0, output=[int(logits[3].argmax())]),
    ]
    out = Sampler([EOS], seed=0)(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i, k in ((0, 3), (1, 0), (3, 5)):
        lp = out.logprobs[i]
        assert lp is not None
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        order = raw[i].argsort(descending=True).tolist()
        assert lp.rank == order.index(token) + 1
        assert [t for t, _ in lp.top] == order[:k]
        assert [v for _, v in lp.top] == pytest.approx(raw[i, order[:k]].tolist(), abs=1e-6)
    # The penalty pushed the greedy row off the raw argmax, so its rank is > 1.
    assert out.logprobs[3] is not None and out.logprobs[3].rank > 1
    assert math.isfinite(out.logprobs[0].logprob)  # type: ignore[union-attr]


def test_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="logits"):
        apply_sampling_transforms(torch.zeros(2, 5), [row()])


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_scratch_logits_sample_the_same_tokens(with_logprobs: bool) -> None:
    """With `scratch=True` the transforms may reuse the logits' memory; the tokens must not change,
    and logits are kept intact while some row still needs them for logprobs."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(7))
    logits[2, 9] = logits[2, 11] = logits[2].max() + 1  # a tie: the first maximum wins

    def rows(seed: int) -> list[SamplingRow]:
        out = [
            row(temperature=0.0),
            row(output=[3, 4, 4], temperature=0.7, top_k=5, repetition_penalty=1.3, generator=seeded(seed)),
            row(temperature=0.0, min_tokens=3, output=[1]),
            row(temperature=1.2, top_p=0.6, min_p=0.1, generator=seeded(seed + 1)),
            row(
                temperature=0.9,
                frequency_penalty=0.5,
                presence_penalty=0.2,
                output=[5, 5],
                generator=seeded(2),
            ),
            row(temperature=0.0, ignore_eos=True),
        ]
        if with_logprobs:
            out[3] = row(temperature=1.2, top_p=0.6, logprobs=3, generator=seeded(seed + 1))
        return out

    for seed in range(20):
        expected = Sampler([EOS], seed=seed)(logits, rows(seed))
        scratch = logits.clone()
        got = Sampler([EOS], seed=seed)(scratch, rows(seed), scratch=True)
        assert got.token_ids == expected.token_ids
        assert got.logprobs == expected.logprobs
        assert torch.equal(scratch, logits) == with_logprobs
    assert expected.token_ids[2] == 9
