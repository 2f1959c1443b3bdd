"""Splitting `<think>` sections from answers, whole and streamed in awkward pieces."""

from __future__ import annotations

import pytest

from pdserve.gateway.reasoning import ReasoningSplitter


def feed_all(pieces, in_reasoning=False):
    splitter = ReasoningSplitter(in_reasoning)
    reasoning, content = "", ""
    for i, piece in enumerate(pieces):
        r, c = splitter.feed(piece, final=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


TEXT = "<think>\nadd a and b\n</think>\n\ndef add(a, b):\n    return a + b"


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(TEXT)])
def test_tags_split_across_pieces(size):
    pieces = [TEXT[i : i + size] for i in range(0, len(TEXT), size)]
    assert feed_all(pieces) == ("\nadd a and b\n", "def add(a, b):\n    return a + b")


def test_section_opened_by_the_prompt():
    assert feed_all(["plan it", "</th", "ink>answer"], in_reasoning=True) == ("plan it", "answer")


def test_no_section_is_all_content_and_a_lone_angle_bracket_survives():
    assert feed_all(["<", "b>bold</b>"]) == ("", "<b>bold</b>")
    assert feed_all(["plain"]) == ("", "plain")


def test_unfinished_reasoning_is_flushed_at_the_end():
    assert feed_all(["<think>still thinking</thi"]) == ("still thinking</thi", "")
