"""`pdserve bench context-cache`: a long prefix's KV loaded from Redis, against computing it.

One engine (ERNIE-4.5-0.3B's shape, dummy weights by default) with the context cache on. Each
round takes a new prompt of `prefix_tokens` random token ids plus one (random ids: the demo models
were trained on CPython's source, and nothing here should depend on the text):

- recompute: the prompt's first token with an empty pool and nothing in Redis (its TTFT);
- redis load: after the pool is emptied (a restarted or other worker), the context cache's
  lookup and load of the prefix into the pool (one MGET, checks, copy into the blocks), and the
  TTFT of the same prompt with the prefix loaded that way (the same first token, checked);
- in-process copy: the same blocks' bytes gathered out of the pool and scattered back, the
  machine's own ceiling for moving them.

Prints a table (median over rounds) and writes JSON.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pdserve.bench.report_file import write_report


@dataclass
class ContextCacheBenchArgs:
    """What to measure (the `pdserve bench context-cache` flags)."""

    model: str = "ernie-4.5-0.3b"
    load_format: str = "dummy"
    prefix_tokens: int = 2048
    block_size: int = 16
    threads: int = 2
    redis_url: str = "redis://127.0.0.1:6379"
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prefix_tokens", "block_size", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.prefix_tokens < self.block_size:
            raise ValueError(
                f"prefix-tokens must be at least one block ({self.block_size}), got {self.prefix_tokens}"
            )


def _empty_pool(engine) -> None:
    """Evicts every cached block, as a restart would leave the pool (nothing runs meanwhile)."""
    pool = engine.kv.pool
    pool.free(pool.allocate(pool.num_free))


def _ttft(llm, prompt: list[int]) -> tuple[float, int]:
    from pdserve.engine import SamplingParams

    start = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0]
    return time.perf_counter() - start, out.outputs[0].token_ids[0]


def _round(llm, prompt: list[int]) -> dict[str, float]:
    """One prompt: recompute, Redis load (alone and as TTFT), in-process copy; seconds each."""
    engine, cc = llm.engine, llm.engine.context_cache
    _empty_pool(engine)
    recompute_s, token = _ttft(llm, prompt)
    cc.flush()  # its blocks are in Redis now

    _empty_pool(engine)
    start = time.perf_counter()
    engine.add_request("bench-load", prompt, _greedy())  # looks the prefix up and loads it
    load_s = time.perf_counter() - start
    request = engine.scheduler.requests["bench-load"]
    loaded_tokens = request.context_cache_tokens[1] - request.context_cache_tokens[0]
    blocks = [engine.kv.pool.lookup(h) for h in request.block_hashes[: loaded_tokens // engine.kv.block_size]]
    engine.abort("bench-load")

    start = time.perf_counter()
    engine.kv_cache.write_blocks(blocks, engine.kv_cache.read_blocks(blocks))
    copy_s = time.perf_counter() - start

    _empty_pool(engine)
    redis_ttft_s, redis_token = _ttft(llm, prompt)
    if redis_token != token:
        raise RuntimeError(f"the first token differs after loading the prefix: {redis_token} != {token}")
    return {"recompute_s": recompute_s, "redis_load_s": load_s, "redis_ttft_s": redis_ttft_s,
            "copy_s": copy_s, "loaded_tokens": loaded_tokens}  # fmt: skip


def _greedy():
    from pdserve.engine import SamplingParams

    return SamplingParams(temperature=0, max_tokens=1)


def run_context_cache_bench(args: ContextCacheBenchArgs, output: Path | None = None) -> dict[str, Any]:
    """Runs the rounds; prints the table; writes JSON to `output`."""
    import redis

    from pdserve.engine import LLM

    blocks = -(-(args.prefix_tokens + 1) // args.block_size) + 4
    llm = LLM(
        model=args.model, load_format=args.load_format, block_size=args.block_size, num_threads=args.threads,
        kv_cache_blocks=blocks, progress=False, seed=args.seed,
        context_cache={"redis_url": args.redis_url, "max_bytes": 4 << 30, "ttl_s": 600},
    )  # fmt: skip
    client = redis.Redis.from_url(args.redis_url)
    client.ping()  # a missing Redis is an error here, not a silent recompute
    rng = random.Random(f"context-cache-{args.seed}")
    vocab = llm.engine.model_config.vocab_size
    _ttft(llm, [rng.randrange(3, vocab) for _ in range(64)])  # first-call costs, unmeasured
    rounds = []
    for _ in tqdm(range(args.repeats), desc="bench context-cache", leave=False):
        prompt = [rng.randrange(3, vocab) for _ in range(args.prefix_tokens + 1)]
        rounds.append(_round(llm, prompt))
    stats = llm.engine.stats().context_cache
    cc = llm.engine.context_cache
    ns = cc.ns
    keys = list(client.scan_iter(match=ns + ":*"))
    if keys:
        client.delete(*keys)
    client.close()
    cc.close()
    doc = _summary(args, rounds, cc.store.codec.payload_bytes, stats)
    _print(doc)
    write_report(doc, output)
    return doc


def _summary(args: ContextCacheBenchArgs, rounds: list[dict], block_bytes: int, stats) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    prefix_bytes = int(med["loaded_tokens"]) // args.block_size * block_bytes
    return {
        "benchmark": "context-cache",
        "args": asdict(args),
        "prefix_bytes": prefix_bytes,
        "rounds": rounds,
        "median": med,
        "recompute_over_load": med["recompute_s"] / med["redis_load_s"],
        "recompute_over_redis_ttft": med["recompute_s"] / med["redis_ttft_s"],
        "load_over_copy": med["redis_load_s"] / med["copy_s"],
        "redis_fetch_s_total": stats.fetch_seconds_total,
        "fetches": stats.fetches,
    }


def _print(doc: dict[str, Any]) -> None:
    a, m = doc["args"], doc["median"]
    print(
        f"\ncontext cache: {a['model']} ({a['load_format']} weights), a {int(m['loaded_tokens'])}-token prefix "
        f"({doc['prefix_bytes'] / 2**20:.1f} MiB of KV), {a['threads']} threads, median of {a['repeats']} rounds"
    )
    print(f"{'':<34}{'ms':>10}{'vs recompute':>14}")
    rows = (
        ("recompute (TTFT, empty pool)", m["recompute_s"]),
        ("Redis load of the prefix", m["redis_load_s"]),
        ("TTFT with the prefix from Redis", m["redis_ttft_s"]),
        ("in-process copy of the same bytes", m["copy_s"]),
    )
    for label, seconds in rows:
        print(f"{label:<34}{seconds * 1e3:>10.1f}{m['recompute_s'] / seconds:>13.1f}x")
    print(f"Redis load / in-process copy: {doc['load_over_copy']:.1f}x")
