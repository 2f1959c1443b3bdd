"""Expert placement: the contiguous split, spare copies, and rebalancing from measured counts."""

from __future__ import annotations

from pdserve.engine.expert_parallel.placement import ExpertPlacement, base_range, rank_imbalance


def test_contiguous_split_covers_every_expert_once():
    held = [list(base_range(r, 4, 64)) for r in range(4)]
    assert [e for share in held for e in share] == list(range(64))


def test_spares_copy_other_ranks_experts():
    p = ExpertPlacement.initial([1, 2], num_experts=8, size=2, num_redundant=4)
    for rank in range(2):
        held = p.held(1, rank)
        assert len(held) == 6 and len(set(held)) == 6
    _, _, copies = p.replica_table(1)
    assert copies.sum() == 12


def test_rebalancing_evens_a_skewed_load():
    # Rank 0 owns experts 0..3, which get almost all tokens.
    counts = {1: [700, 200, 10, 10, 50, 10, 10, 10]}
    plain = ExpertPlacement.initial([1], 8, 2, 0)
    assert rank_imbalance(plain, counts) > 1.8
    spread = ExpertPlacement.initial([1], 8, 2, 4).rebalanced(counts)
    assert rank_imbalance(spread, counts) <= 1.2
    assert spread.version == 1
