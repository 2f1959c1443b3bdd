"""Reference computations with transformers, shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import torch

from pdserve.engine.engine import Engine
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch

NEAR_TIE = 1e-4


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of a full forward pass."""
    return model(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def engine_logits(engine: Engine, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits for every position of `ids`, computed by the engine's model in the given chunks.

    Exercises all attention paths: a first chunk (plain causal), later chunks (attending to
    cached context through the block table) and single tokens (the batched decode path).
    """
    assert sum(chunks) == len(ids)
    req = Request("logits-probe", list(ids), SamplingParams(), max_tokens=1, arrival=-1)
    out = []
    try:
        for n in chunks:
            assert engine.kv.allocate(req, req.num_computed_tokens + n)
            batch = ScheduledBatch([req], [n])
            inputs = engine.runner.prepare(batch, [n])
            hidden = engine.model(inputs.input_ids, inputs.positions, engine.runner._layers, inputs.meta)
            out.append(engine.model.compute_logits(hidden))
            req.num_computed_tokens += n
    finally:
        engine.kv.free(req)
    return torch.cat(out)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_same_greedy(model, prompt: list[int], expected: list[int], got: list[int]) -> None:
    """Greedy outputs must be equal, except after a near-tie in the reference's logits.

    Two implementations summing in different orders may pick different argmaxes only when the
    top two logits are within float noise; the check recomputes that step and prints it.
    """
    i = first_divergence(expected, got)
    if i is None:
        return
    logits = hf_logits(model, prompt + expected[:i])[-1]
    top2 = torch.topk(logits, 2).values
    gap = (top2[0] - top2[1]).item()
    print(
        f"greedy outputs diverge at token {i}: expected {expected[i : i + 3]}, got {got[i : i + 3]}, top-2 gap {gap:.2e}"
    )
    assert gap <= NEAR_TIE, f"outputs diverge at token {i} without a near-tie (top-2 gap {gap:.3e})"
