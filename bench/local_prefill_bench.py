"""`pdserve bench local-prefill`: what conditional disaggregation buys, by uncached prompt length.

The same 1 prefill + 1 decode cluster twice: every prompt sent to the prefill worker and its KV
moved (`--local-prefill-tokens 0`), and every prompt computed on the decode worker itself (a
threshold above every length). For each prompt length: time to first token of requests sent one
at a time on an idle cluster, and again while `background` long streams decode on the decode
worker, with those streams' inter-token latency meanwhile (what a local prefill costs the
requests already decoding). The threshold is the longest prompt for which computing it locally
gives the better TTFT without hurting the decoding streams much. Prompts are random English words
(seeded, none repeated): no prefix cache hits.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.bench.report_file import write_report
from pdserve.bench.serve_bench import PROMPT_WORDS, launched

MODES = {"transfer": "0", "local": "1000000"}


@dataclass(frozen=True)
class LocalPrefillArgs:
    """The run: model, prompt lengths (in words), probes per length, background streams."""

    model: str = "demo"
    lengths: tuple[int, ...] = (16, 64, 128, 256, 512)
    probes: int = 6
    background: int = 4
    seed: int = 0


@dataclass
class Cell:
    """One mode at one length: TTFTs idle and under load, the background streams' gaps, prompt size."""

    prompt_tokens: float = 0.0
    ttft_idle_ms: float = 0.0
    ttft_loaded_ms: float = 0.0
    background_itl_ms: float = 0.0


@dataclass
class Report:
    """mode -> length (words) -> Cell."""

    cells: dict[str, dict[int, Cell]] = field(default_factory=dict)


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(PROMPT_WORDS) for _ in range(words))


async def _ttft(client, url: str, prompt: str) -> tuple[float, int]:
    """(seconds to the first token, prompt tokens) of one streamed 4-token completion."""
    body = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["prompt_tokens"]
    assert first is not None
    return first, tokens


async def _background(client, url: str, prompt: str, gaps: list[float], stop: asyncio.Event) -> None:
    """One long stream (restarted until `stop`), recording the gaps between its chunks."""
    body = {"prompt": prompt, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            last = None
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                if stop.is_set():
                    break


async def _measure(url: str, args: LocalPrefillArgs, rng: random.Random) -> dict[int, Cell]:
    import httpx

    cells: dict[int, Cell] = {}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.background + 4)) as client:
        await _ttft(client, url, _prompt(rng, 8))  # warm-up: first transfer builds the channel
        for words in args.lengths:
            idle = [await _ttft(client, url, _prompt(rng, words)) for _ in range(args.probes)]
            gaps: list[float] = []
            stop = asyncio.Event()
            streams = [asyncio.ensure_future(_background(client, url, _prompt(rng, 16), gaps, stop))
                       for _ in range(args.background)]  # fmt: skip
            await asyncio.sleep(2.0)  # the streams are decoding
            gaps.clear()
            loaded = [await _ttft(client, url, _prompt(rng, words)) for _ in range(args.probes)]
            itl = statistics.median(gaps) if gaps else 0.0
            stop.set()
            await asyncio.gather(*streams, return_exceptions=True)
            cells[words] = Cell(
                prompt_tokens=statistics.mean(t for _, t in idle),
                ttft_idle_ms=statistics.median(s for s, _ in idle) * 1000,
                ttft_loaded_ms=statistics.median(s for s, _ in loaded) * 1000,
                background_itl_ms=itl * 1000,
            )
    return cells


def run_local_prefill_bench(args: LocalPrefillArgs, output: Path | None = None) -> Report:
    """Both modes, one after the other, on the same prompts; prints the table, writes JSON."""
    report = Report()
    with tempfile.TemporaryDirectory(prefix="pdserve-local-prefill-") as tmp:
        for mode, threshold in MODES.items():
            flags = ["--prefill", "1", "--decode", "1", "--both", "0", "--local-prefill-tokens", threshold,
                     "--role-planner", '{"enabled": false}']  # fmt: skip
            with launched(mode, args.model, Path(tmp), None, flags=flags) as url:
                rng = random.Random(f"local-prefill-{args.seed}")  # the same prompts in both modes
                report.cells[mode] = asyncio.run(_measure(url, args, rng))
    print_table(report, args)
    cells = {m: {w: asdict(c) for w, c in cs.items()} for m, cs in report.cells.items()}
    write_report({"args": asdict(args), "cells": cells}, output)
    return report


def print_table(report: Report, args: LocalPrefillArgs) -> None:
    """Per length: TTFT (idle, loaded) and background ITL for both modes, and local/transfer ratios."""
    t, lo = report.cells["transfer"], report.cells["local"]
    print(f"\nlocal prefill vs transfer: {args.model}, 1P+1D, {args.probes} probes per length, "
          f"{args.background} background streams for 'loaded'")  # fmt: skip
    print(f"{'tokens':>7} | {'TTFT idle ms  transfer/local':>28} | {'TTFT loaded ms  transfer/local':>31} "
          f"| {'bg ITL ms  transfer/local':>25}")  # fmt: skip
    for words in args.lengths:
        a, b = t[words], lo[words]
        print(f"{a.prompt_tokens:>7.0f} | {a.ttft_idle_ms:>12.1f} / {b.ttft_idle_ms:<13.1f} | "
              f"{a.ttft_loaded_ms:>14.1f} / {b.ttft_loaded_ms:<14.1f} | "
              f"{a.background_itl_ms:>11.1f} / {b.background_itl_ms:<11.1f}")  # fmt: skip
