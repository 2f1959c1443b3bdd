"""`pdserve bench serve` for real against a small stack (Ray workers, router, gateway); no timing asserts."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import httpx
import pytest

from pdserve.bench.serve_bench import (
    ServeBenchArgs,
    collector_paused,
    distribution,
    engine_throughput,
    make_prompts,
    system_prompt,
)
from pdserve.cli import main
from tests.gateway.stack import BLOCK_SIZE, gateway_stack

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stack(ray_session, moe_checkpoint):
    # The tiny test tokenizer spends about a token per character: room for a shared system prompt.
    with gateway_stack(
        ray_session, moe_checkpoint, name="pdserve-controller-bench-serve", blocks=512, max_model_len=1024
    ) as s:
        yield s


@pytest.mark.parametrize(
    ("workload", "slo", "all_meet"),
    [
        ("chat", ["--slo-ttft-ms", "1e9", "--slo-tpot-ms", "1e9"], True),  # no request can miss these
        ("shared-prefix", ["--slo-tpot-ms", "1e-6"], False),  # nor meet this one
    ],
)
def test_bench_serve_writes_sane_json_and_a_plot(stack, tmp_path, capsys, workload, slo, all_meet):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--url", stack.url, "--concurrency", "1,2", "--workload", workload,
            "--num-prompts", "6", "--max-tokens", "8", "--prefix-words", "40", "--output", str(out), *slo]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "serve" and doc["model"] == "tiny"
    assert doc["args"]["workload"] == workload and doc["args"]["num_prompts"] == 6
    [run] = doc["runs"]
    assert run["url"] == stack.url and run["overhead"] is None  # no --model: no engine-only side
    assert [level["concurrency"] for level in run["levels"]] == [1, 2]
    for level in run["levels"]:
        assert level["requests"] == level["completed"] == 6 and level["failed"] == 0 and level["errors"] == {}
        assert level["output_tokens"] == 6 * 8  # EOS ignored: every request makes max_tokens
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d = level[metric]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"], (metric, d)
        for q in ("p50", "p90", "p99"):  # per request TTFT <= E2E, so every percentile too
            assert level["ttft_ms"][q] <= level["e2e_ms"][q]
        assert level["request_throughput"] == pytest.approx(6 / level["duration_s"], rel=0.01)
        assert level["output_throughput"] == pytest.approx(48 / level["duration_s"], rel=0.01)
        assert level["slo_met"] == (6 if all_meet else 0)
        assert level["goodput"] == (level["request_throughput"] if all_meet else 0)
        assert 0 <= level["cached_prompt_tokens"] < level["prompt_tokens"]
        if workload == "shared-prefix":
            # Every request found the system prompt the warm-up left in the cache (whole blocks of it).
            system = len(stack.tok(system_prompt(40, 0), add_special_tokens=False)["input_ids"])
            assert level["cached_prompt_tokens"] >= 6 * (system - 2 * BLOCK_SIZE)
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "TTFT" in printed and f"wrote {out}" in printed


def test_a_baseline_server_runs_level_by_level_beside(stack, tmp_path, capsys):
    # The same gateway stands in for the other server (vllm serve, in use): the rows must pair up.
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--url", stack.url, "--baseline-url", stack.url + "/", "--baseline-label", "other",
            "--concurrency", "1,2", "--num-prompts", "4", "--max-tokens", "6", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    ours, other = json.loads(out.read_text())["runs"]
    assert other["layout"] == "other (beside url)" and other["url"] == stack.url
    for mine, theirs in zip(ours["levels"], other["levels"], strict=True):
        assert (
            mine["concurrency"] == theirs["concurrency"]
            and mine["output_tokens"] == theirs["output_tokens"] == 24
        )
        assert mine["over_baseline"] == pytest.approx(
            mine["output_throughput"] / theirs["output_throughput"], abs=1e-3
        )
        assert mine["engine_tok_s"] is None and mine["served_over_engine"] is None  # no --model
    assert "tok/s over the baseline" in capsys.readouterr().out


def test_the_engine_alone_runs_each_levels_prompts_in_batches_of_its_concurrency():
    # The bundled demo model: its tokenizer has the chat template the workload's prompts need.
    args = ServeBenchArgs(concurrency=(1, 3), num_prompts=3, max_tokens=5, model="demo")
    rates = engine_throughput("demo", args)
    assert sorted(rates) == [1, 3] and all(rate > 0 for rate in rates.values())


def guided_tokens(url: str) -> float:
    """pdserve_guided_tokens summed over the stack's workers, read from the gateway's /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("pdserve_guided_tokens{")
    )


