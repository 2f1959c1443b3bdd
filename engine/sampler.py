"""Next-token sampling: penalties, temperature, top-k/top-p/min-p, seeded draws and logprobs.

Semantics follow vLLM v1: logprobs come from the raw logits; penalties apply before the greedy
argmax; random rows are temperature-scaled, truncated (top-k, then top-p, then min-p) and sampled
with the exponential race (argmax of probs / q, q ~ Exp(1)), which draws exactly V numbers per row
from the row's generator, so a seeded request gets the same tokens whatever batch it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence of this step's batch, as the sampler needs to see it."""

    params: SamplingParams
    # Per-request generator (seeded with params.seed by the engine); None -> the sampler's own.
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated before this step


@dataclass
class SamplerOutput:
    """The token chosen for each row, and its logprobs where the row asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


# Top-p first looks for its nucleus among this many most likely tokens; only rows whose nucleus is
# wider fall back to ranking the whole vocabulary (a full sort is ~10x a top-1024 on CPU).
TOP_P_CANDIDATES = 1024


def _rows_tensor(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


class _RowSubset:
    """Rows `rows` of a [B, V] tensor: the tensor itself when that is every row, else a copy."""

    def __init__(self, full: torch.Tensor, rows: list[int]) -> None:
        self._full = full
        # Rows lists are built in ascending order, so "all rows" means exactly 0..B-1.
        self._index = None if len(rows) == full.shape[0] else _rows_tensor(rows, full.device)
        self.data = full if self._index is None else full.index_select(0, self._index)

    def write_back(self) -> None:
        """Store the in-place changes made to `data` into the full tensor (a no-op for a view)."""
        if self._index is not None:
            self._full.index_copy_(0, self._index, self.data)


def _token_index(
    seqs: Sequence[Sequence[int]], seq_rows: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for every token of `seqs`, `seqs[j]` belonging to row `seq_rows[j]`."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.cat([torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs])
    row = torch.repeat_interleave(torch.tensor(seq_rows, dtype=torch.long), lengths)
    return row.to(device), ids.to(device)


def _row_values(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars as a [n, 1] column that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition (prompt + output), frequency and presence (output only) penalties, in place.

    Works on the (row, token) pairs that occur rather than on [B, V] masks, so the cost is the
    number of tokens seen, not the vocabulary size. Duplicate pairs in a plain (non-accumulating)
    index_put all carry the same value, so whichever write wins is correct.
    """
    device = logits.device

    rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep_rows:
        seqs = [s for i in rep_rows for s in (rows[i].prompt_token_ids, rows[i].output_token_ids)]
        row, ids = _token_index(seqs, [i for i in rep_rows for _ in range(2)], device)
        penalty = torch.tensor([r.params.repetition_penalty for r in rows], dtype=logits.dtype, device=device)
        penalty = penalty[row]
        values = logits[row, ids]
        logits[row, ids] = torch.where(values > 0, values / penalty, values * penalty)

    count_rows = [
        i
        for i, r in enumerate(rows)
        if (r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0) and r.output_token_ids
    ]
    if count_rows:
        row, ids = _token_index([rows[i].output_token_ids for i in count_rows], count_rows, device)
        presence = torch.tensor([r.params.presence_penalty for r in rows], dtype=logits.dtype, device=device)
        frequency = torch.tensor(
            [r.params.frequency_penalty for r in rows], dtype=logits.dtype, device=device
        )
        logits[row, ids] = logits[row, ids] - presence[row]  # once per distinct token
        logits.index_put_((row, ids), -frequency[row], accumulate=True)  # once per occurrence


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Adds each row's `logit_bias` to its tokens' logits, in place (ids past the vocabulary are ignored)."""
    vocab = logits.shape[1]
    pairs = [
        (i, t, b) for i, r in enumerate(rows) for t, b in (r.params.logit_bias or {}).items() if t < vocab
    ]
    if pairs:
        row, tok, bias = zip(*pairs)
        logits.index_put_(
            (_rows_tensor(list(row), logits.device), _rows_tensor(list(tok), logits.device)),
            torch.tensor(bias, dtype=logits.dtype, device=logits.device),
            accumulate=True,
        )


def _apply_min_tokens(
    logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int]
) -> None:
    """Forbid end-of-sequence and stop tokens until a row has generated `min_tokens` tokens."""
    vocab = logits.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) >= r.params.min_tokens:
            continue
        banned = {t for t in (*eos_token_ids, *(r.params.stop_token_ids or ())) if 0 <= t < vocab}
        row_idx.extend([i] * len(banned))
        tok_idx.extend(banned)
    if row_idx:
        logits[_rows_tensor(row_idx, logits.device), _rows_tensor(tok_idx, logits.device)] = -float("inf")


def _apply_top_k(logits: torch.Tensor, rows: list[int], ks: list[int]) -> None:
    """Keep the `ks[j]` largest logits of row `rows[j]` (ties with the k-th kept), in place."""
    subset = _RowSubset(logits, rows)
    k = _rows_tensor(ks, logits.device)
    # One topk with the largest k serves every row; each row then reads its own threshold.
    top = subset.data.topk(max(ks), dim=-1).values
    threshold = top.gather(1, (k - 1).unsqueeze(1))
    subset.data.masked_fill_(subset.data < threshold, -float("inf"))
    subset.write_back()


def _nucleus_threshold(probs: torch.Tensor, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest probability inside each row's top-p nucleus, searching the top `k` tokens.

    Returns (threshold [n, 1], found [n]); `found` is False where the top `k` hold less than p.
    """
    top = probs.topk(k, dim=-1).values  # descending
    mass_before = top.cumsum(dim=-1) - top
    # Token j is in the nucleus while the mass strictly above it is still short of p; j = 0 always is.
    size = (mass_before < p.unsqueeze(1)).sum(dim=-1).clamp_min(1)
    if k == probs.shape[1]:
        return top.gather(1, (size - 1).unsqueeze(1)), torch.ones_like(size, dtype=torch.bool)
    found = mass_before[:, -1] + top[:, -1] >= p
    return top.gather(1, (size - 1).unsqueeze(1)), found


