"""`pdserve bench serve`: load on the OpenAI HTTP API, measured as a client sees it.

Streaming chat completions (SSE) at each concurrency level: `concurrency` clients keep one
request each in flight (a closed loop) until `num_prompts` are done. Per level: time to the
first token (TTFT), time per output token after it (TPOT), the gaps between streamed chunks
(ITL), end-to-end latency, request and output-token throughput, and goodput (requests/s that
met every stated SLO). Prints a table, writes JSON and a PNG of the latencies.

Workloads (seeded, so runs are reproducible): `chat`, short varied coding questions;
`shared-prefix`, the same questions behind a long common system prompt (`--num-prefixes` of
them, each request picking one), which the prefix cache (and the router's cache-aware
placement) should turn into shorter prefills; `long-document`, questions about one of
`--num-prefixes` long documents (`--prefix-words` words each, placed in the user turn); and
`json`, the chat questions asked for a JSON answer, run twice against the same gateway: free
("unguided"), then under a JSON schema (`response_format`, "guided json"), side by side. The
schema is a list of objects that cannot be complete within `max_tokens`, so both sides produce
exactly `max_tokens` tokens and the difference is guided decoding's own cost.

Requests are greedy and ignore EOS, so every request produces `max_tokens` tokens and runs
compare like for like. Each level asks its own questions (the same across layouts): a prompt
the prefix cache holds from an earlier level would flatter the later one. One unmeasured
request first pays first-call costs and, in shared-prefix, puts the system prompt in the cache.

`--baseline-url` adds another OpenAI-compatible server (`vllm serve` of the same model, say):
each level runs on both, one after the other, and the table puts them side by side. With
`--model`, each level also runs on the engine alone (`pdserve.engine.LLM`, one thread, as a
worker has; the level's prompts in batches of `concurrency`), and the table says which share of
the engine's tokens/s the served path delivers.

`--compare-context-cache` starts 1 prefill + 1 decode worker twice, with the Redis context
cache off and on (`--context-cache-url`), each with `--kv-cache-blocks` blocks per worker (small
pools evict prefixes between uses), and prints them side by side with the prompt tokens computed.

`--compare-layouts` starts the two layouts itself, one after the other (`pdserve up` with 1
prefill + 1 decode worker, then with 2 colocated `both` workers), runs the same workload on
each and prints them side by side. With `--model` (which `--compare-layouts` needs), it also
measures the gateway + router overhead: TTFT over HTTP for one-token requests minus the TTFT
of the engine alone (`pdserve.engine.LLM` in this process) on the same prompt tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pdserve.bench.quiet_cpu import wait_until_quiet
from pdserve.bench.report_file import write_report

# Words for prompts the demo models never saw (they trained on CPython's standard library): the
# chaos, local-prefill and shifting benches draw their random prompts from them.
PROMPT_WORDS = (
    "amber", "basil", "cedar", "delta", "ember", "fjord", "glade", "heron", "inlet", "jasper", "kelp",
    "larch", "moss", "nickel", "opal", "prairie", "quartz", "reef", "sorrel", "thistle", "umber", "vale",
    "river", "lantern", "orchard", "copper", "meadow", "harbor", "violet", "thunder", "pebble", "summit",
    "canvas", "willow", "granite", "falcon", "marble", "saddle", "crystal", "tundra", "quiver",
    "beacon", "cobalt", "juniper", "mosaic", "nectar", "parchment", "quarry", "ripple", "sapphire", "timber",
    "umbrella", "velvet", "walnut", "yonder", "zephyr", "anchor", "bramble", "cinder", "dapple", "fennel",
)  # fmt: skip

WORKLOADS = (
    "chat",
    "shared-prefix",
    "long-document",
    "json",
    "shifting",
)  # shifting: bench/shifting_bench.py
PREFIX_WORKLOADS = ("shared-prefix", "long-document")
# `pdserve up` flags of the two layouts --compare-layouts runs.
LAYOUTS: dict[str, list[str]] = {
    "1P+1D": ["--prefill", "1", "--decode", "1", "--both", "0"],
    "2 both": ["--prefill", "0", "--decode", "0", "--both", "2"],
}
METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass
class ServeBenchArgs:
    """What to run (the `pdserve bench serve` flags)."""

    url: str = "http://127.0.0.1:8000"
    concurrency: tuple[int, ...] = (1, 4, 16)
    workload: str = "chat"
    num_prompts: int = 64
    max_tokens: int = 64
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    api_key: str | None = None
    seed: int = 0
    prefix_words: int = 300  # shared-prefix: words in the common system prompt
    num_prefixes: int = 1  # shared-prefix / long-document: distinct prefixes requests pick from
    compare_layouts: bool = False
    compare_context_cache: bool = False
    context_cache_url: str = "redis://127.0.0.1:6379/15"  # emptied of pdserve:ctx:* keys first
    kv_cache_blocks: int | None = None  # the started clusters' KV blocks per worker
    model: str | None = None  # the served model: for --compare-layouts and the engine-only TTFT
    overhead_probes: int = 8  # one-token requests timed for the overhead (0: skip)
    request_timeout_s: float = 600.0
    baseline_url: str | None = None  # another OpenAI server on the same workload (vllm serve)
    baseline_label: str = "baseline"
    engine_throughput: bool = True  # with --model: each level on the engine alone too
    worker_cores: float | None = None  # shifting: a CPU quota per worker (bench/cpu_quota.py)

    def __post_init__(self) -> None:
        self.concurrency = tuple(self.concurrency)
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {list(self.concurrency)}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        for name in ("num_prompts", "max_tokens", "prefix_words", "num_prefixes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.worker_cores is not None and self.workload != "shifting":
            raise ValueError("--worker-cores applies to --workload shifting (the clusters it starts)")
        if self.worker_cores is not None and not self.worker_cores > 0:
            raise ValueError(f"worker-cores must be > 0, got {self.worker_cores}")
        if self.overhead_probes < 0:
            raise ValueError(f"overhead-probes must be >= 0, got {self.overhead_probes}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0 ms, got {value}")
        if (self.compare_layouts or self.compare_context_cache) and not self.model:
            raise ValueError("--compare-layouts and --compare-context-cache start their own clusters: "
                             "name their --model (e.g. demo)")  # fmt: skip
        if self.compare_layouts and self.compare_context_cache:
            raise ValueError("choose one of --compare-layouts and --compare-context-cache")
        if self.workload == "json" and (self.compare_layouts or self.compare_context_cache):
            raise ValueError("--workload json is its own comparison (guided beside unguided): run it against "
                             "one gateway, without --compare-layouts or --compare-context-cache")  # fmt: skip


# ---------------------------------------------------------------------------- workloads

_TASKS = (
    "Write a Python function that {}.",
    "How would you {} in Python? Show the code.",
    "Write a small class that can {}, with a docstring.",
    "Explain, with an example, how to {} using the standard library.",
    "Write a unit test for a function that should {}.",
    "What is the shortest readable way to {}?",
)
_SUBJECTS = (
    "reverse the words of a sentence", "parse a CSV file into dictionaries", "merge two sorted lists",
    "count the lines of every file in a directory", "retry a call with exponential backoff",
    "read a JSON config file with defaults", "find duplicate files by their hash",
    "format a number of bytes for humans", "flatten a nested list", "group log lines by hour",
    "download a page and extract its title", "validate an email address", "compute a moving average",
    "walk a directory tree and skip hidden folders", "turn a dict into query-string parameters",
    "split a list into chunks of {n} items", "find the {n} most common words in a text",
    "time a function over {n} runs", "generate a random password of {n} characters",
    "pad every line of a file to {n} columns",
)  # fmt: skip
_PREVIOUS = (
    ("Can you help me with some Python?", "Of course. What are you working on?"),
    ("I am cleaning up an old script.", "Good idea. Which part first?"),
    ("I only have the standard library.", "That is enough for most tasks."),
)
# The shared-prefix system prompt is drawn from these, so it reads like instructions.
_GUIDE = (
    "always prefer clear names and short functions; document every public function with a docstring "
    "that says what it returns and which errors it raises; keep modules small and imports sorted; "
    "use type hints for arguments and results; avoid global state and hidden side effects; write tests "
    "for edge cases such as empty input, missing files and unicode text; handle errors where you can "
    "act on them and let the rest propagate; log with context rather than print; keep lines under one "
    "hundred characters; prefer the standard library over new dependencies"
)


def _question(rng: random.Random) -> str:
    subject = rng.choice(_SUBJECTS).format(n=rng.randint(2, 99))
    return rng.choice(_TASKS).format(subject)


def system_prompt(words: int, seed: int) -> str:
    """The shared-prefix workload's common system prompt: `words` words, fixed by `seed`."""
    rng = random.Random(f"system-{seed}")
    pool = _GUIDE.split()
    text = " ".join(rng.choice(pool) for _ in range(words))
    return "You are a careful Python reviewer. Follow this style guide: " + text


