"""`pdserve bench engine`: pdserve's engine beside transformers' `generate` on the same weights,
or, with speculative configs, pdserve with each kind of speculation beside pdserve without.

Each side runs in its own subprocess, so peak RSS is its own and neither warms the other's
caches. All greedy-decode exactly `output_len` tokens for `batch` prompts of `input_len`
tokens, with the same torch thread count. Prompts are random token ids (`workload="random"`),
or, for `workload="code"`, the openings of Python files from this interpreter's standard
library: real text, which is what speculation's acceptance depends on (the bundled demo
model was trained on that library, so it is in-distribution code completion).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import queue as queue_module
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from pdserve.bench.report_file import write_report
from pdserve.engine.kernels import moe_cpu, paged_attention_cpu

T = TypeVar("T")


@dataclass
class EngineBenchArgs:
    model: str
    load_format: str = "auto"
    hf_overrides: dict[str, Any] | None = None
    dtype: str = "float32"
    batches: tuple[int, ...] = (1, 8, 32)
    input_len: int = 128
    output_len: int = 128
    threads: int | None = None
    seed: int = 0
    skip_transformers: bool = False
    # Each config runs beside the same workload without speculation (transformers is skipped).
    speculative_configs: tuple[dict[str, Any], ...] = ()
    workload: str = "random"  # "random" token ids, or "code" (needs the model's tokenizer)
    repeats: int = 3  # rounds per batch size, each with new prompts, the systems taking turns
    # Weight-only schemes run beside full precision (transformers is skipped); each is quantized
    # once into a checkpoint that every round loads.
    quantizations: tuple[str, ...] = ()


@dataclass
class BenchRow:
    system: str
    batch: int
    seconds: float
    output_tokens: int
    tokens_per_s: float
    peak_rss_mb: float
    weight_mb: float = 0.0  # every weight the engine holds (see apply.model_weight_bytes)
    acceptance_rate: float | None = None  # speculative runs only
    mean_accepted_length: float | None = None
    # Raw speculation counts behind the two rates, for pooling rounds.
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    verifications: int = 0
    # Guided runs only: (cold, cached) milliseconds to compile a typical JSON schema.
    compile_ms: tuple[float, float] | None = None
    guided_seconds: float = 0.0  # the engine's own time on grammars (masks, matchers)


def _prompts(vocab: int, batch: int, input_len: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the first ids, which are special tokens in ERNIE's vocabulary.
    return torch.randint(10, vocab, (batch, input_len), generator=g).tolist()


def _code_prompts(tokenizer, batch: int, input_len: int, seed: int) -> list[list[int]]:
    """The first `input_len` tokens of `batch` standard-library files long enough to have them."""
    import random
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    random.Random(seed).shuffle(files)
    prompts = []
    for path in files:
        # The opening is all that is used; a whole file can exceed the model's context.
        text = path.read_text(errors="replace")[: 16 * input_len]
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= input_len:
            prompts.append(list(ids[:input_len]))
        if len(prompts) == batch:
            return prompts
    raise RuntimeError(f"not enough standard-library files with {input_len} tokens for batch {batch}")


def _workload(args: EngineBenchArgs, llm, batch: int, input_len: int) -> list[list[int]]:
    if args.workload == "code":
        if llm.tokenizer is None:
            raise ValueError("--workload code needs a model with a tokenizer")
        return _code_prompts(llm.tokenizer, batch, input_len, args.seed)
    return _prompts(llm.engine.model_config.vocab_size, batch, input_len, args.seed)


def _peak_rss_mb(status: Path = Path("/proc/self/status")) -> float:
    """This process's peak resident memory in MB.

    Linux's `ru_maxrss` survives `exec`, so a spawned benchmark process would report the parent's
    peak (the checkpoint export's, for a large model) whenever that is higher; `VmHWM` belongs to
    the process's own address space. `ru_maxrss` only where /proc is missing.
    """
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _llm(args: EngineBenchArgs, spec: dict[str, Any] | None, checkpoint: str | None = None):
    """The engine under test: `args.model`, or a quantized `checkpoint` written from it."""
    from pdserve.engine import LLM

    return LLM(
        checkpoint or args.model,
        dtype=args.dtype,
        load_format="auto" if checkpoint else args.load_format,
        hf_overrides={} if checkpoint else args.hf_overrides or {},
        seed=args.seed,
        progress=False,
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=max(2048, args.input_len),
        # Each batch is measured once: a prefix hit on the warm-up would flatter the next batch.
        enable_prefix_caching=False,
        speculative_config=spec,
    )


def _greedy(args: EngineBenchArgs):
    from pdserve.engine import SamplingParams

    # Token ids only, as transformers' `generate` returns them: both sides do the same work.
    return SamplingParams(
        temperature=0,
        max_tokens=args.output_len,
        min_tokens=args.output_len,
        ignore_eos=True,
        detokenize=False,
    )


def spec_name(spec: dict[str, Any]) -> str:
    """A short label that tells configs apart, e.g. `ngram-k4-min3` or `draft-k3-demo-draft`."""
    short = {"prompt_lookup_min": "min", "prompt_lookup_max": "max", "disable_by_batch_size": "upto"}
    parts = [spec["method"], f"k{spec['num_speculative_tokens']}"]
    parts += [f"{short[key]}{spec[key]}" for key in short if key in spec]
    if "model" in spec:
        parts.append(Path(str(spec["model"])).name)
    return "-".join(parts)


def _run_pdserve(
    args: EngineBenchArgs,
    spec: dict[str, Any] | None,
    round_: int,
    queue: mp.Queue,
    quantized: tuple[str, str] | None = None,
) -> None:
    """pdserve (speculating with `spec` unless None; with `quantized` = (scheme, checkpoint),
    that quantized checkpoint), one round: every batch size once."""
    from pdserve.engine import SamplingParams
    from pdserve.engine.quantization.apply import model_weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = _llm(args, spec, quantized[1] if quantized else None)
    weight_mb = model_weight_bytes(llm.engine.model) / 2**20
    name = "pdserve" if spec is None else f"pdserve+{spec_name(spec)}"
    if quantized is not None:
        name = f"pdserve+{quantized[0]}"
    params = _greedy(args)
    llm.generate(_workload(args, llm, 1, 8), SamplingParams(temperature=0, max_tokens=4))  # warm-up
    for batch in args.batches:
        # Each round has its own prompts, the same for every system.
        prompts = _workload(args, llm, batch * (round_ + 1), args.input_len)[batch * round_ :]
        before = llm.engine.stats()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        row = BenchRow(name, batch, seconds, n, n / seconds, _peak_rss_mb(), weight_mb)
        if spec is not None:
            after = llm.engine.stats()
            row.proposed = after.spec_proposed_tokens - before.spec_proposed_tokens
            row.accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
            row.emitted = after.spec_emitted_tokens - before.spec_emitted_tokens
            row.verifications = after.spec_verifications - before.spec_verifications
            _set_rates(row)
        queue.put(row)
    queue.put(None)


def _run_quantized(
    args: EngineBenchArgs, quantized: tuple[str, str] | None, round_: int, queue: mp.Queue
) -> None:
    """`_run_pdserve` of full precision (None) or of a quantized (scheme, checkpoint)."""
    _run_pdserve(args, None, round_, queue, quantized)


def _set_rates(row: BenchRow) -> None:
    row.acceptance_rate = row.accepted / row.proposed if row.proposed else 0.0
    row.mean_accepted_length = row.emitted / row.verifications if row.verifications else 0.0


def _merge_rounds(rows: list[BenchRow]) -> list[BenchRow]:
    """One row per (system, batch): time and tokens summed over rounds, speculation rates pooled."""
    merged: dict[tuple[str, int], BenchRow] = {}
    for r in rows:
        m = merged.get((r.system, r.batch))
        if m is None:
            merged[(r.system, r.batch)] = m = BenchRow(r.system, r.batch, 0.0, 0, 0.0, 0.0)
            if r.acceptance_rate is not None:
                m.acceptance_rate = m.mean_accepted_length = 0.0
        m.seconds += r.seconds
        m.output_tokens += r.output_tokens
        m.peak_rss_mb = max(m.peak_rss_mb, r.peak_rss_mb)
        m.weight_mb = r.weight_mb
        m.proposed += r.proposed
        m.accepted += r.accepted
        m.emitted += r.emitted
        m.verifications += r.verifications
        m.guided_seconds += r.guided_seconds
    for m in merged.values():
        m.tokens_per_s = m.output_tokens / m.seconds
        if m.acceptance_rate is not None:
            _set_rates(m)
    return list(merged.values())


def _export_for_transformers(args: EngineBenchArgs) -> str:
    """A checkpoint directory transformers can load holding exactly the weights pdserve runs."""
    from pdserve.engine import LLM

    llm = LLM(
        args.model,
        dtype="float32",
        load_format=args.load_format,
        hf_overrides=args.hf_overrides or {},
        seed=args.seed,
        progress=False,
        kv_cache_blocks=1,
    )
    out = tempfile.mkdtemp(prefix="pdserve-bench-")
    config = dict(llm.engine.source.hf_config)
    config.update(args.hf_overrides or {})
    Path(out, "config.json").write_text(json.dumps(config))
    _save_sharded(llm.engine.model.state_dict(), Path(out))
    return out


_SHARD_BYTES = 1 << 30  # see loader.SHARD_BYTES


def _save_sharded(state: dict[str, torch.Tensor], out: Path) -> None:
    """`save_sharded` with this module's shard size (tests shrink it)."""
    from pdserve.engine.loader import save_sharded

    save_sharded(state, out, _SHARD_BYTES)


@contextlib.contextmanager
def _removed_after(directory: str | None) -> Iterator[None]:
    """Deletes `directory` (the exported checkpoint, a model's worth of disk) when the block ends."""
    try:
        yield
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def _run_transformers(args: EngineBenchArgs, checkpoint: str, round_: int, queue: mp.Queue) -> None:
    """transformers' `generate`, one round: every batch size once, on that round's prompts."""
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    vocab = model.config.vocab_size
    with torch.inference_mode():
        model.generate(torch.tensor(_prompts(vocab, 1, 8, args.seed)), max_new_tokens=4, do_sample=False)
        for batch in args.batches:
            ids = torch.tensor(
                _prompts(vocab, batch * (round_ + 1), args.input_len, args.seed)[batch * round_ :]
            )
            start = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.output_len,
                min_new_tokens=args.output_len,
                do_sample=False,
                pad_token_id=0,
                # The published ERNIE 4.5 configs say use_cache=false, which makes generate recompute
                # the whole sequence every step; the fair baseline keeps its KV cache.
                use_cache=True,
            )
            seconds = time.perf_counter() - start
            n = (out.shape[1] - ids.shape[1]) * batch
            queue.put(BenchRow("transformers", batch, seconds, n, n / seconds, _peak_rss_mb()))
    queue.put(None)