def test_bench_serve_json_runs_guided_beside_unguided(stack, tmp_path, capsys):
    out = tmp_path / "serve.json"
    before = guided_tokens(stack.url)
    argv = ["bench", "serve", "--url", stack.url, "--concurrency", "1,2", "--workload", "json",
            "--num-prompts", "6", "--max-tokens", "8", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert [run["layout"] for run in doc["runs"]] == ["unguided", "guided json"]
    for run in doc["runs"]:
        for level in run["levels"]:
            assert level["completed"] == 6 and level["failed"] == 0, level["errors"]
            # The guided side's schema cannot be complete in 8 tokens: both sides make exactly 8.
            assert level["output_tokens"] == 6 * 8
            assert level["tpot_ms"]["p50"] > 0
    # The guided side's tokens (2 levels x 6 x 8, and its warm-up) were emitted under the grammar.
    assert guided_tokens(stack.url) - before >= 2 * 6 * 8
    printed = capsys.readouterr().out
    assert "side by side: unguided vs guided json" in printed and "TPOT p50" in printed


def test_prompt_sets_are_seeded_and_shared_prefix_shares_its_system_prompt():
    assert make_prompts("chat", 20, seed=3) == make_prompts("chat", 20, seed=3)
    assert make_prompts("chat", 20, seed=3) != make_prompts("chat", 20, seed=4)
    assert make_prompts("chat", 20, seed=3, batch=0) != make_prompts("chat", 20, seed=3, batch=1)
    assert len({json.dumps(p) for p in make_prompts("chat", 20, seed=3)}) > 10  # varied
    for batch in (0, 1, -1):  # every level, and the warm-up, behind the same system prompt
        shared = make_prompts("shared-prefix", 10, seed=3, prefix_words=50, batch=batch)
        assert all(p[0] == {"role": "system", "content": system_prompt(50, 3)} for p in shared)
        assert len({json.dumps(p[1:]) for p in shared}) > 5
    assert len(system_prompt(50, 3).split()) > 50 and system_prompt(50, 3) != system_prompt(50, 4)


def test_several_prefixes_and_long_documents_are_shared_across_levels():
    levels = [
        make_prompts("shared-prefix", 30, seed=3, prefix_words=50, batch=b, num_prefixes=3) for b in (0, 1)
    ]
    systems = [{p[0]["content"] for p in level} for level in levels]
    assert len(systems[0]) == 3 and systems[0] == systems[1]  # the same 3 prompts behind every level
    docs = make_prompts("long-document", 30, seed=3, prefix_words=200, num_prefixes=2)
    heads = {p[0]["content"].split("\n\n")[0] for p in docs}
    assert len(heads) == 2 and all(len(h.split()) > 200 for h in heads)
    assert len({p[0]["content"] for p in docs}) > 10  # the questions differ
    # One prefix: the shared-prefix questions are those of before (recorded numbers stay comparable).
    assert make_prompts("shared-prefix", 5, seed=3, prefix_words=50) == make_prompts(
        "shared-prefix", 5, seed=3, prefix_words=50, num_prefixes=1
    )


def test_timed_sections_run_without_the_collector_and_give_it_back():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a level failed")
    assert gc.isenabled()


def test_distribution_percentiles_in_ms():
    d = distribution([0.004, 0.001, 0.003, 0.002])
    assert d == {"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97}
    assert distribution([]) is None


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(ValueError, match="concurrency"):
        ServeBenchArgs(concurrency=(0,))
    assert main(["bench", "serve", "--compare-layouts"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["bench", "serve", "--compare-context-cache", "--compare-layouts", "--model", "demo"]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert main(["bench", "serve", "--workload", "json", "--compare-layouts", "--model", "demo"]) == 2
    assert "its own comparison" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num-prefixes"):
        ServeBenchArgs(num_prefixes=0)
    argv = ["bench", "serve", "--url", "http://127.0.0.1:1", "--output", str(tmp_path / "x.json")]
    assert main(argv) == 1
    assert "no gateway answers at http://127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
