"""`pdserve bench planner --simulate` at small sizes: the simulator keeps every request and block,
and the planner beats the static splits on the shifting workload. Seeded, so exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.planner_bench import PlannerBenchArgs, run_size, static_splits
from pdserve.bench.planner_sim import DEMO_COST, SHIFTING, Recorder, Simulation, best_split_rate, workload
from pdserve.cli import main


def test_static_splits_are_a_quarter_a_half_and_three_quarters_prefill():
    assert static_splits(4) == [(1, 3), (2, 2), (3, 1)]
    assert static_splits(64) == [(16, 48), (32, 32), (48, 16)]
    assert static_splits(2) == [(1, 1)]


def test_a_live_migration_moves_every_request_and_frees_every_block():
    # Two decode workers busy with long answers; one is switched to prefill mid-stream.
    phases = SHIFTING[1:2]
    rate = 0.5 * best_split_rate(DEMO_COST, phases[0], 4, 0.05)
    requests = workload(phases, [rate], 30.0, seed=1)
    recorder = Recorder(1, 30.0)
    sim = Simulation(DEMO_COST, requests, recorder, prefill=2, decode=2)
    leaving = sim.workers[2]
    log: dict[str, object] = {"duration_s": None}
    moved = []
    sim.at(10.0, lambda: (moved.append(leaving.decoding), sim.switch(leaving, "prefill", log)))
    sim.run(until=300.0)

    assert moved[0] > 10  # it had work to hand over
    assert all(r.finished_at is not None for r in requests)
    assert all(w.kv_used == 0 and not w.reserved and not w.arriving for w in sim.workers)
    assert leaving.role == "prefill" and leaving.switching_to is None
    # Bounded: one step to finish, the moves one after another, then the flip.
    expected = moved[0] * DEMO_COST.handoff_s + DEMO_COST.flip_s
    assert expected <= log["duration_s"] <= expected + DEMO_COST.step_s(DEMO_COST.max_num_seqs)
    # The migrated requests' pauses were recorded as inter-token gaps.
    assert max(recorder.itl[0]) / 1e4 >= moved[0] * DEMO_COST.handoff_s - 1e-3


def test_the_planner_follows_the_shifting_load_and_beats_every_static_split():
    run = run_size(PlannerBenchArgs(workers=(4,), phase_s=60.0), 4)
    *static, planner = run["systems"]
    assert planner["system"] == "planner" and [s["system"] for s in static] == ["1P+3D", "2P+2D", "3P+1D"]
    worst = min(s["overall"]["goodput_rps"] for s in static)
    best = max(s["overall"]["goodput_rps"] for s in static)
    assert planner["overall"]["goodput_rps"] >= max(best, 1.3 * worst)  # the targets
    for i, phase in enumerate(planner["phases"]):
        assert phase["goodput_rps"] >= min(s["phases"][i]["goodput_rps"] for s in static)
    assert planner["overall"]["unfinished"] == 0

    # Toward the loaded side: prompts first (decode -> prefill), then answers (prefill -> decode).
    prompts, answers, _ = planner["phases"]
    assert prompts["to_prefill"] >= 1 and prompts["to_decode"] == 0
    assert answers["to_decode"] >= 1 and answers["to_prefill"] == 0
    log = planner["switch_log"]
    assert log[0]["to"] == "prefill" and log[0]["reason"] == "prefill_queue"
    assert all(s["duration_s"] is not None for s in log)


def test_bench_planner_writes_json_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "planner.json"
    argv = ["bench", "planner", "--simulate", "--workers", "4", "--phase-s", "20", "--output", str(out)]
    assert main([*argv, "--role-planner", '{"hysteresis": 2}']) == 0
    doc = json.loads(out.read_text())
    assert (doc["benchmark"], doc["mode"]) == ("planner", "simulate")
    assert doc["args"]["planner"]["hysteresis"] == 2 and doc["args"]["slo_ttft_ms"] == 500.0
    [run] = doc["runs"]
    assert run["workers"] == 4 and len(run["rates_rps"]) == 3
    assert [s["system"] for s in run["systems"]] == ["1P+3D", "2P+2D", "3P+1D", "planner"]
    printed = capsys.readouterr().out
    assert "4 workers (simulated" in printed and "overall" in printed and "planner:" in printed


def test_bench_planner_refuses_what_it_cannot_do(capsys: pytest.CaptureFixture[str]):
    assert main(["bench", "planner"]) == 2
    assert "this suite simulates (add --simulate)" in capsys.readouterr().err
    assert main(["bench", "planner", "--simulate", "--role-planner", '{"intervl_s": 1}']) == 2
    assert "--role-planner: unknown key 'intervl_s' (did you mean 'interval_s'?)" in capsys.readouterr().err
    assert main(["bench", "planner", "--simulate", "--workers", "1"]) == 2


def test_a_seeded_simulation_repeats_exactly():
    args = PlannerBenchArgs(workers=(4,), phase_s=20.0, seed=3)
    assert run_size(args, 4) == run_size(args, 4)
