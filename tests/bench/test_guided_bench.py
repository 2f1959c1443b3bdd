"""`pdserve bench engine --workload json`: a real (tiny) run of both sides and its JSON."""

from __future__ import annotations

import json

from pdserve.bench.engine_bench import EngineBenchArgs
from pdserve.bench.guided_bench import TYPICAL_SCHEMA, run_guided_bench


def test_guided_bench_decodes_the_same_length_both_ways_and_times_the_compile(tmp_path):
    out = tmp_path / "guided.json"
    args = EngineBenchArgs(model="demo", batches=(1, 2), input_len=16, output_len=12, threads=1, repeats=1)
    run_guided_bench(args, out)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "engine-guided"
    rows = {(r["system"], r["batch"]): r for r in doc["rows"]}
    assert set(rows) == {(s, b) for s in ("unguided", "guided-json") for b in (1, 2)}
    for (system, batch), r in rows.items():
        # The schema's list cannot be complete within output_len: both sides decode all of it.
        assert r["output_tokens"] == 12 * batch
        assert (r["guided_seconds"] > 0) == (system == "guided-json")
    assert [r["batch"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        assert r["guided_tok_s"] > 0 and r["unguided_tok_s"] > 0 and 0 < r["grammar_share_pct"] < 100
    assert doc["compile_ms"]["schema"] == TYPICAL_SCHEMA
    [cold], [cached] = doc["compile_ms"]["cold"], doc["compile_ms"]["cached"]
    assert cold > 0 and cached > 0
