"""Choosing workers: prefill placement policies and the decode choice.

Policies see `Candidate`s: a live, non-draining worker's last load report plus how many leading
blocks of this prompt it already holds (from the prefix index). They are pure and synchronous;
the caller (`pdserve.router.placement`) gathers loads and the index lookup.

`cache_aware` (the default) picks the worker with the lowest estimated prefill work ahead of the
request's first token, in tokens::

    cost(w) = queued_prefill_tokens(w)
              + prompt_tokens - OVERLAP_WEIGHT * local(w)
              - CONTEXT_CACHE_WEIGHT * max(0, in_redis - local(w))
              + RUNNING_COST_BLOCKS * block_size * num_running(w)
    local(w) = min(cached_blocks(w) * block_size, prompt_tokens)
    in_redis = min(context_blocks * block_size, prompt_tokens)

where `context_blocks` are the leading blocks of the prompt in the Redis context cache, which any
worker loads instead of computing: a token there saves CONTEXT_CACHE_WEIGHT of a token's prefill
(loading costs the rest), so a worker's own copy still counts more, by (1 - weight) a token.

lowest cost wins; ties go to the larger cached prefix, then fewer running, then worker id. When no
candidate holds any block of the prompt it is exactly `least_load`. Between a worker A holding a
prefix worth S tokens and a worker B holding none, A wins while queued(A) - queued(B) < S
(running loads equal): a shared prefix attracts traffic while loads are similar, and stops doing
so once A's extra queue outweighs what the prefix saves.

How others weigh it, and what that fixed here:

- NVIDIA Dynamo's KV router scores each worker as `overlap_score_weight * prefill blocks + decode
  blocks`, where prefill blocks are the prompt tokens already queued on the worker plus this
  request's uncached tokens, and takes the lowest; the weight defaults to 1 and 0 means pure load
  balancing. We take the same shape with both sides in tokens, and OVERLAP_WEIGHT = 1 because a
  cached token saves exactly one token of prefill compute and prefill time is close to linear in
  the tokens computed at these prompt lengths: a token saved is worth one token less queued.
- SGLang's router (cache_aware) switches discretely: shortest queue when loads are imbalanced
  (max - min above an absolute threshold, 64 by default, and max above a relative one, 1.5x, in
  requests), otherwise the longest match if it covers at least cache_threshold (0.3-0.5) of the
  prompt. We keep its explicit least-load fallback when nothing is cached, but not the
  thresholds: counted in requests they ignore prompt length, while our workers report queued
  prefill tokens, so comparing savings and queues in one unit puts the switch at the break-even
  point with no constant to tune.
- llm-d's scheduler sums scorers normalized to [0, 1] across candidates with weights (prefix-cache
  3, queue 2 in Red Hat's default profile). Normalizing makes the trade relative to the current
  spread of candidates; we need no normalization or weights because both terms are the same
  quantity (prefill tokens).
- RUNNING_COST_BLOCKS = 1: running sequences cost a prefill little compute. A running request's
  unprefilled tokens are already in queued_prefill_tokens; a decoding one takes about one token of
  each step's batch (2048 tokens by default), a few tokens over a prompt's prefill. Charging one
  block per sequence, the unit in which savings come, makes running load separate workers whose
  queues and savings are equal without overturning a real prefix match.

All of it assumes workers of equal speed, and load reports that include what the router has
already dispatched; the caller must count in-flight requests between reports, or a burst herds
onto one worker (Dynamo tracks per-request load in the router itself for this reason).
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass

from pdserve.roles.messages import WorkerLoad

OVERLAP_WEIGHT = 1.0
# A token loaded from the context cache instead of computed saves most of its prefill: loading a
# prefix took 1/92 (ERNIE-4.5-0.3B shape, 2k tokens) and 1/23 (demo, 1.5k) of computing it
# (`pdserve bench context-cache`, DECISIONS 2026-12-05); 0.95 keeps the cheaper model's ratio.
CONTEXT_CACHE_WEIGHT = 0.95
RUNNING_COST_BLOCKS = 1.0
# A decode worker left with less than this share of its KV blocks free after admitting a request
# is likely to preempt running sequences as they grow (each grows one block every block_size
# tokens), so it ranks after every worker that keeps this much headroom.
DECODE_HEADROOM_FRACTION = 0.1


@dataclass
class Candidate:
    """A worker the router may choose, with its load and this prompt's cached prefix there."""

    worker_id: str
    load: WorkerLoad
    cached_blocks: int = 0  # leading prompt blocks this worker already holds (from the index)
    context_blocks: int = 0  # leading prompt blocks in the Redis context cache (any worker loads them)


