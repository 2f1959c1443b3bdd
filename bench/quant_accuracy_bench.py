"""`pdserve bench quant-accuracy`: what weight-only quantization costs in accuracy, against fp32.

Data: the demo model's held-out files, split and tokenized exactly as `training/train_demo_models.py`
does (its own functions, loaded from the checkout: the split is the training script's to own),
packed into windows of its sequence length. For each scheme it reports:

- loss: mean next-token cross-entropy (nats/token) over `windows` held-out windows, and its
  difference from fp32's;
- agreement: the fp32 engine continues `prompts` held-out prefixes greedily by `new_tokens`
  tokens; the quantized engine reads prefix + continuation (teacher forcing) and the agreement
  is the fraction of continuation positions where its argmax is fp32's token (no cascade: one
  early difference does not count for the rest);
- bits per weight of the quantized layers (packed bytes, fp16 scales and offsets included);
- per-layer relative output error ||x Wq^T - x W^T|| / ||x W^T|| on the 21B-A3B shape's matrices
  (N(0, 0.02) weights, as `load_format="dummy"` draws them, and N(0, 1) inputs);
- the same loss and agreement for torchao's int8 and int4 weight-only schemes on the same
  weights (through transformers), where torchao is installed.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pdserve.bench.report_file import write_report
from pdserve.engine.quantization.apply import quantized_bytes
from pdserve.engine.quantization.config import QuantizationConfig

TRAINING_SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_demo_models.py"
SEQ_LEN = 512  # the training script's default --seq-len


@dataclass
class QuantAccuracyArgs:
    model: str = "demo"
    schemes: tuple[str, ...] = (
        "wint8",
        "wint4",
        '{"method": "wint4", "group_size": 128}',
        "wint2",
        '{"method": "wint2", "code": "ccq"}',
        '{"method": "wint2", "code": "plain"}',
        '{"method": "wint2", "code": "ccq", "lm_head": false}',
        '{"method": "wint2", "code": "ccq", "group_size": 128}',
    )
    windows: int = 8
    prompts: int = 16
    prompt_len: int = 64
    new_tokens: int = 64
    peers: bool = True
    layer_shape_model: str = "ernie-4.5-21b-a3b"


def _training_module():
    if not TRAINING_SCRIPT.is_file():
        raise RuntimeError(f"{TRAINING_SCRIPT} is missing: this benchmark runs from a pdserve checkout")
    spec = importlib.util.spec_from_file_location("train_demo_models", TRAINING_SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # its dataclasses look themselves up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def held_out_windows(tokenizer, count: int) -> torch.Tensor:
    """[count, SEQ_LEN + 1] held-out token windows, as the training script builds them (seed 0)."""
    t = _training_module()
    _, held = t.split_files(t.stdlib_files(), 0)
    docs, _ = t.encode_docs(tokenizer, held, 1)
    windows = t.pack(docs, SEQ_LEN, 0)
    if len(windows) < count:
        raise ValueError(f"only {len(windows)} held-out windows, asked for {count}")
    return windows[:count]


def prompt_logits(engine, ids: list[int]) -> torch.Tensor:
    """fp32 logits [len(ids), V] of every position of `ids`, by one prefill of the engine."""
    from pdserve.engine import SamplingParams

    request_id = f"accuracy-{id(ids)}"
    engine.add_request(request_id, ids, SamplingParams(max_tokens=1))
    try:
        batch = engine.scheduler.schedule()
        assert batch.num_tokens == [len(ids)], "the prompt must be computed in one step"
        return engine.runner.execute(batch, [len(ids)], run_mtp=False).logits
    finally:
        engine.abort(request_id)


def _scores(logits_of, windows: torch.Tensor, cases: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """Loss over `windows` and teacher-forced agreement over (prompt, continuation) `cases`."""
    per_window = []
    for w in windows:
        logits = logits_of(w[:-1].tolist())
        per_window.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
    same = total = 0
    for prompt, cont in cases:
        logits = logits_of(prompt + cont[:-1])
        guess = logits[len(prompt) - 1 :].argmax(-1)
        same += int((guess == torch.tensor(cont)).sum())
        total += len(cont)
    # Windows are equally long: the mean of their means is the mean per token. Each window's loss
    # is kept so two schemes' difference can be judged against its spread (paired by window).
    return {"loss": sum(per_window) / len(per_window), "agreement": same / total, "window_losses": per_window}


def _paired_se(scores: dict[str, Any], base: dict[str, Any]) -> float:
    """Standard error of a Δloss, from its per-window differences (0 with one window)."""
    d = torch.tensor(scores["window_losses"]) - torch.tensor(base["window_losses"])
    return float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0


def _llm(model: str, quantization: Any):
    from pdserve.engine import LLM

    return LLM(model, progress=False, enable_prefix_caching=False, max_num_batched_tokens=2048,
               quantization=quantization)  # fmt: skip


def _cases(llm, windows: torch.Tensor, args: QuantAccuracyArgs) -> list[tuple[list[int], list[int]]]:
    """Held-out prefixes (from windows after the loss windows) and fp32's greedy continuations."""
    from pdserve.engine import SamplingParams

    prompts = [w[: args.prompt_len].tolist() for w in windows]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    return [(p, o.outputs[0].token_ids) for p, o in zip(prompts, llm.generate(prompts, params))]


