"""Request text to prompt token ids, off the event loop when long and within the context window's reach.

Tokenizing a 3.9 MB prompt takes seconds, and the gateway's event loop is the router's too under
`pdserve up`: tokenization and chat-template rendering of long prompts run in the gateway's small
thread pool (the loop keeps serving meanwhile), and a prompt with more characters than can fit the
context window (`GatewayConfig.max_prompt_chars`) is refused before either starts. Short ones run
on the loop itself: the hop to the pool and back cost more than the work (see `INLINE_CHARS`).

Only the model's own chat template is rendered: a client's `chat_template_kwargs` fill template
variables, and a key that would replace the template or change the call is refused by name.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from pdserve.gateway.config import GatewayConfig
from pdserve.gateway.errors import APIError
from pdserve.gateway.metrics import GatewayMetrics

T = TypeVar("T")

# Prompts of at most this many characters are rendered and tokenized on the event loop. Encoding
# costs ~0.4 us a character (+60 us; rendering ~50 us), so this blocks the loop < 1 ms, while a
# pool hop under load (c=16 streams, the engine thread and the loop contending for the GIL) took
# 3 ms mean per hop, 8 ms at p90 (docs/DECISIONS.md 2026-12-06, issue 27).
INLINE_CHARS = 2048
# What one message or tool costs the template, counted as characters against `INLINE_CHARS`.
TEMPLATE_CHARS_PER_ITEM = 32

# Names the template call passes to the template itself (transformers' render_jinja_template).
TEMPLATE_OWN_VARIABLES = frozenset({"messages", "conversations"})


def call_arguments(method: Any) -> frozenset[str]:
    """The named parameters of `method` (not its **kwargs, which reach the template as variables)."""
    if method is None:
        return frozenset()
    kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return frozenset(n for n, p in inspect.signature(method).parameters.items() if p.kind not in kinds)


class PromptTokenizer:
    """Tokenizes prompts and renders chat templates in `pool`, after the prompt's length check."""

    def __init__(
        self, tokenizer: Any, pool: Executor, config: GatewayConfig, metrics: GatewayMetrics
    ) -> None:
        self.tokenizer, self.pool, self.config, self.metrics = tokenizer, pool, config, metrics
        # A chat_template_kwargs key with one of these names would set an argument of the call
        # (`chat_template` replaces the template; `tokenize` changes what it returns), not a variable.
        self.reserved = (
            call_arguments(getattr(tokenizer, "apply_chat_template", None)) | TEMPLATE_OWN_VARIABLES
        )

    def check_length(self, chars: int, param: str, what: str | None = None) -> None:
        """400 naming `param` when `chars` characters (of `what`, `param` by default) cannot fit the
        context window."""
        c = self.config
        if chars > c.max_prompt_chars:
            raise APIError(400, f"{what or param} has {chars} characters; at most {c.max_prompt_chars} can fit this model's "
                                f"context window of {c.max_model_len} tokens ({c.max_chars_per_token} characters "
                                "per token at most)", param=param)  # fmt: skip

    async def encode(
        self, text: str, param: str, add_special_tokens: bool = True, what: str | None = None
    ) -> list[int]:
        """`text`'s token ids; `param` (and `what`, when it is not the parameter itself) name it in errors."""
        self.check_length(len(text), param, what)
        return await self._off_loop_if_long(
            len(text), lambda: self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        )

    def check_template_kwargs(self, kwargs: dict[str, Any]) -> None:
        """400 naming the first key that would replace the template or change the call."""
        for key in kwargs:
            param = f"chat_template_kwargs.{key}"
            if key == "chat_template":
                raise APIError(400, f"{param}: client-supplied chat templates are not accepted; prompts are "
                                    "rendered with the model's own template", param=param)  # fmt: skip
            if key in self.reserved:
                raise APIError(400, f"{param}: {key!r} is set by the server, not a template variable; "
                                    "remove it", param=param)  # fmt: skip

    async def render_chat(
        self,
        messages: list[dict[str, Any]],
        kwargs: dict[str, Any],
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text of `messages` through the model's chat template, `kwargs` its variables
        and `tools` the functions the model may call (the template lists them in its own format)."""
        self.check_template_kwargs(kwargs)
        chars = sum(len(m["content"]) for m in messages)
        self.check_length(chars, "messages")

        def render() -> str:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )

        try:
            # The template loops over messages (and tools, whose schemas it writes out): count each.
            size = chars + TEMPLATE_CHARS_PER_ITEM * (len(messages) + len(tools or ()))
            return await self._off_loop_if_long(size, render)
        except Exception as e:  # jinja errors: a message the template cannot render
            raise APIError(
                400, f"messages cannot be rendered by the chat template: {e}", param="messages"
            ) from e

    async def _off_loop_if_long(self, chars: int, work: Callable[[], T]) -> T:
        """`work()`: here when `chars` is at most `INLINE_CHARS`, else in the pool."""
        if chars <= INLINE_CHARS:
            return work()
        with self.metrics.prompts_in_tokenizer.track_inprogress():
            return await asyncio.get_running_loop().run_in_executor(self.pool, work)
