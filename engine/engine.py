"""`Engine`: one model replica that takes requests and advances them one step at a time."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from pdserve.engine.block_pool import KVCacheEvent
from pdserve.engine.config import ModelConfig
from pdserve.engine.context_cache import ContextCache, KVLayout, PendingFetch, model_identity
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.expert_parallel.dispatch import ExpertDispatcher
from pdserve.engine.expert_parallel.placement import ExpertPlacement
from pdserve.engine.expert_parallel.rank import (
    ROUTED_EXPERT_TENSORS,
    ExpertParallelRank,
    join_group,
    keep_rank_slices,
)
from pdserve.engine.guided_grammar import GuidedDecodingError
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.kv_handoff import KVHandoff, KVPayload
from pdserve.engine.layers.linear import CpuGemm, default_cpu_gemm_backend
from pdserve.engine.loader import (
    check_checkpoint,
    init_dummy_weights,
    load_checkpoint,
    mtp_layers_in_checkpoint,
)
from pdserve.engine.model_runner import KVCache, ModelRunner
from pdserve.engine.model_source import ModelSource, resolve_model
from pdserve.engine.models.ernie45 import Ernie45ForCausalLM, HeldExpertsOf
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.quantization.apply import (
    check_groups,
    layer_formats,
    prepare_quantized,
    quantize_model,
    resolve_quantization,
)
from pdserve.engine.quantization.config import QuantizationConfig
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampler import Sampler, SamplingRow
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Emitted, ScheduledBatch, Scheduler
from pdserve.engine.served_model import ServedModel
from pdserve.engine.spec_decode import Proposer, SpeculativeConfig
from pdserve.engine.spec_decode.draft_model import DraftModel, DraftModelProposer
from pdserve.engine.spec_decode.mtp import MTPProposer
from pdserve.engine.spec_decode.ngram import NgramProposer
from pdserve.engine.spec_decode.verifier import VerifyGroup, verify
from pdserve.engine.stats import EngineCounters, EngineStats
from pdserve.engine.structured_output import GrammarCompiler, GuidedRows, PendingMasks, advance
from pdserve.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PromptInput = str | Sequence[int] | dict[str, Any]
# Positions an MTP catch-up pass may cover (it runs as one short attention span).
MAX_PENDING_MTP_ROWS = 16
# How long a step with nothing to run waits for a grammar being compiled or a prefix's lookup in
# Redis (the worker's loop runs its commands between steps, so this bounds how late an abort or a
# new request is seen).
PENDING_WAIT_S = 0.005


class Engine:
    """Loads a model and serves requests with continuous batching over a paged, prefix-cached KV pool.

    Not thread-safe: one caller drives `add_request` / `step` / `abort`.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_cache_event: Callable[[KVCacheEvent], None] | None = None,
        on_phase: Callable[[str], None] | None = None,
        expert_parallel_rank: ExpertParallelRank | None = None,
    ) -> None:
        """`on_phase` hears what the constructor is doing ("loading weights 3/57", "allocating
        KV cache (64 MiB)"), from the thread that builds the engine, for a start-up progress line.
        `expert_parallel_rank`: this engine is one rank of an expert-parallel group (it holds its
        share of the routed experts; `ExpertParallelGroup` builds one per rank)."""
        self.config = config
        self.ep_rank = expert_parallel_rank
        self.dispatcher: ExpertDispatcher | None = None
        self._on_phase = on_phase or (lambda phase: None)
        self.on_cache_event = on_cache_event
        self.gemm = _cpu_gemm(config)
        self.device = torch.device(config.device)
        source = resolve_model(config.model)
        self.source = source
        self.model_config = self._model_config(source)
        self.dtype = config.torch_dtype(self.model_config.torch_dtype)
        self.quantization, self.prequantized = resolve_quantization(config.quantization, source)
        self.model = self._build_model(source)
        self.tokenizer = (
            load_tokenizer(config.tokenizer or source.path)
            if (config.tokenizer or source.has_tokenizer)
            else None
        )

        mc = self.model_config
        self.spec: SpeculativeConfig | None = config.speculative_config  # type: ignore[assignment]
        if self.spec is not None and self.spec.method == "mtp" and not self.model.has_mtp:
            raise ValueError(
                f"speculative_config.method 'mtp' needs the checkpoint's MTP layer (model.mtp_* tensors), "
                f"and {source.name!r} has none; use method 'draft' or 'ngram'"
            )
        # With MTP, its layer's KV is one more layer of the pool, moved and cached with the rest.
        mtp_layer = self.model.num_kv_layers if self.spec is not None and self.spec.method == "mtp" else None
        num_kv_layers = self.model.num_kv_layers + (mtp_layer is not None)
        block_bytes = KVCache.bytes_per_block(
            num_kv_layers, config.block_size, mc.num_key_value_heads, mc.head_dim, self.dtype
        )
        num_blocks = config.kv_pool_blocks(block_bytes, mc.max_position_embeddings)
        self._on_phase(f"allocating KV cache ({num_blocks * block_bytes / 2**20:.0f} MiB)")
        self.kv_cache = KVCache(
            num_kv_layers,
            num_blocks,
            config.block_size,
            mc.num_key_value_heads,
            mc.head_dim,
            self.dtype,
            self.device,
        )
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings, num_blocks * config.block_size
        )
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.context_cache = self._build_context_cache(num_kv_layers)
        self.served_model = self._served_model(num_blocks)
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, mtp_layer, self.gemm.parallel)
        self.sampler = Sampler(mc.eos_token_ids, seed=config.seed)
        self.proposer: Proposer | None = self._build_proposer()
        self.counters = EngineCounters()
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=mc.eos_token_ids,
            counters=self.counters,
            on_finish=self.proposer.forget if self.proposer is not None else None,
        )
        self.kv_handoff = KVHandoff(
            self.scheduler,
            self.kv,
            self.kv_cache,
            self.max_model_len,
            mc.hidden_size,
            self._new_request,
            self._publish_events,
        )
        self._arrivals = itertools.count()
        # Guided decoding needs token strings; a model without a tokenizer refuses it.
        self.grammars = (
            GrammarCompiler(self.tokenizer, mc.vocab_size, list(mc.eos_token_ids))
            if self.tokenizer is not None
            else None
        )
        # Guided requests whose grammar is being compiled: they join the scheduler when it is done.
        self._compiling: dict[str, tuple[Request, concurrent.futures.Future]] = {}
        # New requests whose prefix is being looked up in Redis (with their grammar's future, if
        # guided): they go on (to `_compiling` or the scheduler) when the lookup is done.
        self._fetching: dict[str, tuple[Request, PendingFetch, concurrent.futures.Future | None]] = {}

    # ------------------------------------------------------------------ building

    def _served_model(self, num_blocks: int) -> ServedModel:
        """What this engine serves and its limits, for the layers above (computed once, here)."""
        spec, config = self.spec, self.config
        return ServedModel(
            name=self.source.name,
            tokenizer_path=str(config.tokenizer or self.source.path) if self.tokenizer is not None else None,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            block_size=config.block_size,
            num_kv_blocks=num_blocks,
            dtype=str(self.dtype).removeprefix("torch."),
            speculative_method=spec.method if spec is not None else None,
            num_speculative_tokens=spec.num_speculative_tokens if spec is not None else 0,
            context_cache_namespace=self.context_cache.ns if self.context_cache is not None else None,
            context_cache_url=config.context_cache.redis_url,  # type: ignore[union-attr]
            quantization=self.quantization.method if self.quantization is not None else None,
        )

    def _build_context_cache(self, num_kv_layers: int) -> ContextCache | None:
        cc = self.config.context_cache
        if not cc.enabled:  # type: ignore[union-attr]
            return None
        mc, src = self.model_config, self.source
        layout = KVLayout(
            num_kv_layers, self.config.block_size, mc.num_key_value_heads, mc.head_dim, str(self.dtype)
        )
        fmt = self.config.load_format
        if fmt == "auto":
            fmt = "safetensors" if src.has_weights else "dummy"
        identity = model_identity(src.name, src.path, fmt, self.config.seed, self.config.hf_overrides, layout)
        return ContextCache(cc, identity, self.kv, self.kv_cache)  # type: ignore[arg-type]

    def _model_config(self, source: ModelSource) -> ModelConfig:
        return model_config_of(source, self.config.hf_overrides)

    def _build_model(self, source: ModelSource) -> Ernie45ForCausalLM:
        fmt = self.config.load_format
        if fmt == "auto":
            fmt = "safetensors" if source.has_weights else "dummy_required"
        if fmt == "dummy_required":
            raise ValueError(
                f"model {source.name!r} has no weights (*.safetensors); pass load_format='dummy' "
                "(--load-format dummy on the command line) to run it with random weights"
            )
        if fmt == "safetensors" and not source.has_weights:
            raise ValueError(f"load_format='safetensors' but {source.name!r} has no *.safetensors files")
        # Build without allocating or initialising (the weights are overwritten right away).
        ep = self.ep_rank
        if ep is not None and not self.model_config.is_moe:
            raise ValueError(f"expert_parallel needs an MoE model; {source.name!r} is dense")
        if ep is not None and ep.config.size > self.model_config.moe_num_experts:
            raise ValueError(
                f"expert_parallel.size ({ep.config.size}) exceeds the model's "
                f"{self.model_config.moe_num_experts} routed experts; use a smaller group"
            )
        if (
            ep is not None
            and self.quantization is not None
            and (self.prequantized or ep.config.num_redundant_experts or ep.config.rebalance_interval_s)
        ):
            # Spare copies move full-precision expert rows between ranks; a prequantized
            # checkpoint's packed head cannot be cut into vocabulary slices.
            raise ValueError(
                "expert_parallel with quantization takes neither num_redundant_experts, "
                "rebalance_interval_s nor a prequantized checkpoint yet; drop those, or quantize "
                "at load from the full-precision checkpoint"
            )
        held = ep.held_experts(self.model_config.moe_num_experts) if ep else None
        model = build_model_shell(self.model_config, self.dtype, self.quantization, self.prequantized, held)
        _materialize(model, self.device)
        if fmt == "dummy":
            init_dummy_weights(model, seed=self.config.seed, dtype=self.dtype)
        else:
            assert source.path is not None
            load_checkpoint(
                model,
                source.path,
                dtype=self.dtype,
                progress=self.config.progress,
                allow_ignored=(ROUTED_EXPERT_TENSORS,) if ep is not None else (),
                on_tensor=lambda done, total: self._on_phase(f"loading weights {done}/{total}"),
            )
        formats = None
        if ep is not None and self.quantization is not None:
            # The whole model's formats (wint2's hybrid plan weighs every layer): each rank then
            # quantizes its share exactly as one engine alone would.
            whole = build_model_shell(self.model_config, self.dtype, None, False)
            formats = layer_formats(whole, self.quantization)
        if ep is not None:  # before quantizing and packing: only the rank's slices are converted
            keep_rank_slices(model, ep)
        if self.quantization is not None and not self.prequantized:
            quantize_model(
                model,
                self.quantization,
                self.gemm.parallel,
                lambda done, total: self._on_phase(f"quantizing weights {done}/{total}"),
                formats,
            )
        model.pack_for_cpu(self.gemm)
        if ep is not None:
            self._on_phase(f"joining expert-parallel group as rank {ep.rank}/{ep.config.size}")
            backend = ep.config.resolved_backend(self.config.on_gpu)
            self.dispatcher = join_group(model, ep, backend, self.config.device)
        return model.eval()

    def _build_proposer(self) -> Proposer | None:
        spec = self.spec
        if spec is None:
            return None
        if spec.method == "ngram":
            return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        if spec.method == "mtp":
            return MTPProposer(self.runner, self.kv)
        assert spec.model is not None
        draft = Engine(
            replace(
                self.config,
                model=spec.model,
                load_format="auto",
                hf_overrides={},
                tokenizer=None,
                speculative_config=None,
                context_cache=None,  # the draft's KV is its own business
                quantization=None,  # the draft is small: it stays in full precision
                # One draft block per target block always suffices: the draft's sequences are the
                # target's plus at most k guesses (a request without room just is not guessed for).
                kv_cache_blocks=self.kv.num_blocks + self.config.max_num_seqs,
                max_model_len=None,
            )
        )
        draft_vocab, vocab = draft.model_config.vocab_size, self.model_config.vocab_size
        same_tokens = draft_vocab == vocab
        if same_tokens and draft.tokenizer is not None and self.tokenizer is not None:
            same_tokens = draft.tokenizer.get_vocab() == self.tokenizer.get_vocab()
        if not same_tokens:
            raise ValueError(
                f"speculative_config.model {spec.model!r} does not share the target's tokenizer "
                f"(vocab_size {draft_vocab} vs {vocab}, or different token strings); a draft model "
                "must use the same vocabulary"
            )
        return DraftModelProposer(DraftModel(draft.runner, draft.kv, draft.max_model_len))

    # ------------------------------------------------------------------ requests

    def tokenize(self, prompt: PromptInput) -> list[int]:
        """Token ids of a prompt given as text, token ids or {"prompt_token_ids": [...]}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt_token_ids' (or 'prompt')")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    f"model {self.source.name!r} has no tokenizer files, so text prompts cannot be "
                    "encoded; pass token ids instead, or tokenizer=<directory>"
                )
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        *,
        prefill_only: bool = False,
    ) -> None:
        """Queues a request. Raises InvalidRequestError (a ValueError; changing nothing) when it cannot be served."""
        params = params or SamplingParams()
        if (
            request_id in self.scheduler.requests
            or request_id in self._fetching
            or request_id in self._compiling
        ):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.n != 1:
            raise InvalidRequestError(
                "Engine requests take n=1; LLM.generate expands n>1 into several requests"
            )
        ids = self.tokenize(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens but the context window (max_model_len) is "
                f"{self.max_model_len}: shorten it or raise max_model_len / kv_cache_blocks"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer; this model has none (use stop_token_ids)"
            )
        request = self._new_request(request_id, ids, params, prefill_only=prefill_only)
        # Checked (and started) first: a bad grammar is refused before anything is looked up.
        grammar = self.compile_grammar(params) if params.guided_decoding is not None else None
        fetch = self.context_cache.begin_fetch(request) if self.context_cache is not None else None
        if fetch is not None:
            self._fetching[request_id] = (request, fetch, grammar)
        else:
            self._enqueue(request, grammar)

    def _enqueue(self, request: Request, grammar: concurrent.futures.Future | None) -> None:
        """Hands a request to the scheduler, or to `_compiling` while its grammar compiles."""
        if grammar is None:
            self.scheduler.add(request)
        elif grammar.done() and grammar.exception() is None:
            self._schedule_guided(request, grammar.result())
        else:
            self._compiling[request.request_id] = (request, grammar)

    def _schedule_guided(self, request: Request, matcher) -> None:
        """Queues a guided request with its matcher, advanced past output its prompt carries."""
        guided = request.params.guided_decoding
        assert guided is not None
        if guided.num_output_in_prompt:
            advance(matcher, request.prompt_token_ids[-guided.num_output_in_prompt :])
        request.matcher = matcher
        self.scheduler.add(request)

    def compile_grammar(self, params: SamplingParams) -> concurrent.futures.Future:
        """A future of the matcher for `params.guided_decoding`, compiled off the step loop
        (thread-safe: a worker calls it before importing a guided request's KV).

        Raises InvalidRequestError at once when the grammar is invalid or cannot be used here.
        """
        assert params.guided_decoding is not None
        if self.grammars is None:
            raise InvalidRequestError(
                f"guided decoding needs the model's tokenizer; {self.source.name!r} has none"
            )
        try:
            return self.grammars.compile(params.guided_decoding)
        except GuidedDecodingError as e:
            raise InvalidRequestError(f"guided_decoding ({params.guided_decoding.kind}): {e}") from e

    def _new_request(
        self, request_id: str, ids: list[int], params: SamplingParams, *, prefill_only: bool = False
    ) -> Request:
        room = self.max_model_len - len(ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        detok = (
            IncrementalDetokenizer(self.tokenizer, ids, params)
            if self.tokenizer is not None and params.detokenize
            else None
        )
        return Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            max_tokens=min(params.max_tokens or room, room),
            arrival=next(self._arrivals),
            generator=generator,
            detokenizer=detok,
            prefill_only=prefill_only,
        )

    def abort(self, request_id: str) -> bool:
        """Stops a request at once and frees its blocks; False if it is unknown or already done."""
        if self.kv_handoff.cancel_reservation(request_id):
            return True
        if self._compiling.pop(request_id, None) is not None:
            return True
        # Its lookup may still be running: it holds no blocks (they are taken when it is done).
        if self._fetching.pop(request_id, None) is not None:
            return True
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        self._publish_events()
        return True

    def unstarted_request_ids(self) -> list[str]:
        """Waiting requests not one token of which has been computed (they can go elsewhere whole)."""
        unstarted = [r.request_id for r in self.scheduler.waiting if not r.scheduled_once]
        return unstarted + list(self._compiling) + list(self._fetching)

    def request_ids(self) -> list[str]:
        """Every request this engine holds (its prefix looked up in Redis, its grammar compiling,
        waiting, running or parked after prefill)."""
        return list(self._fetching) + list(self._compiling) + list(self.scheduler.requests)

    def has_reservation(self, request_id: str) -> bool:
        """Whether blocks are reserved here for the request's incoming KV."""
        return self.kv_handoff.has_reservation(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._compiling or self._fetching)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestDelta]:
        """Runs one forward pass over the scheduled batch; returns what each request produced."""
        started = time.perf_counter()
        self._admit_fetched()
        failed = self._admit_compiled()
        speculating = self._speculation_on()
        if speculating:
            self._propose()
        batch = self.scheduler.schedule()
        if not batch:
            if (self._compiling or self._fetching) and not failed:
                # Nothing else to run: wait a moment for a grammar or a lookup rather than spin.
                pending = [f for _, f in self._compiling.values()]
                pending += [fetch.future for _, fetch, _ in self._fetching.values()]
                concurrent.futures.wait(pending, PENDING_WAIT_S, concurrent.futures.FIRST_COMPLETED)
            return failed
        num_logits = [
            1 + len(req.spec_token_ids) if req.num_computed_tokens + n == req.num_scheduled_tokens else 0
            for req, n in zip(batch.requests, batch.num_tokens)
        ]
        # The MTP layer's cache is fed in the pass that computes prompts (a decode worker inherits
        # it); decoded positions are fed by the MTP proposer's first pass instead. A batch too big
        # to speculate skips it, except for prompts prefilled for another worker.
        run_mtp = any(not r.output_token_ids and (speculating or r.prefill_only) for r in batch.requests)
        masks = self._start_masks(batch.requests, num_logits)  # filled while the pass runs
        try:
            out = self.runner.execute(batch, num_logits, run_mtp=run_mtp)
        except BaseException:
            if masks is not None:
                masks.wait()  # the mask thread lets go of the matchers before anything else uses them
            raise
        emitted = self._sample(batch.requests, num_logits, out.logits, masks)
        if self.runner.mtp_layer is not None:
            self._keep_mtp_hidden(batch, num_logits, emitted, out.hidden, fed=run_mtp or not speculating)
        deltas = failed + self.scheduler.postprocess(batch, num_logits, emitted)
        self.counters.num_steps += 1
        self.counters.last_step_seconds = time.perf_counter() - started
        self.counters.step_seconds_total += self.counters.last_step_seconds
        self._publish_events()
        return deltas

    def _admit_fetched(self) -> None:
        """Moves requests whose Redis lookup is done (or has run past `timeout_s`) on, with what
        it found loaded into the pool; the others keep waiting while the batch steps."""
        cache = self.context_cache
        if cache is None:
            return
        for request_id, (req, fetch, grammar) in list(self._fetching.items()):
            if fetch.done or cache.expired(fetch):
                del self._fetching[request_id]
                cache.finish_fetch(req, fetch)
                self._enqueue(req, grammar)

    def _admit_compiled(self) -> list[RequestDelta]:
        """Moves requests whose grammar is compiled into the scheduler; ends those whose grammar
        failed to compile (after passing its check: not expected) as aborted, with the reason logged."""
        failed = []
        for request_id, (req, pending) in list(self._compiling.items()):
            if not pending.done():
                continue
            del self._compiling[request_id]
            if pending.exception() is None:
                self._schedule_guided(req, pending.result())
                continue
            logger.error("request %s: its grammar failed to compile: %s", request_id, pending.exception())
            req.status, req.finish_reason = RequestStatus.FINISHED, "abort"
            failed.append(
                RequestDelta(request_id, [], "", None, True, "abort", None, req.num_prompt_tokens, 0)
            )
        return failed

    def _keep_mtp_hidden(
        self,
        batch: ScheduledBatch,
        num_logits: list[int],
        emitted: dict[str, Emitted],
        hidden: torch.Tensor,
        fed: bool,
    ) -> None:
        """Keeps the pre-norm hidden states of the positions whose MTP cache entry is not written.

        A sampling request's rows of `hidden` start with its accepted positions, which end where
        its KV does once the step is applied. The last one always waits for its next token (just
        sampled); with `fed`, the others need nothing more (the pass wrote them, or speculation is
        off and they are given up: a shorter context for the MTP layer later means worse
        guesses, never different output).
        """
        row = 0
        for req, m in zip(batch.requests, num_logits):
            if m == 0:
                continue
            rows = hidden[row : row + len(emitted[req.request_id][0])]
            row += m
            if fed:
                req.mtp_hidden = rows[-1:].clone()
                continue
            pending = rows if req.mtp_hidden is None else torch.cat([req.mtp_hidden, rows])
            # Bounded: a request not guessed for (near max_tokens, no room for guesses) keeps adding
            # rows; positions dropped here only leave the MTP layer a shorter context.
            req.mtp_hidden = pending[-MAX_PENDING_MTP_ROWS:].clone()

    def _speculation_on(self) -> bool:
        """Whether this step guesses: a proposer exists and the batch is not too big for it."""
        if self.proposer is None or self.spec is None:
            return False
        limit = self.spec.disable_by_batch_size
        if limit is None:
            return True
        # The batch this step may grow to: waiting requests join it (up to max_num_seqs), so a
        # burst of prompts bigger than the limit does not feed the MTP layer for nothing.
        sched = self.scheduler
        return min(sched.num_running + sched.num_waiting, sched.max_num_seqs) <= limit

    def _propose(self) -> None:
        """Lets the proposer guess for the requests that are decoding."""
        assert self.proposer is not None and self.spec is not None
        requests: list[Request] = []
        ks: list[int] = []
        for req in self.scheduler.running:
            if req.prefill_only or not req.output_token_ids or req.num_computed_tokens != req.num_tokens - 1:
                continue
            # Never guess past max_tokens or the context window: those tokens could not be emitted.
            k = min(
                self.spec.num_speculative_tokens,
                req.max_tokens - len(req.output_token_ids) - 1,
                self.max_model_len - req.num_tokens,
            )
            if k > 0:
                requests.append(req)
                ks.append(k)
        if requests:
            self.proposer.propose(requests, ks)
            self.counters.spec_proposed_tokens += sum(len(r.spec_token_ids) for r in requests)
            started = time.perf_counter()
            guided = [r for r in requests if r.matcher is not None and r.spec_token_ids]
            for req in guided:
                assert self.grammars is not None and req.matcher is not None
                # Guesses the grammar refuses would be rejected anyway: not worth verifying.
                self.grammars.trim_guesses(req.matcher, req.spec_token_ids)
            if guided:
                self.counters.guided_seconds_total += time.perf_counter() - started

    @torch.inference_mode()  # the logits are inference tensors, which sampling overwrites in place
    def _sample(
        self, requests: list[Request], num_logits: list[int], logits: torch.Tensor, masks: PendingMasks | None
    ) -> dict[str, Emitted]:
        """The tokens (and logprobs) each sampling request emits, by request id.

        `logits` holds `num_logits[i]` rows for request i: one to sample from, or k + 1 to verify
        its k guesses with; `masks`: the guided requests' token masks (`_start_masks`).
        """
        sampling = [(req, m) for req, m in zip(requests, num_logits) if m]
        if not sampling:
            return {}
        if masks is not None:
            assert self.grammars is not None
            started = time.perf_counter()
            self.grammars.mask_logits(logits, masks)
            self.counters.guided_seconds_total += time.perf_counter() - started
        emitted = self._sample_rows(sampling, logits)
        guided = [req for req, _ in sampling if req.matcher is not None]
        if guided:
            started = time.perf_counter()
            for req in guided:
                assert req.matcher is not None
                advance(req.matcher, emitted[req.request_id][0])
                self.counters.guided_tokens_total += len(emitted[req.request_id][0])
            self.counters.guided_seconds_total += time.perf_counter() - started
        return emitted

    def _sample_rows(self, sampling: list[tuple[Request, int]], logits: torch.Tensor) -> dict[str, Emitted]:
        """`_sample` for the requests that sample (guided ones masked): plain rows, or guesses to verify."""
        if all(m == 1 for _, m in sampling):
            rows = [
                SamplingRow(r.params, r.generator, r.prompt_token_ids, r.output_token_ids)
                for r, _ in sampling
            ]
            sampled = self.sampler(logits, rows, scratch=True)
            return {
                req.request_id: ([token], [lp])
                for (req, _), token, lp in zip(sampling, sampled.token_ids, sampled.logprobs)
            }
        groups = [
            VerifyGroup(
                [
                    SamplingRow(
                        req.params,
                        req.generator,
                        req.prompt_token_ids,
                        req.output_token_ids + req.spec_token_ids[:j],
                    )
                    for j in range(m)
                ],
                list(req.spec_token_ids),
            )
            for req, m in sampling
        ]
        verified = verify(self.sampler, logits, groups, scratch=True)
        return {req.request_id: (v.token_ids, v.logprobs) for (req, _), v in zip(sampling, verified)}

    def _start_masks(self, requests: list[Request], num_logits: list[int]) -> PendingMasks | None:
        """Begins filling the token masks of the step's guided rows (None: no guided request
        samples), which `_sample` applies; the forward pass runs meanwhile. Rows are numbered as
        in the logits: only requests that sample have rows."""
        rows, first = [], 0
        for req, m in zip(requests, num_logits):
            if m and req.matcher is not None:
                rows.append(GuidedRows(first, req.matcher, req.spec_token_ids[: m - 1]))
            first += m
        if not rows:
            return None
        assert self.grammars is not None
        started = time.perf_counter()
        masks = self.grammars.start_masks(rows)
        self.counters.guided_seconds_total += time.perf_counter() - started
        return masks

    def _publish_events(self) -> None:
        events = self.kv.pool.drain_events()
        if events and self.context_cache is not None:
            self.context_cache.on_events(events)
        if events and self.on_cache_event is not None:
            self.on_cache_event(events)

    # ------------------------------------------------------------------ disaggregation hooks

    # These delegate to `kv_handoff` (see `pdserve.engine.kv_handoff`); roles/ calls them here.

    def export_kv(self, request_id: str) -> KVPayload:
        """The KV blocks and state of a prefilled (prefill_only) request, as a plain payload."""
        return self.kv_handoff.export_kv(request_id)

    def release_exported(self, request_id: str) -> None:
        """Frees a prefilled request's blocks once its KV has been handed over (or given up on)."""
        self.kv_handoff.release_exported(request_id)

    def reserve_kv(self, request_id: str, num_tokens: int) -> bool:
        """Sets aside blocks for `num_tokens` tokens of incoming KV; False when there is no room."""
        return self.kv_handoff.reserve_kv(request_id, num_tokens)

    def cancel_reservation(self, request_id: str) -> bool:
        """Returns a reservation's blocks to the pool; False if there was none."""
        return self.kv_handoff.cancel_reservation(request_id)

    @property
    def kv_block_shape(self) -> tuple[int, ...]:
        """Shape of one block's KV across layers, as `KVPayload.kv` holds it minus the block axis."""
        return self.kv_handoff.kv_block_shape

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV pool's dtype, which a received `KVPayload.kv` must have."""
        return self.kv_cache.tensor.dtype

    def import_kv(self, payload: KVPayload) -> None:
        """Continues decoding a request prefilled elsewhere, in the blocks `reserve_kv` set aside.

        A guided request's grammar state is rebuilt from its output so far (compiled here unless
        `compile_grammar` was awaited first).
        """
        matcher = None
        if payload.params.guided_decoding is not None:
            matcher = self.compile_grammar(payload.params).result()
            advance(matcher, payload.output_token_ids)
        if self.context_cache is not None:
            self.context_cache.mark_known(payload.block_hashes)  # the sender wrote them if it had to
        self.kv_handoff.import_kv(payload)
        if matcher is not None:
            self.scheduler.requests[payload.request_id].matcher = matcher

    # ------------------------------------------------------------------ introspection

    def stats(self) -> EngineStats:
        waiting_prefill = sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.waiting)
        waiting_prefill += sum(
            r.num_tokens - r.num_computed_tokens for r in self.scheduler.running if not r.output_token_ids
        )
        # Requests whose prefix lookup is in flight wait too (placement weighs them like the others).
        waiting_prefill += sum(r.num_tokens for r, _, _ in self._fetching.values())
        return EngineStats(
            num_waiting=self.scheduler.num_waiting + len(self._fetching),
            num_running=self.scheduler.num_running,
            num_prefilled=sum(r.status is RequestStatus.PREFILLED for r in self.scheduler.requests.values()),
            kv_blocks_total=self.kv.num_blocks,
            kv_blocks_free=self.kv.num_free_blocks,
            kv_blocks_cached=self.kv.pool.num_cached,
            kv_blocks_reserved=self.kv_handoff.num_reserved_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            waiting_prefill_tokens=waiting_prefill,
            num_compiling_grammar=len(self._compiling),
            num_fetching_context=len(self._fetching),
            grammar_cache_size=self.grammars.cache_size if self.grammars is not None else 0,
            context_cache=self.context_cache.stats() if self.context_cache is not None else None,
            **asdict(self.counters),
        )

    def cached_block_hashes(self) -> list[int]:
        """Hashes of every block in this engine's prefix cache (for rebuilding a router index)."""
        return self.kv.pool.cached_hashes()


