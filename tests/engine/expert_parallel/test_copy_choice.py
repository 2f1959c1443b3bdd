"""Which copy a routed slot goes to: copies take their shares of an expert's slots, in every
window of calls, whatever the call sizes."""

from __future__ import annotations

import numpy as np

from pdserve.engine.expert_parallel.dispatch import choose_copies, cumulative_shares
from pdserve.engine.expert_parallel.placement import ExpertPlacement


def test_copies_take_their_shares_over_calls_of_any_size():
    # Expert 0 has copies on ranks 0 and 1 (one spare slot each on EP 2 of 4 experts); give them 0.8 / 0.2.
    p = ExpertPlacement.initial([1], 4, 2, 2)
    _, _, copies = p.replica_table(1)
    assert copies[0] == 2
    shares = [[0.8, 0.2] if n == 2 else [1.0] for n in copies]
    p = ExpertPlacement(p.num_experts, p.size, p.spares_per_rank, p.spares, 1, {1: shares})
    cumulative = cumulative_shares(p, 1)
    seen = np.zeros(4, dtype=np.int64)
    rng = np.random.default_rng(0)
    picked = []
    for _ in range(200):  # decode-sized calls: a few slots each, expert 0 among others
        flat = rng.integers(0, 4, size=int(rng.integers(1, 7)))
        choice = choose_copies(cumulative, seen, flat, 0.5)
        assert (choice < copies[flat]).all()
        picked += choice[flat == 0].tolist()
    picked = np.array(picked)
    assert len(picked) > 100
    assert abs((picked == 1).mean() - 0.2) < 0.02
    for start in range(0, len(picked) - 20, 20):  # every 20 consecutive slots: 4 +- 1 to copy 1
        assert abs((picked[start : start + 20] == 1).sum() - 4) <= 1


def test_a_copy_with_no_share_is_never_picked():
    p = ExpertPlacement.initial([1], 4, 2, 2)
    _, _, copies = p.replica_table(1)
    shares = [[1.0, 0.0] if n == 2 else [1.0] for n in copies]
    p = ExpertPlacement(p.num_experts, p.size, p.spares_per_rank, p.spares, 1, {1: shares})
    seen = np.zeros(4, dtype=np.int64)
    choice = choose_copies(cumulative_shares(p, 1), seen, np.zeros(500, dtype=np.int64), 0.25)
    assert (choice == 0).all() and seen[0] == 500
