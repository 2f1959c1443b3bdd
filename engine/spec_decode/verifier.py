"""Checking guessed tokens against the target model, without changing what it would emit.

Each guess is tested by sampling the target's own token at that position, exactly as plain
decoding would (same transforms, same random draws from the request's generator): the guess is
accepted when the sampled token equals it, and the first sampled token that differs is emitted
in its place, ending the step. For a deterministic proposer this is rejection sampling with a
one-hot proposal: a guess d is accepted with probability p(d), and on rejection the token comes
from p with d removed, renormalised; so every emitted token is a draw from the target
distribution given the tokens before it. Because the draws are the ones plain decoding makes,
a seeded request emits the very tokens it would without speculation, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_sampling_transforms,
    argmax_rows,
    gather_logprobs,
    needs_raw_logits,
    race,
)


@dataclass
class VerifyGroup:
    """One request's rows in a verification step: one per position, k guesses then one more.

    `rows[j]` sees the request's output plus the first j guesses, so penalties and min_tokens
    apply at each position as they would had the guesses been emitted one at a time.
    """

    rows: list[SamplingRow]
    guesses: list[int]  # k tokens; len(rows) == k + 1


@dataclass
class Verified:
    """The tokens a request emits this step (accepted guesses, then one sampled token)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def verify(
    sampler: Sampler, logits: torch.Tensor, groups: Sequence[VerifyGroup], *, scratch: bool = False
) -> list[Verified]:
    """Verifies each group's guesses; `logits` [sum of len(rows), V] hold the groups' rows in order.

    `scratch`: as for `Sampler.__call__`, the transforms may overwrite `logits`.
    """
    rows = [r for g in groups for r in g.rows]
    in_place = scratch and not needs_raw_logits(rows)
    processed = apply_sampling_transforms(logits, rows, sampler.eos_token_ids, in_place=in_place)
    greedy = argmax_rows(processed).tolist()
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs = {}
    if random_rows:
        index = torch.tensor(random_rows, dtype=torch.long, device=processed.device)
        table = processed.index_select(0, index).softmax(dim=-1, dtype=torch.float32)
        probs = {row: table[j] for j, row in enumerate(random_rows)}

    vocab = processed.shape[1]
    results: list[Verified] = []
    emitted_rows: list[int] = []
    emitted_tokens: list[int] = []
    first = 0
    for g in groups:
        tokens: list[int] = []
        for j, row in enumerate(g.rows):
            i = first + j
            if row.params.greedy:
                token = greedy[i]
            else:
                generator = row.generator or sampler.default_generator(processed.device)
                # The same draw plain decoding makes for this position (see `Sampler.__call__`).
                u = torch.rand(vocab, dtype=torch.float32, device=generator.device, generator=generator)
                token = int(race(probs[i][None], u[None].to(processed.device))[0])
            tokens.append(token)
            emitted_rows.append(i)
            if j == len(g.guesses) or token != g.guesses[j]:
                break
        emitted_tokens.extend(tokens)
        results.append(Verified(tokens, []))
        first += len(g.rows)

    index = torch.tensor(emitted_rows, dtype=torch.long, device=logits.device)
    lps = gather_logprobs(
        logits.index_select(0, index),
        [rows[i] for i in emitted_rows],
        torch.tensor(emitted_tokens, dtype=torch.long, device=logits.device),
    )
    k = 0
    for v in results:
        v.logprobs = lps[k : k + len(v.token_ids)]
        k += len(v.token_ids)
    return results