def model_config_of(source: ModelSource, hf_overrides: dict[str, Any]) -> ModelConfig:
    """The model's config: config.json with the overrides, MTP layers as the checkpoint has them."""
    mc = ModelConfig.from_hf_dict(source.hf_config, hf_overrides)
    if source.path is not None and source.has_weights:
        n_mtp = mtp_layers_in_checkpoint(source.path)
        if n_mtp != mc.num_nextn_predict_layers:
            # The checkpoint's tensors, not a config field, decide whether an MTP head exists.
            mc = replace(mc, num_nextn_predict_layers=n_mtp)
    return mc


def check_model(config: EngineConfig) -> None:
    """What can be checked of `config`'s model before any engine starts, without loading weights:
    the model resolves, its config reads, the quantization fits every layer, the checkpoint's
    tensor names, shapes and dtypes (from the file headers) are the ones the model needs, and an
    expert-parallel group's size fits the model's routed experts.
    Raises ValueError (or its `CheckpointError`) naming the field or tensor."""
    source = resolve_model(config.model)
    model_config = model_config_of(source, config.hf_overrides)
    quantization, prequantized = resolve_quantization(config.quantization, source)  # type: ignore[arg-type]
    model = build_model_shell(
        model_config, config.torch_dtype(model_config.torch_dtype), quantization, prequantized
    )
    if config.load_format != "dummy" and source.has_weights:
        assert source.path is not None
        check_checkpoint(model, source.path)
    ep = config.expert_parallel
    if ep.size > 1:  # ValueError naming expert_parallel.size or .num_redundant_experts
        if not model.moe_layers():
            raise ValueError(
                f"expert_parallel.size is {ep.size} but {source.name!r} has no routed experts (not a MoE "
                "model); set expert_parallel.size to 1"
            )
        ExpertPlacement.initial([], model_config.moe_num_experts, ep.size, ep.num_redundant_experts)


