"""`LLM`: the offline API, shaped like vLLM's so users' scripts carry over."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from pdserve.engine.engine import Engine, PromptInput
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.expert_parallel.group import ExpertParallelGroup
from pdserve.engine.outputs import CompletionOutput, Logprob, RequestDelta, RequestOutput, TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams


class LLM:
    """Generates completions for a list of prompts with one engine.

    `LLM(model="demo", dtype="float32", seed=0, **engine_args)`; see `EngineConfig` for the
    engine arguments (load_format, hf_overrides, block_size, max_num_seqs, ...), e.g.
    `context_cache={"redis_url": "redis://127.0.0.1:6379"}` to share prefixes' KV through Redis.
    """

    def __init__(self, model: str, **engine_args: Any) -> None:
        on_cache_event = engine_args.pop("on_cache_event", None)
        config = EngineConfig(model=model, **engine_args)
        if config.expert_parallel.size > 1:
            # One replica on N rank processes, each holding its share of the routed experts.
            self.engine: Engine | ExpertParallelGroup = ExpertParallelGroup(config)
        else:
            self.engine = Engine(config, on_cache_event=on_cache_event)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops an expert-parallel group's rank processes (one engine has nothing to stop)."""
        if isinstance(self.engine, ExpertParallelGroup):
            self.engine.close()

    def metrics_text(self) -> str:
        """Prometheus text of an expert-parallel group (tokens per expert and per rank per MoE
        layer, dispatch/combine seconds, rebalances, imbalance); "" for one engine, which has none."""
        if isinstance(self.engine, ExpertParallelGroup):
            return self.engine.metrics_text()
        return ""

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries but there are {len(prompts)} prompts"
                )

        # Validate everything before queueing anything, so a bad prompt leaves the engine clean.
        token_ids = [self.engine.tokenize(p) for p in prompts]
        collectors: list[_Collector] = []
        added: list[str] = []
        try:
            for prompt, ids, params in zip(prompts, token_ids, params_list):
                request_id = str(next(self._ids))
                collector = _Collector(request_id, prompt if isinstance(prompt, str) else None, ids, params)
                for i in range(params.n):
                    # Child i of an n>1 request gets seed+i, as in vLLM, so the n samples differ.
                    child = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                    child_id = f"{request_id}-{i}"
                    self.engine.add_request(child_id, ids, child)
                    added.append(child_id)
                    collector.children[child_id] = i
                collectors.append(collector)
        except Exception:
            for child_id in added:
                self.engine.abort(child_id)
            raise

        by_child = {cid: c for c in collectors for cid in c.children}
        total = sum(p.n for p in params_list)
        bar = tqdm(total=total, desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                collector = by_child[delta.request_id]
                collector.add(delta)
                if delta.finished:
                    bar.update(1)
        bar.close()
        return [c.result(self.engine.tokenizer) for c in collectors]


class _Collector:
    """Accumulates the deltas of one prompt's n child requests into a `RequestOutput`."""

    def __init__(self, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = ids
        self.params = params
        self.children: dict[str, int] = {}
        self.tokens: dict[int, list[int]] = {}
        self.text: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[TokenLogprobs]] = {}
        self.finish: dict[int, tuple[str | None, str | int | None]] = {}
        self.num_cached_tokens = 0
        self.num_context_cached_tokens = 0

    def add(self, delta: RequestDelta) -> None:
        i = self.children[delta.request_id]
        self.tokens.setdefault(i, []).extend(delta.new_token_ids)
        self.text.setdefault(i, []).append(delta.new_text)
        if delta.new_logprobs:
            self.logprobs.setdefault(i, []).extend(delta.new_logprobs)
        if i == 0:
            self.num_cached_tokens = delta.num_cached_tokens
            self.num_context_cached_tokens = delta.num_context_cached_tokens
        if delta.finished:
            self.finish[i] = (delta.finish_reason, delta.stop_reason)

    def result(self, tokenizer) -> RequestOutput:
        outputs = []
        for i in range(self.params.n):
            reason, stop_reason = self.finish.get(i, (None, None))
            lps = None
            cumulative = None
            if self.params.logprobs is not None:
                lps = [_vllm_logprobs(tl, tokenizer) for tl in self.logprobs.get(i, [])]
                cumulative = sum(tl.logprob for tl in self.logprobs.get(i, []))
            outputs.append(
                CompletionOutput(
                    index=i,
                    text="".join(self.text.get(i, [])),
                    token_ids=self.tokens.get(i, []),
                    finish_reason=reason,
                    stop_reason=stop_reason,
                    logprobs=lps,
                    cumulative_logprob=cumulative,
                )
            )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=len(self.finish) == self.params.n,
            num_cached_tokens=self.num_cached_tokens,
            num_context_cached_tokens=self.num_context_cached_tokens,
        )


def _vllm_logprobs(tl: TokenLogprobs, tokenizer) -> dict[int, Logprob]:
    def text(t: int) -> str | None:
        return tokenizer.decode([t]) if tokenizer is not None else None

    out = {tid: Logprob(lp, rank + 1, text(tid)) for rank, (tid, lp) in enumerate(tl.top)}
    if tl.token_id not in out:
        out[tl.token_id] = Logprob(tl.logprob, tl.rank, text(tl.token_id))
    return out