def _peer_rows(args: QuantAccuracyArgs, windows, cases, fp32_loss: float) -> list[dict[str, Any]]:
    """torchao's int8 / int4 weight-only schemes on the same weights, through transformers."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return [{"scheme": "torchao", "error": f"not installed ({e})"}]
    from pdserve.engine.model_source import resolve_model

    path = resolve_model(args.model).path
    rows = []
    for name, config in (
        ("torchao int8 weight-only (per channel)", Int8WeightOnlyConfig()),
        ("torchao int4 weight-only (group 64)", IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))),
    ):  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        quantize_(model, config)

        def logits_of(ids: list[int], model=model) -> torch.Tensor:
            with torch.inference_mode():
                return model(torch.tensor([ids])).logits[0].float()

        scores = _scores(logits_of, windows, cases)
        rows.append({"scheme": name, **scores, "delta_loss": scores["loss"] - fp32_loss})
    return rows


def layer_errors(model: str, schemes: list[QuantizationConfig]) -> list[dict[str, Any]]:
    """Relative output error of each distinct matrix shape of `model` (one layer of each kind)."""
    from pdserve.engine.config import ModelConfig
    from pdserve.engine.model_source import resolve_model
    from pdserve.engine.models.ernie45 import Ernie45ForCausalLM
    from pdserve.engine.quantization.apply import layer_formats
    from pdserve.engine.quantization.formats import quantize

    c = ModelConfig.from_hf_dict(resolve_model(model).hf_config)
    h, d = c.hidden_size, c.head_dim
    shapes = {
        "q_proj": (c.num_attention_heads * d, h),
        "o_proj": (h, c.num_attention_heads * d),
        "dense gate/up": (c.intermediate_size, h),
        "dense down": (h, c.intermediate_size),
        "expert gate/up": (c.moe_intermediate_size, h),
        "expert down": (h, c.moe_intermediate_size),
    }
    # Which layer of the whole model each row stands for (its format, for wint2's hybrid plan).
    suffixes = {"q_proj": ".0.self_attn.q_proj", "o_proj": ".0.self_attn.o_proj", "dense gate/up":
                "layers.0.mlp.gate_proj", "dense down": "layers.0.mlp.down_proj", "expert gate/up":
                ".experts.0.gate_proj", "expert down": ".experts.0.down_proj"}  # fmt: skip
    with torch.device("meta"):
        whole = Ernie45ForCausalLM(c, torch.float32)
    plans = [layer_formats(whole, q) for q in schemes]
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(8, k, generator=g)
        ref = x @ w.t()
        row: dict[str, Any] = {"layer": name, "shape": [n, k]}
        for q, plan in zip(schemes, plans):
            f = next(f for layer, f in plan.items() if layer.endswith(suffixes[name]))
            wq = quantize(w, f.fmt, f.group).dequantize()
            row[_label(q)] = round(float((x @ wq.t() - ref).norm() / ref.norm()), 5)
        rows.append(row)
    return rows


def _label(q: QuantizationConfig) -> str:
    label = f"{q.method}-g{q.group}"
    if q.method == "wint2":
        label += f"-{q.code}"
    return label + ("" if q.lm_head else "-fp32head")


def run_quant_accuracy_bench(args: QuantAccuracyArgs, output: Path | None = None) -> dict[str, Any]:
    """Runs every scheme, prints the tables, writes JSON; returns the JSON document."""
    schemes = [QuantizationConfig.from_value(s) for s in args.schemes]
    fp32 = _llm(args.model, None)
    all_windows = held_out_windows(fp32.tokenizer, args.windows + args.prompts)
    windows, prompt_windows = all_windows[: args.windows], all_windows[args.windows :]
    cases = _cases(fp32, prompt_windows, args)
    base = _scores(lambda ids, llm=fp32: prompt_logits(llm.engine, ids), windows, cases)
    del fp32
    rows = [{"scheme": "fp32", **base, "delta_loss": 0.0, "bits_per_weight": 32.0}]
    for q in schemes:
        llm = _llm(args.model, q)
        scores = _scores(lambda ids, llm=llm: prompt_logits(llm.engine, ids), windows, cases)
        packed, full = quantized_bytes(llm.engine.model)
        rows.append({"scheme": _label(q), **scores, "delta_loss": scores["loss"] - base["loss"],
                     "delta_loss_se": _paired_se(scores, base), "bits_per_weight": 32 * packed / full})  # fmt: skip
        del llm
    peers = _peer_rows(args, windows, cases, base["loss"]) if args.peers else []
    layers = layer_errors(args.layer_shape_model, [q for q in schemes if q.lm_head])  # type: ignore[union-attr]
    doc = {
        "benchmark": "quant-accuracy",
        "args": asdict(args),
        "data": f"{args.windows} held-out windows of {SEQ_LEN} tokens; {args.prompts} prefixes of "
        f"{args.prompt_len} tokens with {args.new_tokens}-token fp32 greedy continuations",
        "results": rows,
        "peers": peers,
        "layer_errors": layers,
    }
    _print(doc)
    write_report(doc, output)
    return doc


def _print(doc: dict[str, Any]) -> None:
    print(f"\n{doc['data']}")
    print(f"{'scheme':>42} {'bits/w':>7} {'loss':>8} {'Δloss':>8} {'± se':>7} {'agreement':>10}")
    for r in doc["results"] + [p for p in doc["peers"] if "loss" in p]:
        bits = f"{r['bits_per_weight']:>7.3f}" if "bits_per_weight" in r else f"{'':>7}"
        se = f"{r['delta_loss_se']:>7.4f}" if "delta_loss_se" in r else f"{'':>7}"
        print(
            f"{r['scheme']:>42} {bits} {r['loss']:>8.4f} {r['delta_loss']:>+8.4f} {se} {r['agreement']:>10.3f}"
        )
    for p in doc["peers"]:
        if "error" in p:
            print(f"{p['scheme']}: {p['error']}")
    layers = doc["layer_errors"]
    if layers:
        keys = [k for k in layers[0] if k not in ("layer", "shape")]
        print("\nrelative output error per layer (21B-A3B shapes)")
        print(f"{'layer':>16} {'shape':>14} " + " ".join(f"{k:>14}" for k in keys))
        for r in layers:
            shape = "x".join(map(str, r["shape"]))
            print(f"{r['layer']:>16} {shape:>14} " + " ".join(f"{r[k]:>14.4f}" for k in keys))
    assert all(math.isfinite(r["loss"]) for r in doc["results"])