def _apply_top_p(logits: torch.Tensor, rows: list[int], ps: list[float]) -> None:
    """Keep the smallest set of most likely tokens whose probability mass reaches `ps[j]`, in place."""
    subset = _RowSubset(logits, rows)
    probs = subset.data.softmax(dim=-1)
    p = torch.tensor(ps, dtype=probs.dtype, device=probs.device)
    vocab = probs.shape[1]
    threshold, found = _nucleus_threshold(probs, p, min(TOP_P_CANDIDATES, vocab))
    if not bool(found.all()):
        wide = (~found).nonzero().flatten()
        threshold[wide] = _nucleus_threshold(probs[wide], p[wide], vocab)[0]
    subset.data.masked_fill_(probs < threshold, -float("inf"))
    subset.write_back()


def _apply_min_p(logits: torch.Tensor, rows: list[int], min_ps: list[float]) -> None:
    """Drop tokens whose probability is below `min_ps[j]` times the row's top probability, in place."""
    subset = _RowSubset(logits, rows)
    sub = subset.data
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
    threshold = sub.max(dim=-1, keepdim=True).values + _row_values(min_ps, sub).log()
    sub.masked_fill_(sub < threshold, -float("inf"))
    subset.write_back()


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum (the first on ties, as `argmax`).

    `max(dim).indices` gives the same answer 2.5x faster than `argmax` on the CPU (1.0 against
    2.5 ms over [32, 103424] fp32), and greedy decoding runs one per step.
    """
    return x.max(dim=-1).indices


def needs_raw_logits(rows: Sequence[SamplingRow]) -> bool:
    """True when some row returns logprobs, which are taken from the logits before transforms."""
    return any(r.params.logprobs is not None for r in rows)


def apply_sampling_transforms(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    eos_token_ids: Sequence[int] = (),
    *,
    in_place: bool = False,
) -> torch.Tensor:
    """The distribution each row samples from, as logits (-inf for tokens it may not pick).

    Applies logit_bias, penalties and the min_tokens mask to every row, then temperature, top-k, top-p and
    min-p to non-greedy rows (greedy rows are left untemperatured: their argmax is the answer).
    `logits` [B, V] is not modified unless `in_place` (which saves copying a batch's logits, 13 MB
    at batch 32 over ERNIE's vocabulary, every step). Each step runs only on the rows that use
    it, so a batch without top-p never sorts or ranks the vocabulary.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows), V] = [{len(rows)}, V], got {tuple(logits.shape)}")
    out = logits if in_place else logits.clone()
    vocab = out.shape[1]
    _apply_logit_bias(out, rows)
    _apply_penalties(out, rows)
    _apply_min_tokens(out, rows, eos_token_ids)

    temp_rows: list[int] = []
    temps: list[float] = []
    k_rows: list[int] = []
    ks: list[int] = []
    p_rows: list[int] = []
    ps: list[float] = []
    minp_rows: list[int] = []
    minps: list[float] = []
    for i, r in enumerate(rows):
        params = r.params
        if params.greedy:
            continue
        if params.temperature != 1.0:
            temp_rows.append(i)
            temps.append(params.temperature)
        if 0 < params.top_k < vocab:
            k_rows.append(i)
            ks.append(params.top_k)
        if params.top_p < 1.0:
            p_rows.append(i)
            ps.append(params.top_p)
        if params.min_p > 0.0:
            minp_rows.append(i)
            minps.append(params.min_p)

    if temp_rows:
        subset = _RowSubset(out, temp_rows)
        subset.data /= _row_values(temps, out)
        subset.write_back()
    if k_rows:
        _apply_top_k(out, k_rows, ks)
    if p_rows:
        _apply_top_p(out, p_rows, ps)
    if minp_rows:
        _apply_min_p(out, minp_rows, minps)
    return out


