"""Short prompts are rendered and tokenized on the event loop; long ones, and many messages, in the pool."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers import AutoTokenizer

from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.prompt_tokenizer import INLINE_CHARS, PromptTokenizer

DEMO = Path(__file__).resolve().parents[2] / "engine/demo_models/demo"


class CountingPool(ThreadPoolExecutor):
    """A one-thread pool that counts the work handed to it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def tokenizer_with(pool: CountingPool) -> PromptTokenizer:
    config = GatewayConfig(
        router_address="127.0.0.1:1", model_name="demo", tokenizer_path=str(DEMO), max_model_len=2048
    )
    return PromptTokenizer(AutoTokenizer.from_pretrained(DEMO), pool, config, GatewayMetrics())


def test_short_prompts_stay_on_the_loop_and_long_ones_go_to_the_pool():
    pool = CountingPool()
    prompts = tokenizer_with(pool)
    tok = prompts.tokenizer

    async def run():
        short = await prompts.encode("a short question", "prompt")
        assert short == tok("a short question")["input_ids"]
        assert pool.submitted == 0
        text = await prompts.render_chat([{"role": "user", "content": "hello"}], {})
        assert text == tok.apply_chat_template(
            [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
        )
        assert pool.submitted == 0
        long = "word " * (INLINE_CHARS // 5 + 1)
        assert await prompts.encode(long, "prompt") == tok(long)["input_ids"]
        assert pool.submitted == 1
        # Many tiny messages cost the template a loop each: counted, so they go to the pool too.
        await prompts.render_chat([{"role": "user", "content": ""}] * (INLINE_CHARS // 16), {})
        assert pool.submitted == 2

    try:
        asyncio.run(run())
    finally:
        pool.shutdown()
