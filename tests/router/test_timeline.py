"""The dashboard's timeline: per-second rates from the router's counters, goodput against the SLO,
and KV flows from the workers' cumulative byte counts (a unit: the clock is driven by hand)."""

from __future__ import annotations

import pytest

from pdserve.cluster.load_pressure import RouterSignals
from pdserve.router import timeline as timeline_module
from pdserve.router.timeline import SLO, Timeline


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(timeline_module.time, "monotonic", c)
    return c


def test_rates_are_per_second_between_samples(clock):
    t = Timeline(SLO(ttft_ms=500, itl_ms=50))
    assert t.sample(0, 0, RouterSignals(), {}) is None  # no time has passed
    for _ in range(6):  # before the first sample: counted in it
        t.arrived()
    t.emitted(120)
    clock.now += 2.0
    s = t.sample(4, 3, RouterSignals(ttft_p50_ms=80.0), {})
    assert (s.requests_per_s, s.tokens_per_s, s.migrations_per_s, s.in_flight) == (3.0, 60.0, 2.0, 3)
    assert s.latencies.ttft_p50_ms == 80.0
    clock.now += 1.0
    s = t.sample(4, 0, RouterSignals(), {})
    assert (s.requests_per_s, s.tokens_per_s, s.migrations_per_s) == (0.0, 0.0, 0.0)
    assert len(t.samples()) == 2 and t.samples(1) == [s]


def test_goodput_counts_requests_within_the_slo_in_the_window(clock):
    t = Timeline(SLO(ttft_ms=500, itl_ms=50), window_s=10.0)
    t.finished(0.2, 0.01)  # within both targets
    t.finished(0.7, 0.01)  # first token too late
    t.finished(0.2, 0.08)  # gaps too long
    t.finished(0.1, None)  # a one-token answer: only its first token counts
    t.finished(None, None)  # never produced a token
    clock.now += 1.0
    s = t.sample(0, 0, RouterSignals(), {})
    assert s.slo_met == pytest.approx(2 / 5) and s.goodput_per_s == pytest.approx(2 / 10)
    clock.now += 10.5  # all of them left the window
    s = t.sample(0, 0, RouterSignals(), {})
    assert s.slo_met is None and s.goodput_per_s == 0.0


def test_kv_flows_are_rates_per_pair_and_a_new_sender_counts_from_zero(clock):
    t = Timeline(SLO(ttft_ms=500, itl_ms=50))
    clock.now += 0.5
    t.sample(0, 0, RouterSignals(), {("prefill-0", "decode-0"): 1000})  # sent since the router started
    assert [(f.sender, f.receiver, f.bytes_per_s, f.bytes_total) for f in t.flows] == [
        ("prefill-0", "decode-0", 2000.0, 1000)
    ]
    clock.now += 2.0
    sent = {("prefill-0", "decode-0"): 5000, ("prefill-0", "decode-1"): 800}
    t.sample(0, 0, RouterSignals(), sent)
    assert {(f.receiver, f.bytes_per_s) for f in t.flows} == {
        ("decode-0", 2000.0),
        ("decode-1", 400.0),
    }  # a new pair: all of it new
    clock.now += 1.0
    t.sample(0, 0, RouterSignals(), {("prefill-0", "decode-1"): 300})  # its counter started over
    assert [(f.receiver, f.bytes_per_s, f.bytes_total) for f in t.flows] == [("decode-1", 300.0, 300)]


def test_only_the_latest_samples_are_kept(clock):
    t = Timeline(SLO(ttft_ms=500, itl_ms=50), keep=3)
    for _ in range(6):
        clock.now += 1.0
        t.sample(0, 0, RouterSignals(), {})
    assert len(t.samples()) == 3 and t.samples()[-1].at >= t.samples()[0].at