def _cpu_gemm(config: EngineConfig) -> CpuGemm:
    """Sets torch's threads and returns the CPU matmul backend the config asks for."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    backend = default_cpu_gemm_backend() if config.cpu_gemm == "auto" else config.cpu_gemm
    # OpenBLAS matmuls are single-threaded calls split over CpuGemm's own threads.
    threadpool_limits(1, user_api="blas")
    if backend == "openblas" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        logger.warning(
            "OMP_WAIT_POLICY is not PASSIVE: torch's spinning OpenMP threads will slow the "
            "OpenBLAS matmuls (up to 2x); import pdserve before torch, or set OMP_WAIT_POLICY=PASSIVE"
        )
    return CpuGemm(config.num_threads or torch.get_num_threads(), backend)


def build_model_shell(
    config: ModelConfig,
    dtype: torch.dtype,
    quantization: QuantizationConfig | None,
    prequantized: bool,
    held_experts: HeldExpertsOf = None,
) -> Ernie45ForCausalLM:
    """The model on the meta device (no storage yet), with packed storage for a quantized
    checkpoint and, for an expert-parallel rank, only its `held_experts`; ValueError names a
    layer the quantization's group size does not divide."""
    with torch.device("meta"):
        model = Ernie45ForCausalLM(config, dtype, held_experts)
    if quantization is not None:
        check_groups(model, quantization)
        if prequantized:
            prepare_quantized(model, quantization)
    return model


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give a meta-device model real, uninitialised storage on `device`.

    `Module.to_empty` calls `empty_like` on meta tensors, whose Python decomposition imports
    torch._refs and sympy: 0.5 s and ~50 MB per worker, for storage the loader overwrites.
    """
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(empty, requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
