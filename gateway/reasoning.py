"""Splitting ERNIE's `<think>…</think>` section from the answer, as text streams in."""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


class ReasoningSplitter:
    """Feeds on generated text; returns (reasoning, content) increments.

    `in_reasoning` starts True when the prompt itself opened the section (the chat template
    ended with `<think>`). Text that might be the start of a tag is held back until it is not.
    """

    def __init__(self, in_reasoning: bool = False) -> None:
        self.in_reasoning = in_reasoning
        self._seen_any = in_reasoning
        self._pending = ""
        self._after_end = False  # newlines right after </think> separate, they are not content

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self._pending += text
        reasoning, content = [], []
        while self._pending:
            if not self._seen_any:
                stripped = self._pending.lstrip()
                if THINK_START.startswith(stripped) and not final:
                    break  # could still become "<think>"
                self._seen_any = True
                if stripped.startswith(THINK_START):
                    self._pending = stripped[len(THINK_START) :]
                    self.in_reasoning = True
                continue
            if not self.in_reasoning:
                if self._after_end:
                    self._pending = self._pending.lstrip("\n")
                    if not self._pending:
                        break
                    self._after_end = False
                content.append(self._pending)
                self._pending = ""
                break
            end = self._pending.find(THINK_END)
            if end >= 0:
                reasoning.append(self._pending[:end])
                self._pending = self._pending[end + len(THINK_END) :]
                self.in_reasoning = False
                self._after_end = True
                continue
            keep = _partial_suffix(self._pending, THINK_END) if not final else 0
            reasoning.append(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            break
        return "".join(reasoning), "".join(content)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