class Sampler:
    """Picks one token per row from last-position logits, once per engine step."""

    def __init__(self, eos_token_ids: Sequence[int], seed: int | None = None) -> None:
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        # A throwaway generator's seed() draws fresh entropy without touching torch's global RNG.
        self._seed = seed if seed is not None else torch.Generator().seed()
        # One default generator per device, created on first use there.
        self._generators: dict[torch.device, torch.Generator] = {}

    def default_generator(self, device: torch.device) -> torch.Generator:
        """The generator for rows without a per-request seed."""
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], *, scratch: bool = False
    ) -> SamplerOutput:
        """Sample one token per row of `logits` [B, V] (float32) and gather requested logprobs.

        `scratch`: the caller will not read `logits` again, so the transforms may overwrite them.
        """
        in_place = scratch and not needs_raw_logits(rows)
        processed = apply_sampling_transforms(logits, rows, self.eos_token_ids, in_place=in_place)
        batch, vocab = processed.shape
        device = processed.device
        tokens = torch.empty(batch, dtype=torch.long, device=device)

        greedy_rows = [i for i, r in enumerate(rows) if r.params.greedy]
        seeded_rows = [i for i, r in enumerate(rows) if not r.params.greedy and r.generator is not None]
        unseeded_rows = [i for i, r in enumerate(rows) if not r.params.greedy and r.generator is None]

        if greedy_rows:
            index = _rows_tensor(greedy_rows, device)
            tokens.index_copy_(0, index, argmax_rows(_RowSubset(processed, greedy_rows).data))
        if unseeded_rows:
            index = _rows_tensor(unseeded_rows, device)
            probs = _RowSubset(processed, unseeded_rows).data.softmax(dim=-1, dtype=torch.float32)
            u = torch.rand(
                probs.shape, dtype=torch.float32, device=device, generator=self.default_generator(device)
            )
            tokens.index_copy_(0, index, race(probs, u))
        if seeded_rows:
            index = _rows_tensor(seeded_rows, device)
            probs = _RowSubset(processed, seeded_rows).data.softmax(dim=-1, dtype=torch.float32)
            u = torch.empty_like(probs)
            for j, i in enumerate(seeded_rows):
                generator = rows[i].generator
                assert generator is not None
                # Drawn on the generator's own device so a CPU generator also serves GPU logits;
                # always float32, so a request's stream does not depend on the logits' dtype.
                u[j] = torch.rand(vocab, dtype=torch.float32, device=generator.device, generator=generator)
            tokens.index_copy_(0, index, race(probs, u))

        token_ids = tokens.tolist()
        return SamplerOutput(token_ids=token_ids, logprobs=gather_logprobs(logits, rows, tokens))


def race(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exponential race: with q = -log(u) ~ Exp(1), argmax(p / q) picks token i with probability p_i.

    Consumes `u` [n, V] ~ U[0, 1). Uniform draws plus a log are ~4x cheaper on CPU than
    `exponential_`. u in [0, 1) keeps q in (0, inf]: never 0, so never 0/0 = NaN (which argmax
    would rank first); q = inf only zeroes that token's score for this draw.
    """
    return argmax_rows(probs / u.log_().neg_())


def gather_logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow], tokens: torch.Tensor
) -> list[TokenLogprobs | None]:
    """Logprobs of the sampled tokens (and top alternatives) under the raw logits."""
    result: list[TokenLogprobs | None] = [None] * len(rows)
    lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not lp_rows:
        return result
    index = _rows_tensor(lp_rows, logits.device)
    logprobs = logits.index_select(0, index).float().log_softmax(dim=-1)
    sampled = tokens.index_select(0, index)
    sampled_lp = logprobs.gather(1, sampled.unsqueeze(1))
    ranks = (logprobs >= sampled_lp).sum(dim=-1)
    top_lp, top_ids = logprobs.topk(max(rows[i].params.logprobs or 0 for i in lp_rows), dim=-1)

    sampled_list = sampled.tolist()
    sampled_lp_list = sampled_lp.squeeze(1).tolist()
    rank_list = ranks.tolist()
    top_lp_list = top_lp.tolist()
    top_id_list = top_ids.tolist()
    for j, i in enumerate(lp_rows):
        n = rows[i].params.logprobs or 0
        result[i] = TokenLogprobs(
            token_id=sampled_list[j],
            logprob=sampled_lp_list[j],
            rank=rank_list[j],
            top=list(zip(top_id_list[j][:n], top_lp_list[j][:n])),
        )
    return result
