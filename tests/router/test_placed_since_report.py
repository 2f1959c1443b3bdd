"""`PlacedSinceReport`: what the router placed stays counted until a report measured after it.

A load report can arrive after a burst was placed yet have been measured before it; dropping the
burst's charges then would send the next request of the burst to the same worker again.
"""

from __future__ import annotations

import time
from dataclasses import replace

from pdserve.router.placement import IN_TRANSIT_S, PlacedSinceReport
from tests.router.test_placement_local_prefill import worker


def reported(w, measured_at: float):
    """`w` with a new load report (same numbers) measured at `measured_at`."""
    return replace(w, load=replace(w.load, measured_at=measured_at))


def test_a_report_measured_before_a_charge_keeps_it():
    placed = PlacedSinceReport()
    w = reported(worker("prefill", 64), time.time() - 1.0)
    placed.charge(w, prefill_tokens=100, blocks=3)
    w = reported(w, time.time() - 0.5)  # arrives now, measured before the charge
    assert placed.adjusted(w).waiting_prefill_tokens == 100
    assert placed.adjusted(w).kv_blocks_free == 61


def test_a_report_measured_after_a_charge_replaces_it():
    placed = PlacedSinceReport()
    w = reported(worker("prefill", 64), time.time() - 1.0)
    placed.charge(w, prefill_tokens=100)
    w = reported(w, time.time() + IN_TRANSIT_S + 0.01)
    assert placed.adjusted(w).waiting_prefill_tokens == 0


def test_only_the_charges_older_than_the_report_go():
    placed = PlacedSinceReport()
    w = reported(worker("prefill", 64), 0.0)
    placed.charge(w, prefill_tokens=10)
    time.sleep(2 * IN_TRANSIT_S)
    cut = time.time()
    time.sleep(2 * IN_TRANSIT_S)
    placed.charge(w, prefill_tokens=20)
    assert placed.adjusted(reported(w, cut + IN_TRANSIT_S)).waiting_prefill_tokens == 20


def test_a_settled_charge_is_taken_back_once():
    placed = PlacedSinceReport()
    w = reported(worker("decode", 64), 0.0)
    a = placed.charge(w, blocks=3)
    placed.charge(w, blocks=3)  # an equal charge of another route stays
    placed.settle(a)
    placed.settle(a)
    assert placed.adjusted(w).kv_blocks_free == 61
