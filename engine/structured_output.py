"""Guided decoding in the engine: grammars compiled off the step loop, token masks for a batch.

`GrammarCompiler` turns a request's `GuidedDecoding` into an llguidance matcher. Compiling (the
grammar against the tokenizer's vocabulary) runs on a thread of its own and is done once per
grammar text: later requests with the same schema copy the compiled matcher (`deep_copy`, a
few microseconds). Each step, `start_masks` begins filling one bitmask for the batch's guided
rows on a thread of its own (in parallel, on llguidance's threads, which release the GIL) while
the engine runs the forward pass; `mask_logits` waits for it and sets every token a row's grammar
forbids to -inf before sampling, so free rows of the same batch are untouched. Filling the masks
was most of the grammar time at batch 32 (about 1-5 ms a step, against under 0.2 ms for the
rest): off the critical path, the engine thread only waits when the pass was shorter.

Speculative guesses are checked against the grammar twice: `trim_guesses` cuts a proposal at
the first token the grammar refuses (no compute is spent verifying it), and a verification
row j is masked with the grammar advanced through guesses 0..j-1 (then rolled back), which is
exactly the mask plain decoding would use at that position; so guided output is the same with
and without speculation.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.hf

# Masks are filled through llguidance's numpy helpers into memory torch shares, not through
# llguidance.torch: importing that wraps a function in torch.compile, which loads torch._dynamo and
# sympy (~140 MB per worker) and, on a worker's first guided request, held the GIL long enough under
# load (>10 s at load average ~20) for the controller to declare the worker dead.
import llguidance.numpy
import torch

from pdserve.engine.guided_grammar import GuidedDecodingError, check_guided
from pdserve.engine.sampling_params import GuidedDecoding

log = logging.getLogger(__name__)


# Compiled grammars kept (LRU); a JSON schema's matcher is a few hundred kB at most.
GRAMMAR_CACHE_SIZE = 256


class GrammarCompiler:
    """Compiles guided decodings for one tokenizer, on one background thread, with a cache."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], threads: int = 2) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_ids[0]
        # A finished grammar allows any of the model's end tokens.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pdserve-grammar")
        self._executor = llguidance.LLExecutor(threads)
        # Fills a step's masks while the forward pass runs (one step's at a time).
        self._masks = ThreadPoolExecutor(1, thread_name_prefix="pdserve-mask")
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, Future[llguidance.LLMatcher]] = OrderedDict()

    def compile(self, guided: GuidedDecoding) -> Future[llguidance.LLMatcher]:
        """A future of a fresh matcher for `guided` (done at once when the grammar is cached).

        Raises GuidedDecodingError at once for a grammar that fails its check.
        """
        text = check_guided(guided)
        with self._lock:
            template = self._compiled.get(text)
            if template is None:
                template = self._pool.submit(self._build, text)
                self._compiled[text] = template
                if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(text)
        out: Future[llguidance.LLMatcher] = Future()
        template.add_done_callback(lambda done: _copy_into(done, out))
        return out

    def _build(self, text: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GuidedDecodingError(matcher.get_error())
        return matcher

    def trim_guesses(self, matcher: llguidance.LLMatcher, guesses: list[int]) -> None:
        """Cuts `guesses` (in place) before the first token the grammar would refuse."""
        accepted = matcher.try_consume_tokens(guesses)
        if accepted:
            matcher.rollback(accepted)
        del guesses[accepted:]

    def start_masks(self, rows: Sequence[GuidedRows]) -> PendingMasks:
        """Begins filling the masks of `rows` (each one request's rows: its first row, then one per
        guess) on the mask thread; `mask_logits` applies them.

        Until then the rows' matchers belong to that thread: the engine touches none of them
        between the two calls (it runs the forward pass). Rows with guesses are filled by
        `mask_logits` itself, since that advances and rolls back their matchers.
        """
        n = sum(1 + len(r.guesses) for r in rows)
        bitmask = torch.from_numpy(llguidance.numpy.allocate_token_bitmask(n, self.vocab_size))
        plain: list[tuple[llguidance.LLMatcher, int]] = []
        broken: list[int] = []
        k = 0
        for r in rows:
            if r.matcher.is_error():
                broken.append(k)
            elif not r.guesses:
                plain.append((r.matcher, k))
            k += 1 + len(r.guesses)
        filled = None
        if plain:
            filled = self._masks.submit(
                llguidance.numpy.fill_next_token_bitmask_par, self._executor, plain, bitmask.numpy()
            )
        return PendingMasks(list(rows), bitmask, broken, filled)

    def mask_logits(self, logits: torch.Tensor, rows: Sequence[GuidedRows] | PendingMasks) -> None:
        """Sets the logits of tokens each guided row may not produce to -inf, in place.

        `rows`: masks begun by `start_masks`, or the rows themselves (filled here and now).
        """
        pending = rows if isinstance(rows, PendingMasks) else self.start_masks(rows)
        if not pending.rows:
            return
        pending.wait()
        bitmask = pending.bitmask
        for k in pending.broken:
            bitmask[k].zero_()  # a broken grammar (never expected) may only end the output
            _allow(bitmask[k], self.eos_token_id)
        index: list[int] = []
        k = 0
        for r in pending.rows:
            if r.guesses and k not in pending.broken:
                self._fill_through_guesses(r, bitmask, k)
            index.extend(range(r.first_row, r.first_row + 1 + len(r.guesses)))
            k += 1 + len(r.guesses)
        penalties = token_penalties(bitmask.to(logits.device), self.vocab_size, logits.dtype)
        if index == list(range(logits.shape[0])):  # every row guided: no gather or scatter
            logits[:, : self.vocab_size] += penalties
        else:
            rows_index = torch.tensor(index, dtype=torch.long, device=logits.device)
            logits[:, : self.vocab_size].index_add_(0, rows_index, penalties)

    def _fill_through_guesses(self, r: GuidedRows, bitmask: torch.Tensor, k: int) -> None:
        consumed, rows = 0, bitmask.numpy()  # the same memory
        for j in range(len(r.guesses) + 1):
            llguidance.numpy.fill_next_token_bitmask(r.matcher, rows, k + j)
            if j == len(r.guesses) or not r.matcher.consume_token(r.guesses[j]):
                # Rows after a refused guess are never reached: the refused token is masked,
                # so the row's sample differs from the guess and verification stops there.
                break
            consumed += 1
        if consumed:
            r.matcher.rollback(consumed)

    @property
    def cache_size(self) -> int:
        return len(self._compiled)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._masks.shutdown(wait=False, cancel_futures=True)


@dataclass
class GuidedRows:
    """One guided request's rows in a step's logits: `first_row`, then one per guess."""

    first_row: int
    matcher: llguidance.LLMatcher
    guesses: Sequence[int] = ()


@dataclass
class PendingMasks:
    """A step's token masks being filled (`GrammarCompiler.start_masks`)."""

    rows: list[GuidedRows]
    bitmask: torch.Tensor  # [rows with their guesses, ceil(V / 32)] int32
    broken: list[int]  # bitmask rows of matchers in error: only an end token is allowed
    filled: Future[None] | None  # the plain rows' fill on the mask thread (None: no plain rows)

    def wait(self) -> None:
        """Returns once the mask thread is done with the rows' matchers (raises what it raised)."""
        if self.filled is not None:
            self.filled.result()


def advance(matcher: llguidance.LLMatcher, tokens: Sequence[int]) -> None:
    """Moves the matcher past tokens the request emitted (sampled under its mask, so allowed).

    A grammar that has stopped (its output is complete) only allowed an end token, which ends
    the request: there is nothing more to match.
    """
    if tokens and not matcher.is_stopped() and not matcher.consume_tokens(list(tokens)):
        log.warning("a guided request emitted a token its grammar refuses: %s", matcher.get_error())


# Row b of this table is byte b's 8 tokens: 0.0 where the bit is set (allowed), -inf where not.
_BYTE_PENALTIES = torch.where(
    ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, -float("inf")
)


def token_penalties(bitmask: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The bitmask [n, ceil(V / 32)] int32 as [n, V] additive penalties: 0 for an allowed token,
    -inf for a forbidden one (bit j of word w is token 32w + j; words are little-endian bytes).

    A table lookup and an add: on this CPU build `masked_fill_` took 2.4 ms over 32 rows of
    4096 tokens and llguidance's own kernel 73 ms; the lookup takes 0.1 ms.
    """
    table = _BYTE_PENALTIES.to(bitmask.device, dtype)
    by = bitmask.contiguous().view(torch.uint8).long()
    return torch.nn.functional.embedding(by, table).reshape(bitmask.shape[0], -1)[:, :vocab_size]


def _allow(row: torch.Tensor, token: int) -> None:
    bit = 1 << (token % 32)
    row[token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32: bit 31 is the sign


def _copy_into(template: Future[llguidance.LLMatcher], out: Future[llguidance.LLMatcher]) -> None:
    error = template.exception()
    if error is not None:
        out.set_exception(error)
    else:
        out.set_result(template.result().deep_copy())
