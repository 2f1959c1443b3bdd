"""`pdserve bench engine`, beside transformers and with speculative configs: real (tiny) runs and their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from pdserve.bench.engine_bench import EngineBenchArgs, _peak_rss_mb, run_engine_bench
from pdserve.engine.kernels import moe_cpu, paged_attention_cpu


def test_speculative_bench_runs_each_config_beside_plain_decoding(tmp_path):
    out = tmp_path / "engine.json"
    args = EngineBenchArgs(
        model="demo",
        batches=(1, 2),
        input_len=16,
        output_len=8,
        threads=1,
        workload="code",
        repeats=2,
        speculative_configs=({"method": "ngram", "num_speculative_tokens": 3},),
    )
    run_engine_bench(args, out)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "engine-speculative"
    spec = "pdserve+ngram-k3"
    assert [(r["batch"], r["system"]) for r in doc["results"]] == [(1, spec), (2, spec)]
    rows = {(r["system"], r["batch"]): r for r in doc["rows"]}
    assert set(rows) == {(s, b) for s in ("pdserve", spec) for b in (1, 2)}
    for (system, batch), r in rows.items():
        assert r["output_tokens"] == 8 * batch * 2  # min_tokens = max_tokens; two rounds pooled
        assert (r["acceptance_rate"] is None) == (system == "pdserve")
    for r in doc["results"]:
        assert r["speedup"] > 0 and 0.0 <= r["acceptance_rate"] <= 1.0
        assert r["mean_accepted_length"] == 0.0 or r["mean_accepted_length"] >= 1.0


def test_transformers_comparison_pools_alternating_rounds_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the exported checkpoint goes
    out = tmp_path / "engine.json"
    args = EngineBenchArgs(model="demo", batches=(1, 2), input_len=16, output_len=8, threads=1, repeats=2)
    run_engine_bench(args, out)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "engine"
    assert doc["native_kernels"] == {
        "moe_cpu": moe_cpu.available(),
        "paged_attention_cpu": paged_attention_cpu.available(),
    }
    assert [r["batch"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        assert r["pdserve_tok_s"] > 0 and r["transformers_tok_s"] > 0
        assert abs(r["ratio"] - r["pdserve_tok_s"] / r["transformers_tok_s"]) < 0.01
    rows = {(r["system"], r["batch"]): r for r in doc["rows"]}
    assert set(rows) == {(s, b) for s in ("pdserve", "transformers") for b in (1, 2)}
    assert all(r["output_tokens"] == 8 * r["batch"] * 2 for r in rows.values())  # two rounds pooled
    assert not list(tmp_path.glob("pdserve-bench-*"))  # the exported checkpoint is gone


def test_peak_rss_is_the_process_own_high_water_mark(tmp_path):
    # A child of a parent that peaked at 600+ MB reports its own peak (~270 MB here), where
    # ru_maxrss, which Linux carries across exec, read 611 MB.
    code = "from pdserve.bench.engine_bench import _peak_rss_mb\nprint(_peak_rss_mb())"
    big = bytearray(600 * 1024 * 1024)
    big[::4096] = b"x" * len(big[::4096])  # touch every page
    own = float(subprocess.check_output([sys.executable, "-c", code], text=True))
    del big
    assert own < 500
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  1024 kB\n")
    assert _peak_rss_mb(status) == 200.0


def test_export_is_written_in_shards_with_the_hub_index(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from pdserve.bench import engine_bench

    monkeypatch.setattr(engine_bench, "_SHARD_BYTES", 1000)
    base = torch.arange(600, dtype=torch.float32).reshape(20, 30)
    state = {
        "a.weight": base.t(),
        "b.weight": torch.ones(100),
        "c.weight": torch.zeros(10),
    }  # a: a transposed view
    engine_bench._save_sharded(state, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert index["metadata"]["total_size"] == (600 + 100 + 10) * 4
