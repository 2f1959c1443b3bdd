"""`pdserve bench kv-transfer` runs the real Gloo transport between two processes."""

from __future__ import annotations

import json

from pdserve.bench.kv_transfer_bench import KVTransferBenchArgs, block_shape
from pdserve.cli import main


def test_block_shape_follows_the_model():
    assert block_shape(KVTransferBenchArgs(model="ernie-4.5-0.3b")) == (18, 2, 16, 2, 128)


def test_bench_moves_the_bytes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "kv.json"
    assert main(["bench", "kv-transfer", "--blocks", "1,3", "--repeats", "1", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    per_block = 18 * 2 * 16 * 2 * 128 * 2  # bf16
    assert doc["bytes_per_block"] == per_block
    assert [r["blocks"] for r in doc["results"]] == [1, 3]
    assert all(r["transfer_ms"] > 0 and r["local_copy_ms"] > 0 for r in doc["results"])
    assert all(r["end_to_end_ms"] >= r["transfer_ms"] for r in doc["results"])
    assert "ratio" in capsys.readouterr().out


def test_bad_flags_are_refused(capsys):
    assert main(["bench", "kv-transfer", "--blocks", "0"]) == 2
    assert "--blocks" in capsys.readouterr().err
