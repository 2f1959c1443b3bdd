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


def test_a_full_log_gives_exactly_the_newer_changes_in_their_order():
    log = CacheEventLog("w", capacity=8)
    for h in range(20):  # wraps the log twice: events 13..20 are kept
        log.record(KVCacheEvent(stored=[h]))
    log.record(KVCacheEvent(removed=[19]))  # event 21
    log.record(KVCacheEvent(stored=[19]))  # event 22: stored again, so stored wins
    batch = log.since(18)  # events 19..22
    assert batch.seq == 22
    assert batch.stored == [18, 19] and batch.removed == []
    assert log.since(21).stored == [19] and log.since(20).removed == []
    assert log.since(14).stored == [14, 15, 16, 17, 18, 19]  # the oldest kept is event 15
    assert log.since(13) is None  # event 14 is gone
