"""The worker's cache event log: ordered folding, and a snapshot signal when a reader fell behind."""

from __future__ import annotations

from pdserve.engine import KVCacheEvent
from pdserve.roles.cache_events import CacheEventLog


def test_changes_after_a_sequence_number_fold_in_order():
    log = CacheEventLog("w", capacity=10)
    log.record(KVCacheEvent(stored=[1, 2, 3]))
    log.record(KVCacheEvent(removed=[2]))
    log.record(KVCacheEvent(stored=[2, 4], removed=[1]))
    batch = log.since(0)
    assert batch.seq == 3 and batch.snapshot is None
    assert sorted(batch.stored) == [2, 3, 4] and batch.removed == [1]
    later = log.since(2)
    assert sorted(later.stored) == [2, 4] and later.removed == [1]
    assert log.since(3).stored == [] and log.since(3).removed == []


def test_a_reader_behind_the_kept_tail_is_told_to_take_a_snapshot():
    log = CacheEventLog("w", capacity=2)
    for h in range(5):
        log.record(KVCacheEvent(stored=[h]))
    assert log.since(0) is None  # events 1..3 are gone
    assert log.since(3).stored == [3, 4]  # events 4 and 5 stored hashes 3 and 4
    assert log.since(9) is None  # from another incarnation
