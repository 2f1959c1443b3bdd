"""Prompt lookup: the latest earlier match of the longest suffix, and what followed it."""

import random

import pytest

from pdserve.engine.spec_decode.ngram import NgramIndex, NgramProposer


def test_longest_suffix_wins_and_latest_match_is_used():
    p = NgramProposer(min_n=1, max_n=3)
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    # Suffix [2, 6, 7] never occurred; [6, 7] did, at 1 and 5: the later one is followed by 1, 2.
    assert p.lookup(tokens, 3) == [1, 2, 6]
    assert p.lookup(tokens, 1) == [1]


def test_no_match_and_short_sequences():
    p = NgramProposer(min_n=2, max_n=4)
    assert p.lookup([1, 2, 3, 4], 3) == []  # no bigram repeats
    assert p.lookup([1], 3) == []
    assert NgramProposer(1, 1).lookup([4, 4], 2) == [4]  # the continuation stops at the sequence's end


def test_incremental_index_agrees_with_the_full_scan_as_a_sequence_grows():
    rng = random.Random(0)
    for min_n, max_n in [(1, 1), (2, 4), (1, 3), (3, 5)]:
        reference = NgramProposer(min_n, max_n)
        for _ in range(20):
            tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
            index = NgramIndex(min_n, max_n)
            while len(tokens) < 120:
                k = rng.randrange(1, 6)
                assert index.lookup(tokens, k) == reference.lookup(tokens, k), (min_n, max_n, tokens)
                tokens = tokens + [rng.randrange(6) for _ in range(rng.randrange(1, 6))]


def test_index_refuses_a_shrinking_sequence():
    index = NgramIndex(1, 2)
    index.lookup([1, 2, 3, 1], 2)
    with pytest.raises(ValueError, match="shrank"):
        index.lookup([1, 2], 2)