class PrefillPolicy(abc.ABC):
    """Chooses the worker that prefills a prompt."""

    name: str

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abc.abstractmethod
    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> Candidate:
        """One of `candidates` (non-empty; draining workers already removed by the caller)."""


def _load_key(c: Candidate) -> tuple[int, int, str]:
    return (c.load.waiting_prefill_tokens, c.load.num_running, c.worker_id)


def _check(candidates: list[Candidate]) -> None:
    if not candidates:
        raise ValueError("no candidates to choose from")


class RoundRobin(PrefillPolicy):
    """Each worker in turn (ordered by id, so a changing candidate order does not skew it)."""

    name = "round_robin"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._next = 0

    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> Candidate:
        _check(candidates)
        ordered = sorted(candidates, key=lambda c: c.worker_id)
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return chosen


class LeastLoad(PrefillPolicy):
    """Fewest queued prefill tokens; ties: fewer running, then worker id."""

    name = "least_load"

    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> Candidate:
        _check(candidates)
        return min(candidates, key=_load_key)


class PowerOfTwo(PrefillPolicy):
    """Two distinct workers at random (seeded), then the less loaded of the two."""

    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._rng = random.Random(seed)

    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> Candidate:
        _check(candidates)
        if len(candidates) == 1:
            return candidates[0]
        return min(self._rng.sample(candidates, 2), key=_load_key)


class CacheAware(PrefillPolicy):
    """Lowest estimated prefill work before the first token; see the module docstring."""

    name = "cache_aware"

    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> Candidate:
        _check(candidates)
        if not any(c.cached_blocks > 0 for c in candidates):
            return min(candidates, key=_load_key)
        return min(candidates, key=lambda c: self._key(c, prompt_tokens))

    @staticmethod
    def cost(c: Candidate, prompt_tokens: int) -> float:
        """Estimated prefill tokens this worker computes before the request's first token."""
        bs = c.load.block_size
        saved = min(c.cached_blocks * bs, prompt_tokens)
        loaded = max(0, min(c.context_blocks * bs, prompt_tokens) - saved)
        return (
            c.load.waiting_prefill_tokens
            + prompt_tokens
            - OVERLAP_WEIGHT * saved
            - CONTEXT_CACHE_WEIGHT * loaded
            + RUNNING_COST_BLOCKS * bs * c.load.num_running
        )

    def _key(self, c: Candidate, prompt_tokens: int) -> tuple[float, int, int, str]:
        return (self.cost(c, prompt_tokens), -c.cached_blocks, c.load.num_running, c.worker_id)


POLICIES: dict[str, type[PrefillPolicy]] = {
    p.name: p for p in (RoundRobin, LeastLoad, PowerOfTwo, CacheAware)
}
DEFAULT_POLICY = CacheAware.name


def make_policy(name: str, seed: int = 0) -> PrefillPolicy:
    """The named prefill policy; ValueError naming the allowed ones on an unknown name."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(seed=seed)


def choose_decode(candidates: list[Candidate], prompt_tokens: int) -> Candidate | None:
    """The decode worker for a prompt: KV headroom first, then running load.

    Only workers with room for the prompt plus the first generated token count (`room_blocks` x
    block size: an expert-parallel group's roomiest rank); None when there is none. Among them, workers that keep DECODE_HEADROOM_FRACTION
    of their blocks free after admitting the request come first; then fewest sequences (running
    plus waiting: each one slows every decode step), then most free blocks, then worker id.
    """
    needed_tokens = prompt_tokens + 1
    fits = [c for c in candidates if c.load.room_blocks * c.load.block_size >= needed_tokens]
    if not fits:
        return None

    def key(c: Candidate) -> tuple[bool, int, int, str]:
        load = c.load
        needed_blocks = -(-needed_tokens // load.block_size)
        tight = load.kv_blocks_free - needed_blocks < DECODE_HEADROOM_FRACTION * load.kv_blocks_total
        return (tight, load.num_running + load.num_waiting, -load.kv_blocks_free, c.worker_id)

    return min(fits, key=key)
