"""`pdserve bench engine --workload json`: guided decoding (a JSON schema) beside the same
workload unguided, and the grammar compile time of a typical schema.

Both sides decode exactly `output_len` tokens per request on the same random-token prompts, so
the difference in time per token is the guided path's own cost (mask fill, mask application,
grammar advance): the unguided side is held to the length with `ignore_eos`, the guided side by
its schema, a list of `minItems` typical objects that cannot end sooner. Greedy,
so the guided side spends nothing on sampling the free side does not.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pdserve.bench.engine_bench import (
    BenchRow,
    EngineBenchArgs,
    _collect,
    _document,
    _in_turn,
    _llm,
    _merge_rounds,
    _peak_rss_mb,
    _prompts,
)
from pdserve.bench.json_workload import TYPICAL_SCHEMA, long_schema
from pdserve.bench.report_file import write_report


def _guided_params(args: EngineBenchArgs):
    from pdserve.engine import GuidedDecoding, SamplingParams

    schema = long_schema(args.output_len)
    return SamplingParams(
        temperature=0,
        max_tokens=args.output_len,
        detokenize=False,
        guided_decoding=GuidedDecoding("json_schema", json.dumps(schema)),
    )


def _unguided_params(args: EngineBenchArgs):
    from pdserve.engine import SamplingParams

    # ignore_eos alone holds the length: min_tokens would add a masking step the guided side has not.
    return SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)


def _compile_ms(llm) -> tuple[float, float]:
    """(cold, cached) milliseconds to get a matcher for TYPICAL_SCHEMA, fresh in this process."""
    from pdserve.engine import GuidedDecoding

    guided = GuidedDecoding("json_schema", json.dumps(TYPICAL_SCHEMA))
    start = time.perf_counter()
    llm.engine.grammars.compile(guided).result()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    llm.engine.grammars.compile(guided).result()
    return cold * 1e3, (time.perf_counter() - start) * 1e3


def _run_side(args: EngineBenchArgs, guided: bool, round_: int, queue: mp.Queue) -> None:
    """One side (guided or not), one round: every batch size once, on that round's prompts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = _llm(args, None)
    name = "guided-json" if guided else "unguided"
    compile_ms = _compile_ms(llm) if guided else None
    params = _guided_params(args) if guided else _unguided_params(args)
    vocab = llm.engine.model_config.vocab_size
    llm.generate(_prompts(vocab, 1, 8, args.seed), params)  # warm-up (and the long schema's compile)
    for batch in args.batches:
        prompts = _prompts(vocab, batch * (round_ + 1), args.input_len, args.seed)[batch * round_ :]
        before = llm.engine.stats()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        after = llm.engine.stats()
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        row = BenchRow(name, batch, seconds, n, n / seconds, _peak_rss_mb())
        row.compile_ms = compile_ms if guided else None
        row.guided_seconds = after.guided_seconds_total - before.guided_seconds_total
        queue.put(row)
    queue.put(None)


def run_guided_bench(args: EngineBenchArgs, output: Path | None = None) -> dict[str, Any]:
    """Unguided and guided sides in fresh processes per round, taking turns; a table of ratios."""
    rounds: list[BenchRow] = []
    with tqdm(total=args.repeats * 2 * len(args.batches), desc="bench engine (guided)") as bar:
        for round_ in range(args.repeats):
            for guided in _in_turn([False, True], round_):
                rounds += _collect(_run_side, (args, guided, round_), bar)
    # One compile per guided process (the first row of each round carries it).
    compiles = [r.compile_ms for r in rounds if r.compile_ms is not None and r.batch == args.batches[0]]
    rows = _merge_rounds(rounds)
    table = []
    for batch in args.batches:
        free = next(r for r in rows if r.system == "unguided" and r.batch == batch)
        guided = next(r for r in rows if r.system == "guided-json" and r.batch == batch)
        per_free, per_guided = free.seconds / free.output_tokens, guided.seconds / guided.output_tokens
        table.append({
            "batch": batch,
            "unguided_tok_s": round(free.tokens_per_s, 2),
            "guided_tok_s": round(guided.tokens_per_s, 2),
            "unguided_ms_per_token": round(per_free * 1e3, 3),
            "guided_ms_per_token": round(per_guided * 1e3, 3),
            "overhead_pct": round((per_guided / per_free - 1) * 100, 2),
            # The engine's own time on grammars over the guided run's time: the overhead without
            # the model's side of it (the demo is MoE: JSON tokens route to other experts, so the
            # two sides' forward passes differ by more than the grammar).
            "grammar_ms_per_token": round(guided.guided_seconds / guided.output_tokens * 1e3, 3),
            "grammar_share_pct": round(guided.guided_seconds / guided.seconds * 100, 2),
        })  # fmt: skip
    doc = _document("engine-guided", args, table, rows)
    doc["compile_ms"] = {
        "schema": TYPICAL_SCHEMA,
        "cold": [round(cold, 2) for cold, _ in compiles],
        "cached": [round(cached, 3) for _, cached in compiles],
    }
    print(f"\nmodel={args.model} input_len={args.input_len} output_len={args.output_len} dtype={args.dtype}")
    print(f"{'batch':>5} {'unguided tok/s':>15} {'guided tok/s':>13} {'ms/token (free/guided)':>23} {'overhead':>9}"
          f" {'grammar ms/token':>17} {'grammar share':>14}")  # fmt: skip
    for r in table:
        per = f"{r['unguided_ms_per_token']:.3f}/{r['guided_ms_per_token']:.3f}"
        print(f"{r['batch']:>5} {r['unguided_tok_s']:>15.1f} {r['guided_tok_s']:>13.1f} {per:>23} {r['overhead_pct']:>8.1f}%"
              f" {r['grammar_ms_per_token']:>17.3f} {r['grammar_share_pct']:>13.1f}%")  # fmt: skip
    cold = doc["compile_ms"]["cold"]
    print(
        f"typical schema compile: cold {min(cold):.2f}-{max(cold):.2f} ms, cached {max(doc['compile_ms']['cached']):.3f} ms"
    )
    write_report(doc, output)
    return doc
