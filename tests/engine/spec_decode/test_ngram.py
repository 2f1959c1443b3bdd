"""Prompt lookup: the latest earlier match of the longest suffix, and what followed it."""

from pdserve.engine.spec_decode.ngram import NgramProposer


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