# Question batches that are not concurrency levels (those are 0, 1, ...).
WARMUP_BATCH = -1
PROBE_BATCH = -2


def document(words: int, seed: int, k: int) -> str:
    """The long-document workload's k-th document: `words` words, fixed by `seed` and `k`."""
    rng = random.Random(f"document-{seed}-{k}")
    pool = _GUIDE.split() + [s.split()[0] for s in _SUBJECTS]
    return f"Document {k}: " + " ".join(rng.choice(pool) for _ in range(words))


def make_prompts(
    workload: str, n: int, seed: int, prefix_words: int = 300, batch: int = 0, num_prefixes: int = 1
) -> list[list[dict[str, str]]]:
    """`n` chat conversations (OpenAI `messages`) of `workload`; the same for the same arguments.

    `batch` picks the questions: each concurrency level asks its own (a prompt the prefix cache
    kept from an earlier level would flatter the later one), the same for every layout. The
    shared prefixes (system prompts, documents) depend on `seed` alone, so every batch shares them.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    rng = random.Random(f"{workload}-{seed}-{batch}")
    prompts = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        k = rng.randrange(num_prefixes) if num_prefixes > 1 else 0  # one prefix: the questions as before
        if workload == "long-document":
            text = document(prefix_words, seed, k)
            prompts.append([{"role": "user", "content": text + "\n\nAbout this document: " + _question(rng)}])
            continue
        if workload == "shared-prefix":
            messages.append({"role": "system", "content": system_prompt(prefix_words, seed + 1000 * k)})
        if rng.random() < 0.3:  # some conversations carry an earlier exchange
            user, assistant = rng.choice(_PREVIOUS)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        ask = " Answer with a JSON list of example users." if workload == "json" else ""
        messages.append({"role": "user", "content": _question(rng) + ask})
        prompts.append(messages)
    return prompts


# ---------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    """One streamed request as the client saw it (seconds from sending it)."""

    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served
    redis_cached_tokens: int = 0  # of those, loaded from the Redis context cache
    itl_s: list[float] = field(default_factory=list)  # gaps between the chunks after the first
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def send_chat(
    client, url: str, model: str, messages: list[dict[str, str]], max_tokens: int, headers: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> RequestResult:  # fmt: skip
    """One streamed chat completion (`extra`: more body fields); failures are results, not exceptions."""
    import httpx

    body = {
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(extra or {}),
    }  # fmt: skip
    start = time.perf_counter()
    last: float | None = None
    result = RequestResult(ok=False, e2e_s=0.0)
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                result.error = f"HTTP {r.status_code}: {text[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                if usage := event.get("usage"):
                    result.output_tokens = usage["completion_tokens"]
                    result.prompt_tokens = usage["prompt_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens", 0)
                    result.redis_cached_tokens = details.get("redis_cached_tokens", 0)
                choice = event["choices"][0] if event.get("choices") else {}
                delta = choice.get("delta") or {}
                # A last token with no text of its own (a special token) still ends the wait for one.
                ended_silent = last is None and choice.get("finish_reason")
                if delta.get("content") or delta.get("reasoning_content") or ended_silent:
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    chunks += 1
        result.ok = result.ttft_s is not None
        if not result.ok:
            result.error = "the stream carried no tokens"
        result.output_tokens = result.output_tokens or chunks
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.e2e_s = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- one level


def distribution(values_s: list[float]) -> dict[str, float] | None:
    """mean / p50 / p90 / p99 in milliseconds (linear interpolation between ranks), None if empty."""
    if not values_s:
        return None
    s = sorted(values_s)

    def pick(q: float) -> float:
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {
        "mean": round(sum(s) / len(s) * 1e3, 3),
        **{f"p{int(q * 100)}": round(pick(q) * 1e3, 3) for q in (0.5, 0.9, 0.99)},
    }


def summarize(
    results: list[RequestResult], duration_s: float, concurrency: int, args: ServeBenchArgs
) -> dict[str, Any]:
    """One concurrency level's row."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or "unknown")[:120]
            errors[key] = errors.get(key, 0) + 1
    tokens = sum(r.output_tokens for r in ok)
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "duration_s": round(duration_s, 3),
        "output_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "redis_cached_prompt_tokens": sum(r.redis_cached_tokens for r in ok),
        "computed_prompt_tokens": sum(r.prompt_tokens - r.cached_tokens for r in ok),
        "request_throughput": round(len(ok) / duration_s, 3),
        "output_throughput": round(tokens / duration_s, 2),
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itl_s]),
        "e2e_ms": distribution([r.e2e_s for r in ok]),
        "goodput": None,
        "slo_met": None,
    }
    if args.slo_ttft_ms is not None or args.slo_tpot_ms is not None:

        def meets(r: RequestResult) -> bool:
            ttft_ok = args.slo_ttft_ms is None or (r.ttft_s or 0) * 1e3 <= args.slo_ttft_ms
            # A one-token answer has no TPOT: nothing to miss.
            tpot_ok = args.slo_tpot_ms is None or r.tpot_s is None or r.tpot_s * 1e3 <= args.slo_tpot_ms
            return ttft_ok and tpot_ok

        met = sum(meets(r) for r in ok)
        row["slo_met"] = met
        row["goodput"] = round(met / duration_s, 3)
    return row


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _served_model(client, url: str, headers: dict[str, str]) -> str:
    import httpx

    try:
        r = await client.get(url + "/v1/models", headers=headers)
    except httpx.HTTPError as e:
        raise ConnectionError(f"no gateway answers at {url} ({e}); start one with `pdserve up`") from e
    if r.status_code != 200:
        raise ConnectionError(f"{url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    models = r.json().get("data") or []
    if not models:
        raise ConnectionError(f"{url}/v1/models lists no model")
    return models[0]["id"]


def warmup_prompt(args: ServeBenchArgs) -> list[dict[str, str]]:
    """Sent before measuring, never measured (nor sent again)."""
    return make_prompts(args.workload, 1, args.seed, args.prefix_words, WARMUP_BATCH, args.num_prefixes)[0]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection in this process inside a timed section (one full collection first,
    outside it). The client's own full collections took 180-190 ms with the engine alone loaded
    in-process, and one fell inside a level in most side-by-side runs: every request that level
    sent meanwhile waited (TTFT p99 at c=16 220-290 ms against ~70, docs/DECISIONS.md 2026-12-06)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _run_level(
    client, url: str, model: str, concurrency: int, prompts: list[list[dict[str, str]]], args: ServeBenchArgs,
    label: str, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`concurrency` requests in flight until every prompt is done; the level's row."""
    headers = _headers(args.api_key)
    gate = asyncio.Semaphore(concurrency)
    with tqdm(total=len(prompts), desc=f"bench serve: {label} concurrency {concurrency}", leave=False) as bar:

        async def one(messages: list[dict[str, str]]) -> RequestResult:
            async with gate:
                result = await send_chat(client, url, model, messages, args.max_tokens, headers, extra)
            bar.update()
            return result

        with collector_paused():
            start = time.perf_counter()
            results = await asyncio.gather(*(one(p) for p in prompts))
            duration = time.perf_counter() - start
    return summarize(list(results), duration, concurrency, args)


async def _run_side_by_side(
    targets: list[tuple[str, str]], args: ServeBenchArgs, extra: dict[str, Any] | None = None
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every level on every (label, url), the targets taking turns level by level (machine load
    drifts; turns keep each level's numbers side by side; `extra`: more body fields of every
    request). Per target: its model and its rows."""
    import httpx

    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    headers = _headers(args.api_key)
    async with contextlib.AsyncExitStack() as stack:
        clients, models = [], []
        for _, url in targets:
            client = await stack.enter_async_context(
                httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits)
            )
            model = await _served_model(client, url, headers)
            # First-call costs (channels, KV transfer groups) and, for shared-prefix, the system
            # prompt into the cache, so that every level starts alike.
            first = await send_chat(
                client, url, model, warmup_prompt(args), min(args.max_tokens, 4), headers, extra
            )
            if not first.ok:
                raise RuntimeError(f"the warm-up request to {url} failed: {first.error}")
            clients.append(client)
            models.append(model)
        rows: list[list[dict[str, Any]]] = [[] for _ in targets]
        for i, concurrency in enumerate(args.concurrency):
            prompts = level_prompts(args, i)
            for k, ((label, url), client, model) in enumerate(zip(targets, clients, models)):
                # The previous target's leftovers (vLLM spins a core ~1 s after a burst) must not
                # land on this one's level.
                settled_s = await wait_until_quiet()
                row = await _run_level(client, url, model, concurrency, prompts, args, label, extra)
                rows[k].append({**row, "settled_s": settled_s})
    return list(zip(models, rows))


def level_prompts(args: ServeBenchArgs, level: int) -> list[list[dict[str, str]]]:
    """The prompts of concurrency level number `level` (the same for every target and layout)."""
    return make_prompts(
        args.workload,
        args.num_prompts,
        args.seed,
        args.prefix_words,
        batch=level,
        num_prefixes=args.num_prefixes,
    )


def engine_throughput(model: str, args: ServeBenchArgs) -> dict[int, float]:
    """Output tokens/s of the engine alone per level (one thread, as `pdserve up` gives a worker):
    the level's prompts, as the chat template makes them, in batches of `concurrency`, greedy,
    `max_tokens` each with EOS ignored, like the served requests."""
    from pdserve.engine import LLM, SamplingParams

    llm = LLM(model=model, num_threads=1, progress=False)
    tok = llm.tokenizer
    if tok is None:
        raise ValueError(f"model {model!r} has no tokenizer; the engine's throughput needs the chat template")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([_chat_ids(tok, warmup_prompt(args))], params)
    rates = {}
    for i, concurrency in enumerate(tqdm(args.concurrency, desc="bench serve: engine alone", leave=False)):
        prompts = level_prompts(args, i)
        ids = [_chat_ids(tok, p) for p in prompts]
        with collector_paused():
            start, tokens = time.perf_counter(), 0
            for b in range(0, len(ids), concurrency):
                outs = llm.generate(ids[b : b + concurrency], params)
                tokens += sum(len(o.outputs[0].token_ids) for o in outs)
            rates[concurrency] = round(tokens / (time.perf_counter() - start), 2)
    return rates


def _chat_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- overhead


def probe_prompts(args: ServeBenchArgs) -> list[list[dict[str, str]]]:
    """The overhead probes: prompts of the workload that the measured levels never send."""
    return make_prompts(
        args.workload, args.overhead_probes, args.seed, args.prefix_words, PROBE_BATCH, args.num_prefixes
    )


def engine_ttft(model: str, probes: list[list[dict[str, str]]], warmup: list[dict[str, str]]) -> list[float]:
    """Seconds to the first token of the engine alone, per probe (one at a time, one thread as
    `pdserve up` gives each worker), on the token ids the gateway's chat template makes.

    `warmup` is run first, unmeasured, as the HTTP side runs it before its levels: the engine's
    first-call costs, and the same prefix cache contents (shared-prefix: the system prompt).
    """
    from pdserve.engine import LLM, SamplingParams

    llm = LLM(model=model, num_threads=1, progress=False)
    tok = llm.tokenizer
    if tok is None:
        raise ValueError(f"model {model!r} has no tokenizer; the overhead needs the chat template")

    one = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([_chat_ids(tok, warmup)], one)
    times = []
    with collector_paused():
        for prompt in tqdm(
            [_chat_ids(tok, p) for p in probes], desc="bench serve: engine-only TTFT", leave=False
        ):
            start = time.perf_counter()
            llm.generate([prompt], one)
            times.append(time.perf_counter() - start)
    return times


async def http_ttft(url: str, args: ServeBenchArgs, probes: list[list[dict[str, str]]]) -> list[float]:
    """Seconds to the first streamed token over HTTP for one-token requests, one at a time."""
    import httpx

    headers = _headers(args.api_key)
    async with httpx.AsyncClient(timeout=args.request_timeout_s) as client:
        model = await _served_model(client, url, headers)
        await wait_until_quiet()  # the probes follow the last level, the baseline's when there is one
        times = []
        with collector_paused():
            for messages in probes:
                r = await send_chat(client, url, model, messages, 1, headers)
                if not r.ok or r.ttft_s is None:
                    raise RuntimeError(f"an overhead probe failed: {r.error}")
                times.append(r.ttft_s)
    return times


def overhead(http_s: list[float], engine_s: list[float]) -> dict[str, Any]:
    """Per-probe HTTP TTFT minus engine TTFT (same prompt), and both sides' distributions."""
    return {
        "probes": len(http_s),
        "http_ttft_ms": distribution(http_s),
        "engine_ttft_ms": distribution(engine_s),
        "overhead_ms": distribution([h - e for h, e in zip(http_s, engine_s)]),
    }


# ---------------------------------------------------------------------------- layouts


# Ports for servers started after they are chosen (a cluster binds its router port seconds later):
# below the kernel's ephemeral range (32768-60999), which any outgoing connection (Ray's, gRPC's)
# may take meanwhile, and above Ray's worker ports (10002-19999). The tests pick theirs here too.
SPARE_PORTS = range(20000, 32768)
_handed_out: set[int] = set()  # a port given once is not given again in this process (none is bound yet)


def spare_port() -> int:
    """A port on 127.0.0.1 nothing listens on now, from `SPARE_PORTS`."""
    for port in random.sample(SPARE_PORTS, 64):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {SPARE_PORTS.start}-{SPARE_PORTS.stop - 1} after 64 tries")


def _serving(url: str) -> bool:
    """Whether the gateway at `url` answers /health (it listens only once the workers are ready)."""
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def state_dir(workdir: Path, layout: str) -> Path:
    """Where `launched(layout, ...)` keeps that cluster's state (its record under `clusters/`)."""
    return workdir / layout.replace(" ", "-").replace("+", "")


@contextlib.contextmanager
def launched(
    layout: str, model: str, workdir: Path, api_key: str | None, timeout_s: float = 600,
    flags: list[str] | None = None,
) -> Iterator[str]:  # fmt: skip
    """`pdserve up` with `layout`'s workers (or `flags`) in a subprocess; yields its URL, stops it after."""
    port, router_port = spare_port(), spare_port()
    state = state_dir(workdir, layout)
    flags = LAYOUTS[layout] if flags is None else flags
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--model", model, *flags, "--port", str(port),
           "--router-port", str(router_port), "--state-dir", str(state)]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    log_path = state.with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        try:
            deadline = time.monotonic() + timeout_s
            with tqdm(
                desc=f"bench serve: starting {layout}", bar_format="{desc}: {elapsed}", leave=False
            ) as bar:
                while not _serving(f"http://127.0.0.1:{port}"):
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"`{' '.join(cmd)}` exited ({proc.returncode}):\n{log_path.read_text()[-2000:]}"
                        )
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"`{' '.join(cmd)}` was not up after {timeout_s:.0f} s; see {log_path}"
                        )
                    time.sleep(0.5)
                    bar.update()
            yield f"http://127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # what `pdserve down` sends: it stops Ray and the workers
                try:
                    proc.wait(90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---------------------------------------------------------------------------- output


def _fmt(d: dict[str, float] | None, key: str) -> str:
    return "-" if d is None else f"{d[key]:.1f}"


def _cached_share(level: dict[str, Any]) -> str:
    return (
        f"{100 * level['cached_prompt_tokens'] / level['prompt_tokens']:.0f}%"
        if level["prompt_tokens"]
        else "-"
    )


def _print_run(run: dict[str, Any], args: ServeBenchArgs) -> None:
    print(
        f"\n{run['layout']} ({run['url']}, model {run['model']}): {args.workload}, {args.num_prompts} prompts "
        f"per level, max_tokens {args.max_tokens}; latencies in ms, p50 / p90 / p99"
    )
    header = ["conc", "ok", "fail", "req/s", "tok/s", "goodput", "cached", "TTFT", "TPOT", "ITL", "E2E"]
    widths = [4, 4, 4, 7, 8, 7, 6, 22, 20, 20, 24]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for r in run["levels"]:
        cells = [
            r["concurrency"], r["completed"], r["failed"], f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}", "-" if r["goodput"] is None else f"{r['goodput']:.2f}",
            _cached_share(r),
            *(" / ".join(_fmt(r[f"{m}_ms"], q) for q in ("p50", "p90", "p99")) for m in METRICS),
        ]  # fmt: skip
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
        for error, count in r["errors"].items():
            print(f"      {count} x {error}")
    for r in run["levels"]:
        ratios = []
        if r.get("engine_tok_s"):
            ratios.append(
                f"the engine alone {r['engine_tok_s']:.1f} tok/s, served/engine {r['served_over_engine']:.2f}"
            )
        if r.get("over_baseline") is not None:
            ratios.append(f"tok/s over the baseline {r['over_baseline']:.2f}x")
        if ratios:
            print(f"concurrency {r['concurrency']}: " + "; ".join(ratios))
    if run.get("overhead"):
        o = run["overhead"]
        print(
            f"gateway+router overhead, {o['probes']} one-token probes: HTTP TTFT p50 "
            f"{_fmt(o['http_ttft_ms'], 'p50')} - engine TTFT p50 {_fmt(o['engine_ttft_ms'], 'p50')}; "
            f"per probe p50 {_fmt(o['overhead_ms'], 'p50')}, p90 {_fmt(o['overhead_ms'], 'p90')}"
        )