def _collect(target, args: tuple, bar: tqdm) -> list[BenchRow]:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    rows = []
    while True:
        try:
            row = queue.get(timeout=1.0)
        except queue_module.Empty:
            if proc.is_alive():
                continue
            # It died without its end marker (an exception, or killed): waiting longer would hang.
            raise RuntimeError(
                f"benchmark subprocess {target.__name__} died (exit {proc.exitcode}); its error is above"
            ) from None
        if row is None:
            break
        rows.append(row)
        bar.update(1)
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"benchmark subprocess {target.__name__} failed (exit {proc.exitcode})")
    return rows


def _in_turn(systems: list[T], round_: int) -> list[T]:
    """The systems in the order they run in round `round_`: reversed every other round, so none
    always runs first (or last)."""
    return systems if round_ % 2 == 0 else systems[::-1]


def run_engine_bench(args: EngineBenchArgs, output: Path | None = None) -> dict[str, Any]:
    """Runs both systems, prints a table with ratios, writes JSON; returns the JSON document."""
    if args.speculative_configs:
        return _run_speculative_bench(args, output)
    if args.quantizations:
        return _run_quantized_bench(args, output)
    sides = 1 if args.skip_transformers else 2
    checkpoint = None if args.skip_transformers else _export_for_transformers(args)
    rounds: list[BenchRow] = []
    with (
        tqdm(total=args.repeats * sides * len(args.batches), desc="bench engine") as bar,
        _removed_after(checkpoint),
    ):
        # Fresh processes per round, alternating which system goes first, and pooled: see
        # `_run_speculative_bench` for how much this machine drifts.
        for round_ in range(args.repeats):
            systems = [(_run_pdserve, (args, None, round_))]
            if checkpoint is not None:
                systems.append((_run_transformers, (args, checkpoint, round_)))
            for target, target_args in _in_turn(systems, round_):
                rounds += _collect(target, target_args, bar)
    rows = _merge_rounds(rounds)
    table = []
    for batch in args.batches:
        ours = next(r for r in rows if r.system == "pdserve" and r.batch == batch)
        theirs = next((r for r in rows if r.system == "transformers" and r.batch == batch), None)
        table.append(
            {
                "batch": batch,
                "pdserve_tok_s": round(ours.tokens_per_s, 2),
                "transformers_tok_s": round(theirs.tokens_per_s, 2) if theirs else None,
                "ratio": round(ours.tokens_per_s / theirs.tokens_per_s, 3) if theirs else None,
                "pdserve_peak_rss_mb": round(ours.peak_rss_mb, 1),
                "transformers_peak_rss_mb": round(theirs.peak_rss_mb, 1) if theirs else None,
            }
        )
    doc = _document("engine", args, table, rows)
    print(
        f"\nmodel={args.model} load_format={args.load_format} overrides={args.hf_overrides} "
        f"input_len={args.input_len} output_len={args.output_len} dtype={args.dtype}"
    )
    print(
        f"{'batch':>5} {'pdserve tok/s':>14} {'transformers tok/s':>19} {'ratio':>6} {'RSS MB (pd/hf)':>16}"
    )
    for r in table:
        hf = f"{r['transformers_tok_s']:.1f}" if r["transformers_tok_s"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        rss = f"{r['pdserve_peak_rss_mb']:.0f}/{r['transformers_peak_rss_mb'] or 0:.0f}"
        print(f"{r['batch']:>5} {r['pdserve_tok_s']:>14.1f} {hf:>19} {ratio:>6} {rss:>16}")
    write_report(doc, output)
    return doc


def _document(kind: str, args: EngineBenchArgs, table: list[dict], rows: list[BenchRow]) -> dict[str, Any]:
    """The JSON a run writes: its arguments, the summary table and every measured row."""
    return {
        "benchmark": kind,
        "args": asdict(args),
        "torch_threads": args.threads or torch.get_num_threads(),
        # Whether pdserve's C kernels ran (they are optional at install; without them it is slower).
        "native_kernels": {
            "moe_cpu": moe_cpu.available(),
            "paged_attention_cpu": paged_attention_cpu.available(),
        },
        "results": table,
        "rows": [asdict(r) for r in rows],
    }


def _run_speculative_bench(args: EngineBenchArgs, output: Path | None) -> dict[str, Any]:
    """pdserve without speculation, then with each config, on the same prompts; ratios per batch."""
    # Every system in a fresh process per round, the systems taking turns: on a shared machine,
    # speed drifts by tens of percent from minute to minute and differs from process to process
    # (the same model loaded twice in one process ran 15% apart), so each ratio pools rounds.
    configs: list[dict[str, Any] | None] = [None, *args.speculative_configs]
    rounds: list[BenchRow] = []
    with tqdm(
        total=args.repeats * len(configs) * len(args.batches), desc="bench engine (speculative)"
    ) as bar:
        for round_ in range(args.repeats):
            for spec in _in_turn(configs, round_):
                rounds += _collect(_run_pdserve, (args, spec, round_), bar)
    rows = _merge_rounds(rounds)
    table = []
    for batch in args.batches:
        plain = next(r for r in rows if r.system == "pdserve" and r.batch == batch)
        for r in rows:
            if r.batch != batch or r.system == "pdserve":
                continue
            table.append(
                {
                    "batch": batch,
                    "system": r.system,
                    "tok_s": round(r.tokens_per_s, 2),
                    "plain_tok_s": round(plain.tokens_per_s, 2),
                    "speedup": round(r.tokens_per_s / plain.tokens_per_s, 3),
                    "acceptance_rate": round(r.acceptance_rate or 0.0, 3),
                    "mean_accepted_length": round(r.mean_accepted_length or 0.0, 3),
                }
            )
    doc = _document("engine-speculative", args, table, rows)
    print(
        f"\nmodel={args.model} workload={args.workload} input_len={args.input_len} "
        f"output_len={args.output_len} dtype={args.dtype}"
    )
    print(
        f"{'batch':>5} {'system':>28} {'tok/s':>8} {'plain tok/s':>12} {'speedup':>8} {'accept':>7} {'mean len':>9}"
    )
    for r in table:
        print(
            f"{r['batch']:>5} {r['system']:>28} {r['tok_s']:>8.1f} {r['plain_tok_s']:>12.1f} "
            f"{r['speedup']:>8.2f} {r['acceptance_rate']:>7.2f} {r['mean_accepted_length']:>9.2f}"
        )
    write_report(doc, output)
    return doc


def _write_quantized(args: EngineBenchArgs, scheme: str, out: str, queue: mp.Queue) -> None:
    """`pdserve quantize` of the benchmark's model, in its own process (its memory is freed after)."""
    from pdserve.engine import LLM
    from pdserve.engine.quantization.checkpoint import write_quantized_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(
        args.model,
        dtype="float32",
        load_format=args.load_format,
        hf_overrides=args.hf_overrides or {},
        seed=args.seed,
        progress=False,
        kv_cache_blocks=1,
        quantization=scheme,
    )
    queue.put(write_quantized_checkpoint(llm.engine, Path(out)))
    queue.put(None)


def _run_quantized_bench(args: EngineBenchArgs, output: Path | None) -> dict[str, Any]:
    """Full precision beside each weight-only scheme, on the same prompts; ratios per batch."""
    root = tempfile.mkdtemp(prefix="pdserve-bench-quant-")
    rounds: list[BenchRow] = []
    sizes: dict[str, dict[str, int]] = {}
    with _removed_after(root):
        with tqdm(total=len(args.quantizations), desc="quantizing") as bar:
            checkpoints = {}
            for scheme in args.quantizations:
                checkpoints[scheme] = str(Path(root, scheme))
                sizes[scheme] = _collect(_write_quantized, (args, scheme, checkpoints[scheme]), bar)[0]
        systems: list[tuple[str, str] | None] = [None, *checkpoints.items()]
        with tqdm(
            total=args.repeats * len(systems) * len(args.batches), desc="bench engine (quantized)"
        ) as bar:
            # Fresh processes, alternating order, pooled rounds: see `_run_speculative_bench`.
            for round_ in range(args.repeats):
                for quantized in _in_turn(systems, round_):
                    rounds += _collect(_run_quantized, (args, quantized, round_), bar)
    rows = _merge_rounds(rounds)
    table = _quantized_table(args, rows, sizes)
    doc = _document("engine-quantized", args, table, rows)
    print(
        f"\nmodel={args.model} load_format={args.load_format} overrides={args.hf_overrides} "
        f"input_len={args.input_len} output_len={args.output_len}"
    )
    print(
        f"{'batch':>5} {'system':>15} {'tok/s':>8} {'fp32 tok/s':>11} {'speedup':>8} {'peak RSS MB':>12} "
        f"{'weights MB':>11} {'x fp32':>7} {'layers x fp32':>14}"
    )
    for r in table:
        print(
            f"{r['batch']:>5} {r['system']:>15} {r['tok_s']:>8.1f} {r['fp32_tok_s']:>11.1f} "
            f"{r['speedup']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['weight_mb']:>11.0f} "
            f"{r['weight_ratio']:>7.3f} {r['quantized_layers_ratio'] or 1.0:>14.3f}"
        )
    write_report(doc, output)
    return doc


def _quantized_table(
    args: EngineBenchArgs, rows: list[BenchRow], sizes: dict[str, dict[str, int]]
) -> list[dict[str, Any]]:
    table = []
    for batch in args.batches:
        plain = next(r for r in rows if r.system == "pdserve" and r.batch == batch)
        for r in (r for r in rows if r.batch == batch):
            scheme = r.system.removeprefix("pdserve+") if r.system != "pdserve" else None
            layers = sizes.get(scheme or "", {})
            table.append(
                {
                    "batch": batch,
                    "system": r.system if scheme else "pdserve (fp32)",
                    "tok_s": round(r.tokens_per_s, 2),
                    "fp32_tok_s": round(plain.tokens_per_s, 2),
                    "speedup": round(r.tokens_per_s / plain.tokens_per_s, 3),
                    "peak_rss_mb": round(r.peak_rss_mb, 1),
                    "weight_mb": round(r.weight_mb, 1),
                    "weight_ratio": round(r.weight_mb / plain.weight_mb, 4),
                    # Packed bytes of the quantized layers over the same layers in fp32.
                    "quantized_layers_ratio": round(layers["packed_bytes"] / layers["fp32_bytes"], 4)
                    if layers
                    else None,
                }
            )
    return table
