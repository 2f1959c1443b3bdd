"""Speculative decoding on Ray workers: disaggregated and colocated runs equal plain decoding."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.roles.chunk_feed import ChunkFeeds
from pdserve.roles.handoff import ChannelGenerations, WorkerRef, generate_colocated, generate_disaggregated
from pdserve.roles.worker import start_worker

MTP = {"method": "mtp", "num_speculative_tokens": 2}
PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\ndef read_config(path):\n    with open(path) as f:\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True),
]


def config(spec: dict | None) -> EngineConfig:
    return EngineConfig(
        model="demo", block_size=8, kv_cache_blocks=64, num_threads=1, progress=False, speculative_config=spec
    )


async def start(worker_id: str, spec: dict | None, role: str) -> WorkerRef:
    handle = start_worker(worker_id, config(spec), role)
    return WorkerRef(worker_id, handle, await handle.ready.remote())


@pytest.fixture(scope="module")
def spec_workers(ray_session):
    """A prefill and a decode worker speculating with MTP, and a `both` worker with n-gram lookup."""

    async def run():
        return await asyncio.gather(
            start("spec-prefill", MTP, "prefill"),
            start("spec-decode", MTP, "decode"),
            start("spec-both", {"method": "ngram", "num_speculative_tokens": 3}, "both"),
        )

    prefill, decode, both = asyncio.run(run())
    yield prefill, decode, both
    for ref in (prefill, decode, both):
        ray_session.kill(ref.handle)


@pytest.fixture(scope="module")
def reference() -> tuple[list[list[int]], dict[int, list[list[int]]]]:
    """The prompts' token ids, and plain decoding's outputs for each of PARAMS (by index)."""
    llm = LLM("demo", block_size=8, num_threads=1, progress=False)
    ids = [llm.engine.tokenize(p) for p in PROMPTS]
    return ids, {i: [o.outputs[0].token_ids for o in llm.generate(ids, p)] for i, p in enumerate(PARAMS)}


@pytest.mark.parametrize("which", range(len(PARAMS)), ids=["greedy", "seeded"])
def test_disaggregated_mtp_and_colocated_ngram_equal_plain_decoding(
    ray_session, spec_workers, reference, which
):
    prefill, decode, both = spec_workers
    prompts, want = reference
    params = PARAMS[which]
    channels, feeds = ChannelGenerations(), ChunkFeeds()

    async def pd(i: int, prompt: list[int]) -> list[int]:
        stream = generate_disaggregated(prefill, decode, f"pd-{which}-{i}", prompt, params, channels, feeds)
        return [t async for chunk in stream for t in chunk.token_ids]

    async def colocated(i: int, prompt: list[int]) -> list[int]:
        stream = generate_colocated(both, f"both-{which}-{i}", prompt, params, channels, feeds)
        return [t async for chunk in stream for t in chunk.token_ids]

    async def run():
        pd_out = await asyncio.gather(*(pd(i, p) for i, p in enumerate(prompts)))
        both_out = await asyncio.gather(*(colocated(i, p) for i, p in enumerate(prompts)))
        return pd_out, both_out

    pd_out, both_out = asyncio.run(run())
    assert pd_out == want[which]
    assert both_out == want[which]
    for ref in spec_workers:
        load = ray_session.get(ref.handle.load.remote())
        assert load.kv_blocks_free == load.kv_blocks_total and load.num_running == 0
    decode_load = ray_session.get(decode.handle.load.remote())
    assert decode_load.spec_mean_accepted_length > 1.0
    text = ray_session.get(decode.handle.metrics_text.remote())
    accepted = [ln for ln in text.splitlines() if ln.startswith("pdserve_spec_decode_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) > 0