def _print_side_by_side(runs: list[dict[str, Any]]) -> None:
    names = [r["layout"] for r in runs]
    print(f"\nside by side: {' vs '.join(names)} (latencies in ms)")
    width = max(14, *(len(n) + 2 for n in names))  # a long label (the baseline's) keeps its column
    print(f"{'conc':>4} {'':<16}" + "".join(f"{n:>{width}}" for n in names))

    def number(key: str, q: str | None = None):
        def cell(level: dict[str, Any]) -> str:
            value = level[key][q] if q and level.get(key) is not None else level.get(key)
            return "-" if value is None else str(value) if isinstance(value, int) else f"{value:.2f}"

        return cell

    rows = [
        ("failed", number("failed")), ("req/s", number("request_throughput")),
        ("out tok/s", number("output_throughput")), ("served/engine", number("served_over_engine")),
        ("goodput req/s", number("goodput")),
        ("cached prompt", _cached_share), ("from Redis", number("redis_cached_prompt_tokens")),
        ("prefill computed", number("computed_prompt_tokens")), ("TTFT p50", number("ttft_ms", "p50")),
        ("TTFT p99", number("ttft_ms", "p99")), ("TPOT p50", number("tpot_ms", "p50")),
        ("TPOT p99", number("tpot_ms", "p99")), ("ITL p50", number("itl_ms", "p50")),
        ("ITL p99", number("itl_ms", "p99")), ("E2E p50", number("e2e_ms", "p50")),
        ("E2E p99", number("e2e_ms", "p99")), ("waited quiet s", number("settled_s")),
    ]  # fmt: skip
    for i, level in enumerate(runs[0]["levels"]):
        for label, cell in rows:
            print(
                f"{level['concurrency']:>4} {label:<16}"
                + "".join(f"{cell(r['levels'][i]):>{width}}" for r in runs)
            )
    if all(r.get("overhead") for r in runs):
        print("one-token probes, one at a time (p50):")
        for label, key in (("HTTP TTFT", "http_ttft_ms"), ("engine TTFT", "engine_ttft_ms"),
                           ("overhead", "overhead_ms")):  # fmt: skip
            print(
                f"{'':>4} {label:<16}" + "".join(f"{_fmt(r['overhead'][key], 'p50'):>{width}}" for r in runs)
            )


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Latency percentiles vs concurrency, one line per run; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'pdserve[test]')", file=sys.stderr)
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    titles = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
              "e2e": "end-to-end latency"}  # fmt: skip
    for ax, metric in zip(axes.flat, METRICS):
        for k, run in enumerate(doc["runs"]):
            levels = [lv for lv in run["levels"] if lv[f"{metric}_ms"] is not None]
            xs = [lv["concurrency"] for lv in levels]
            for q, style in (("p50", "-"), ("p99", "--")):
                ax.plot(xs, [lv[f"{metric}_ms"][q] for lv in levels], style, marker="o", color=f"C{k}",
                        label=f"{run['layout']} {q}")  # fmt: skip
        ax.set_title(titles[metric])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.set_xscale("log", base=2)
        levels = sorted({lv["concurrency"] for run in doc["runs"] for lv in run["levels"]})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a = doc["args"]
    fig.suptitle(
        f"pdserve bench serve: {a['workload']}, {a['num_prompts']} prompts/level, max_tokens {a['max_tokens']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- the bench


def run_serve_bench(args: ServeBenchArgs, output: Path | None = None) -> dict[str, Any]:
    """Runs the levels (against `args.url`, or each layout with --compare-layouts); prints, writes JSON + PNG.

    The shifting workload is its own comparison (bench/shifting_bench.py).
    """
    if args.workload == "shifting":
        from pdserve.bench.shifting_bench import ShiftingArgs, run_shifting_bench

        return run_shifting_bench(ShiftingArgs.from_serve(args), output)
    probes = probe_prompts(args) if args.model and args.overhead_probes else []
    # Before any cluster starts: the engine alone, without workers competing for the cores.
    engine_s = engine_ttft(args.model, probes, warmup_prompt(args)) if probes else []
    rates = engine_throughput(args.model, args) if args.model and args.engine_throughput else {}
    runs = []
    if args.compare_layouts or args.compare_context_cache:
        assert args.model is not None
        with tempfile.TemporaryDirectory(prefix="pdserve-bench-serve-") as tmp:
            for layout, flags in _started_clusters(args).items():
                with launched(layout, args.model, Path(tmp), args.api_key, flags=flags) as url:
                    runs += _run(url, layout, args, probes, engine_s, rates)
    elif args.workload == "json":
        for side, extra in json_sides(args.max_tokens).items():
            runs += _run(args.url, side, args, probes, engine_s, rates, extra)
    else:
        runs += _run(args.url, "url", args, probes, engine_s, rates)
    recorded = {**asdict(args), "api_key": "<set>" if args.api_key else None}  # results get shared; keys not
    doc = {"benchmark": "serve", "args": recorded, "model": runs[0]["model"], "runs": runs}
    for run in runs:
        _print_run(run, args)
    if len(runs) > 1:
        _print_side_by_side(runs)
    write_report(doc, output)
    if output is not None:
        png = plot(doc, output.with_suffix(".png"))
        if png is not None:
            print(f"wrote {png}")
    return doc


def _empty_context_cache(url: str) -> None:
    """Deletes every context-cache block at `url`, so the "cache on" run starts cold too."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match="pdserve:ctx:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    except redis.RedisError as e:
        raise ConnectionError(f"--context-cache-url {url}: {e}") from e
    finally:
        client.close()


def _started_clusters(args: ServeBenchArgs) -> dict[str, list[str]]:
    """The `pdserve up` flags of each cluster a comparison starts, by its name in the table."""
    blocks = ["--kv-cache-blocks", str(args.kv_cache_blocks)] if args.kv_cache_blocks else []
    if not args.compare_context_cache:
        return {layout: flags + blocks for layout, flags in LAYOUTS.items()}
    on = json.dumps({"redis_url": args.context_cache_url})
    _empty_context_cache(args.context_cache_url)
    return {
        "cache off": LAYOUTS["1P+1D"] + blocks,
        "cache on": LAYOUTS["1P+1D"] + blocks + ["--context-cache", on],
    }


def json_sides(max_tokens: int) -> dict[str, dict[str, Any] | None]:
    """The json workload's two runs, by name: their extra body fields (the guided side's schema
    holds it to `max_tokens` as `ignore_eos` holds the free side, which guided decoding refuses)."""
    from pdserve.bench.json_workload import long_schema

    schema = {"name": "users", "schema": long_schema(max_tokens)}
    guided = {"ignore_eos": False, "response_format": {"type": "json_schema", "json_schema": schema}}
    return {"unguided": None, "guided json": guided}


def _run(
    url: str, layout: str, args: ServeBenchArgs, probes: list[list[dict[str, str]]], engine_s: list[float],
    engine_rates: dict[int, float], extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The levels on `url` (and, level by level beside it, on the baseline); the overhead probes.
    `extra`: more body fields of every request (the json workload's guided side)."""
    targets = [(layout, url)]
    if args.baseline_url:
        targets.append((f"{args.baseline_label} (beside {layout})", args.baseline_url))
    results = asyncio.run(_run_side_by_side(targets, args, extra))
    runs = []
    for (label, target_url), (model, levels) in zip(targets, results):
        for level in levels:
            engine = engine_rates.get(level["concurrency"])
            level["engine_tok_s"] = engine
            level["served_over_engine"] = round(level["output_throughput"] / engine, 3) if engine else None
        runs.append({"layout": label, "url": target_url, "model": model, "levels": levels, "overhead": None})
    if args.baseline_url:
        for ours, theirs in zip(runs[0]["levels"], runs[1]["levels"]):
            base = theirs["output_throughput"]
            ours["over_baseline"] = round(ours["output_throughput"] / base, 3) if base else None
    if probes:
        runs[0]["overhead"] = overhead(asyncio.run(http_ttft(url, args, probes)), engine_s)
    return runs
