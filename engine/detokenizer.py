"""Incremental detokenization of one request's output, with stop-string detection.

Text is produced by decoding a short window of ids and diffing it against the window without the
new ids (like vLLM's `detokenize_incrementally`), so tokenizers whose decoding depends on
neighbours (SentencePiece's leading space, byte-level BPE's multi-byte characters) stream the
same text as a one-shot decode. Decoding never runs clean_up_tokenization_spaces: that cleanup
rewrites across token boundaries and cannot be done incrementally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pdserve.engine.sampling_params import SamplingParams

# Prompt tokens kept as decoding context for the first output tokens (vLLM uses the same 5).
PROMPT_CONTEXT_TOKENS = 5
# What byte-level decoders produce for an incomplete UTF-8 sequence.
REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokenizerStep:
    """What one `add_tokens` call produced."""

    new_text: str  # safe to stream now: never retracted later, never half a character
    stopped_on: str | None  # the stop string that ended generation in this step, if any


class IncrementalDetokenizer:
    """Per-request: turns new token ids into new text, finds stop strings."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        # Without include_stop_str_in_output a stop string may start up to len - 1 characters before
        # the newest text, so that much must be held back; with it, truncation only ever cuts text
        # that arrived in the same step.
        self._holdback = 0 if self._include_stop else max((len(s) for s in self._stops), default=1) - 1

        # Only the window from _prefix_offset on is ever decoded again, so older ids are not kept.
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_text = self._decode(self._ids)
        # A prompt cut mid-character would glue the output's first bytes onto it; the output must
        # decode as it would on its own, so drop the incomplete tail from the context.
        while self._ids and self._prefix_text.endswith(REPLACEMENT_CHAR):
            self._ids.pop()
            self._prefix_text = self._decode(self._ids)
        self._prefix_offset = 0  # start of the decoding window (context for the ids after it)
        self._read_offset = len(self._ids)  # ids before this have been turned into _text

        self._text = ""  # all decoded output text (possibly past a stop string until truncated)
        self._emitted = 0  # characters of _text handed out so far
        self.stopped_on: str | None = None

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return self._text[: self._emitted]

    @property
    def finished(self) -> bool:
        """Whether a stop string has ended this request's text."""
        return self.stopped_on is not None

    def add_tokens(self, token_ids: Sequence[int], stop_terminated: bool = False) -> DetokenizerStep:
        """Decode newly generated `token_ids`; check stop strings on the text they add.

        `stop_terminated` means the last id is the EOS or a stop token that ended generation: as in
        vLLM its text is left out unless include_stop_str_in_output. Ids passed after a stop string
        matched are ignored.
        """
        if self.finished:
            return DetokenizerStep(new_text="", stopped_on=None)
        ids = list(token_ids)
        if stop_terminated and ids and not self._include_stop:
            ids.pop()
        self._ids.extend(ids)
        added = self._decode_pending(force=False)
        return self._advance(added, final=False)

    def flush(self) -> str:
        """End of generation: return the text still held back (incomplete characters included)."""
        if self.finished:
            return ""
        added = self._decode_pending(force=True)
        return self._advance(added, final=True).new_text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            list(ids), skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_pending(self, force: bool) -> int:
        """Append the text of ids past _read_offset to _text, unless it ends mid-character."""
        if self._read_offset == len(self._ids):
            return 0
        full = self._decode(self._ids[self._prefix_offset :])
        if full == self._prefix_text:
            # The new ids decode to nothing (e.g. skipped special tokens): nothing to wait for.
            self._read_offset = len(self._ids)
            return 0
        # A trailing replacement char is (almost always) a UTF-8 sequence the next token completes.
        if len(full) <= len(self._prefix_text) or (full.endswith(REPLACEMENT_CHAR) and not force):
            return 0
        new = full[len(self._prefix_text) :]
        self._text += new
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        # The older ids are never decoded again.
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return len(new)

    def _advance(self, added_chars: int, final: bool) -> DetokenizerStep:
        """Check stop strings in the last `added_chars` characters, then emit what is safe."""
        match = self._find_stop(added_chars)
        if match is not None:
            stop, end = match
            self._text = self._text[:end]
            self.stopped_on = stop
        limit = len(self._text) if final or match is not None else len(self._text) - self._holdback
        new_text = ""
        if limit > self._emitted:
            new_text = self._text[self._emitted : limit]
            self._emitted = limit
        return DetokenizerStep(new_text=new_text, stopped_on=self.stopped_on if match is not None else None)

    def _find_stop(self, added_chars: int) -> tuple[str, int] | None:
        """The first stop string to complete within the new text, and where the output text ends.

        "First to complete" (earliest end, then earliest start) is what character-by-character
        generation would have hit, so the result does not depend on how text was split into steps.
        """
        if not added_chars or not self._stops:
            return None
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            # Only matches that end in the new text are new; earlier ones would already have hit.
            start = max(len(self._text) - added_chars - len(stop) + 1, 0)
            index = self._text.find(stop, start)
            if index != -1 and (best is None or (index + len(stop), index) < best[:2]):
                best = (index + len(stop), index, stop)
        if best is None:
            return None
        end, index, stop = best
        return stop, end if self._include_stop else index
