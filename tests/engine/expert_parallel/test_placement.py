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


def _check_valid(p: ExpertPlacement, layer: int) -> None:
    """Every rank fills its spare slots with experts it does not otherwise hold; shares are a split."""
    for rank in range(p.size):
        held = p.held(layer, rank)
        assert len(held) == len(base_range(rank, p.size, p.num_experts)) + p.spares_per_rank
        assert len(set(held)) == len(held)
    shares = p.copy_shares(layer)
    assert (shares >= 0).all() and abs(shares.sum(axis=1) - 1).max() < 1e-9


def test_one_expert_with_40_percent_of_the_load_is_split_over_copies():
    # EP 4, 64 experts, one spare slot per rank: expert 5 (rank 0's) takes 40% of the slots.
    counts = {1: [600 / 63] * 64}
    counts[1][5] = 400
    p = ExpertPlacement.initial([1], 64, 4, 4)
    assert rank_imbalance(p, counts) >= 1.8
    after = p.rebalanced(counts)
    _check_valid(after, 1)
    assert rank_imbalance(after, counts) <= 1.2


def test_a_rank_owning_many_hot_experts_sheds_them_with_uneven_shares():
    # Slots per expert measured at EP 4 on the 21B-A3B shape (dummy weights, one prompt repeated):
    # rank 3 owns 62% of them. Copies splitting evenly leave it half of each copied expert, ~1.7x
    # the mean at best with one spare per rank; copies taking most of their expert's slots do not.
    hot = {47: 388, 49: 460, 50: 448, 51: 656, 54: 492, 57: 1036, 59: 160, 60: 1056}
    cold = {
        3: 152,
        13: 136,
        14: 256,
        15: 244,
        18: 208,
        19: 160,
        21: 276,
        31: 8,
        33: 144,
        43: 44,
        45: 4,
        48: 8,
    }
    counts = {1: [hot.get(e, cold.get(e, 0)) for e in range(64)], 2: [0] * 64}
    p = ExpertPlacement.initial([1, 2], 64, 4, 4)
    assert rank_imbalance(p, counts) >= 1.8
    after = p.rebalanced(counts)
    _check_valid(after, 1)
    assert rank_imbalance(after, counts) <= 1.2
    assert after.spares[2] == p.spares[2]  # a layer with no counts keeps its copies


def test_an_even_load_stays_even():
    counts = {1: [100] * 8}
    p = ExpertPlacement.initial([1], 8, 4, 4).rebalanced(counts)
    _check_valid(p, 1)
    assert rank_imbalance(p, counts) == 1.0
