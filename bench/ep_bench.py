"""`pdserve bench ep`: one MoE replica on expert-parallel groups of several sizes, side by side.

Per group size and batch: peak RSS per rank, decode tokens/s, the share of rank-step time spent
in dispatch/combine collectives; then expert load imbalance (max/mean tokens per rank) for a
skewed prompt set (one prompt repeated: the same experts stay hot) before and after a rebalance.
Prompts are random token ids (seeded), not text the demo models were trained on.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.report_file import write_report
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.expert_parallel.group import ExpertParallelGroup
from pdserve.engine.expert_parallel.memory import rank_weight_bytes, smallest_group_within
from pdserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class EPBenchArgs:
    """What `pdserve bench ep` runs."""

    model: str
    load_format: str
    hf_overrides: dict[str, Any]
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    input_len: int = 32
    output_len: int = 16
    total_threads: int = 2
    repeats: int = 3  # decode rounds per (size, batch); the median by tok/s is reported
    num_redundant_experts: int | None = None  # default: one spare per rank
    worker_memory_gb: float | None = None
    seed: int = 0
    split_dense: bool = True  # False: every rank holds the LM head and dense MLPs whole


def _config(args: EPBenchArgs, size: int, redundant: int = 0) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        hf_overrides=args.hf_overrides,
        dtype="float32",
        seed=args.seed,
        progress=False,
        num_threads=max(1, args.total_threads // size),  # the same cores in all, split over ranks
        max_num_seqs=max(args.batches),
        kv_cache_blocks=max(args.batches) * -(-(args.input_len + args.output_len) // 16) + 8,
        expert_parallel={
            "size": size,
            "num_redundant_experts": redundant,
            "split_dense": args.split_dense,
        },
    )


def _refusal(args: EPBenchArgs, size: int) -> dict[str, Any] | None:
    """Why a group of `size` is not started under `--worker-memory-gb` (its ranks' weights alone
    exceed the limit), or None when it fits or no limit is set."""
    if args.worker_memory_gb is None:
        return None
    config = _config(args, size)
    need = rank_weight_bytes(config)
    limit = int(args.worker_memory_gb * 2**30)
    if need <= limit:
        return None
    fits = smallest_group_within(config, limit)
    fix = f"use --ep {fits} or more" if fits else "no group size fits it; raise the limit"
    return {
        "ep": size,
        "weight_gib_per_rank": need / 2**30,
        "error": (
            f"--worker-memory-gb {args.worker_memory_gb:g}: a rank of an EP {size} group needs "
            f"{need / 2**30:.2f} GiB of weights alone; {fix}"
        ),
    }


def _decode_run(group: ExpertParallelGroup, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i, ids in enumerate(prompts):
        group.add_request(f"r{time.monotonic_ns()}-{i}", ids, params)
    group.step()  # the prefill of every prompt; decode steps follow
    before = group.rank_stats()
    started, tokens, steps = time.perf_counter(), 0, 0
    while group.has_unfinished():
        tokens += sum(len(d.new_token_ids) for d in group.step())
        steps += 1
    seconds = time.perf_counter() - started
    after = group.rank_stats()

    def moved(key: str) -> float:
        return sum(a[key] - b[key] for a, b in zip(after, before))

    dispatch, step, rounds = moved("dispatch_seconds"), moved("step_seconds"), moved("rounds")
    return {
        "decode_tok_s": tokens / seconds,
        "dispatch_share": dispatch / step if step else 0.0,
        # computing this rank's columns of split products (LM head, dense MLPs) for any rank
        "split_share": moved("split_compute_seconds") / step if step else 0.0,
        # one rank's round: header, rows, slot ids and results exchanged (waits for peers included)
        "dispatch_ms_per_round": 1000 * dispatch / rounds if rounds else 0.0,
        "rounds_per_step": rounds / len(after) / steps if steps else 0.0,
        "rows_sent_per_token": moved("rows_sent") / tokens if tokens else 0.0,
    }


def _ran_imbalance(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    """max/mean token slots per rank that the ranks' experts ran between two `rank_stats()`, the
    mean over MoE layers (as `rank_imbalance` takes it)."""
    layers = sorted({layer for s in after for layer in s["layer_rows"]})
    worst = []
    for layer in layers:
        ran = [a["layer_rows"].get(layer, 0) - b["layer_rows"].get(layer, 0) for a, b in zip(after, before)]
        if sum(ran):
            worst.append(max(ran) * len(ran) / sum(ran))
    return sum(worst) / len(worst) if worst else 1.0


def run_ep_bench(args: EPBenchArgs, output: Path | None = None) -> dict[str, Any]:
    """Runs every size and batch, prints the tables, writes JSON to `output`."""
    rng = random.Random(args.seed)
    rows, imbalance, refused = [], [], {}
    for size in args.sizes:
        refusal = _refusal(args, size)
        if refusal is not None:
            refused[size] = refusal
            print(f"ep {size:>2}: refused: {refusal['error']}")
            continue
        weight_gib = rank_weight_bytes(_config(args, size)) / 2**30
        group = ExpertParallelGroup(_config(args, size))
        try:
            for batch in args.batches:
                runs = []
                for _ in range(args.repeats):  # new prompts each round; the median round is kept
                    prompts = [[rng.randrange(3, 250) for _ in range(args.input_len)] for _ in range(batch)]
                    runs.append(_decode_run(group, prompts, args.output_len))
                result = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
                rss = max(s["peak_rss_bytes"] for s in group.rank_stats())
                rows.append(
                    {
                        "ep": size,
                        "batch": batch,
                        "weight_gib_per_rank": weight_gib,
                        "peak_rss_gib_per_rank": rss / 2**30,
                        **result,
                    }
                )
                print(
                    f"ep {size:>2} batch {batch:>3}: rank RSS {rss / 2**30:6.2f} GiB  decode "
                    f"{result['decode_tok_s']:8.1f} tok/s  dispatch/combine {100 * result['dispatch_share']:5.1f}%"
                )
        finally:
            group.close()
    for size in [s for s in args.sizes if s > 1 and s not in refused]:
        redundant = args.num_redundant_experts if args.num_redundant_experts is not None else size
        group = ExpertParallelGroup(_config(args, size, redundant))
        try:
            skewed = [[rng.randrange(3, 250) for _ in range(4)] * (args.input_len // 4)] * max(args.batches)
            group.collect_expert_tokens()
            start = group.rank_stats()
            _decode_run(group, skewed, args.output_len)
            rebalanced = group.rank_stats()
            before = group.imbalance()
            group.rebalance()
            _decode_run(group, skewed, args.output_len)
            after = group.imbalance()
            row = {
                "ep": size,
                "redundant": redundant,
                "before": before,
                "after": after,
                # the slots each rank's experts actually ran, not the counts under the placement
                "measured_before": _ran_imbalance(start, rebalanced),
                "measured_after": _ran_imbalance(rebalanced, group.rank_stats()),
            }
            imbalance.append(row)
            print(
                f"ep {size}: imbalance (max/mean tokens per rank) {before:.2f} before, {after:.2f} after "
                f"rebalancing; as run {row['measured_before']:.2f} -> {row['measured_after']:.2f}"
            )
        finally:
            group.close()
    base = {r["batch"]: r for r in rows if r["ep"] == 1}
    for r in rows:
        if r["batch"] in base:
            b = base[r["batch"]]
            r["rss_vs_ep1"] = r["peak_rss_gib_per_rank"] / b["peak_rss_gib_per_rank"]
            r["decode_vs_ep1"] = r["decode_tok_s"] / b["decode_tok_s"]
    if args.worker_memory_gb is not None:
        for r in rows:
            r["fits_worker_memory"] = r["peak_rss_gib_per_rank"] <= args.worker_memory_gb
    if refused and not rows:
        raise SystemExit(f"pdserve bench ep: every size was refused: {refused[min(refused)]['error']}")
    doc = {
        "args": {**args.__dict__},
        "decode": rows,
        "imbalance": imbalance,
        "refused": list(refused.values()),
    }
    _print_table(rows)
    write_report(doc, output, default=list)
    return doc


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'ep':>3} {'batch':>5} {'weights GiB':>11} {'RSS/rank GiB':>12} {'x EP1':>6} {'tok/s':>8} {'x EP1':>6} {'dispatch %':>10} {'split %':>7} {'ms/round':>8} {'rows/tok':>8}"
    )
    for r in rows:
        print(
            f"{r['ep']:>3} {r['batch']:>5} {r['weight_gib_per_rank']:>11.2f} {r['peak_rss_gib_per_rank']:>12.2f} {r.get('rss_vs_ep1', 0):>6.2f} "
            f"{r['decode_tok_s']:>8.1f} {r.get('decode_vs_ep1', 0):>6.2f} {100 * r['dispatch_share']:>10.1f} {100 * r['split_share']:>7.1f} "
            f"{r['dispatch_ms_per_round']:>8.2f} {r['rows_sent_per_token']:>8.1f}"
        )
