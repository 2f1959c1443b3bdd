"""`pdserve bench kv-transfer`: moving a request's KV blocks between two processes.

Two spawned processes play the prefill (sender) and decode (receiver) workers and use the
same `KVTransport` the workers use; beside each size, an in-process torch copy of the same
bytes gives the machine's own ceiling, measured in the same run. `end_to_end_ms` adds the
gather of the request's scattered blocks out of the sender's KV pool and their scatter into
the receiver's, as the workers' export and import do.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pdserve.bench.report_file import write_report
from pdserve.engine.config import ModelConfig
from pdserve.engine.model_source import resolve_model
from pdserve.roles.kv_transfer import Channel, Endpoint, make_transport


@dataclass
class KVTransferBenchArgs:
    """What to measure: the model shape sets the bytes per block."""

    model: str = "ernie-4.5-0.3b"
    backend: str = "gloo"
    blocks: tuple[int, ...] = (1, 8, 32, 128)
    block_size: int = 16
    dtype: str = "bfloat16"
    repeats: int = 10


def block_shape(args: KVTransferBenchArgs) -> tuple[int, ...]:
    """[L, 2, block_size, KVH, D] for one block of the model's KV."""
    mc = ModelConfig.from_hf_dict(resolve_model(args.model).hf_config)
    return (mc.num_hidden_layers, 2, args.block_size, mc.num_key_value_heads, mc.head_dim)


def _tensor(args: KVTransferBenchArgs, blocks: int, device: str) -> torch.Tensor:
    layers, two, bs, kvh, d = block_shape(args)
    return torch.ones((layers, two, blocks, bs, kvh, d), dtype=getattr(torch, args.dtype), device=device)


def _peer(rank: int, args: KVTransferBenchArgs, conn) -> None:
    torch.set_num_threads(1)
    device = "cuda" if args.backend == "nccl" else "cpu"
    transport = make_transport(args.backend, f"bench-{rank}")
    conn.send(transport.endpoint)
    sender, receiver = conn.recv()
    channel = Channel(sender, receiver)
    # A worker's KV pool: the request's blocks are scattered in it, as after real traffic.
    pool = _tensor(args, 2 * max(args.blocks), device)
    times: dict[int, dict[str, list[float]]] = {}
    for blocks in args.blocks:
        ids = torch.randperm(pool.shape[2], generator=torch.Generator().manual_seed(rank))[:blocks].to(device)
        t = _tensor(args, blocks, device)
        for i in range(args.repeats + 1):
            marks = [time.perf_counter()]
            if rank == 0:
                t = pool.index_select(2, ids)  # what the prefill worker's export does
                marks.append(time.perf_counter())
                transport.send(channel, t, 60.0)
            else:
                transport.recv(channel, t, 60.0)
                marks.append(time.perf_counter())
                pool.index_copy_(2, ids, t)  # what the decode worker's import does
            marks.append(time.perf_counter())
            if i:  # the first round builds the communicator
                phase = ("gather", "send") if rank == 0 else ("recv", "scatter")
                for name, a, b in zip(phase, marks, marks[1:]):
                    times.setdefault(blocks, {}).setdefault(name, []).append(b - a)
    conn.send(times)


def _local_copy(args: KVTransferBenchArgs, blocks: int) -> list[float]:
    src, dst = _tensor(args, blocks, "cpu"), _tensor(args, blocks, "cpu")
    out = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        if i:
            out.append(time.perf_counter() - start)
    return out


def run_kv_transfer_bench(args: KVTransferBenchArgs, output: Path | None = None) -> dict[str, Any]:
    """Measures each size over the transport and as a local copy; prints a table, writes JSON."""
    with tqdm(total=2 * len(args.blocks), desc=f"bench kv-transfer ({args.backend})") as bar:
        # The local copies first, alone: measured while the peers run, they share the cores with them.
        local = {}
        for blocks in args.blocks:
            local[blocks] = _local_copy(args, blocks)
            bar.update()
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe() for _ in range(2)]
        procs = [ctx.Process(target=_peer, args=(rank, args, pipes[rank][1])) for rank in range(2)]
        for p in procs:
            p.start()
        endpoints: list[Endpoint] = [pipes[r][0].recv() for r in range(2)]
        for r in range(2):
            pipes[r][0].send((endpoints[0], endpoints[1]))
        received = pipes[1][0].recv()
        sent = pipes[0][0].recv()
        bar.update(len(args.blocks))
        for p in procs:
            p.join()
    element = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    per_block = element * int(torch.tensor(block_shape(args)).prod())
    table = []
    for blocks in args.blocks:
        nbytes = per_block * blocks
        t_med = statistics.median(received[blocks]["recv"])
        c_med = statistics.median(local[blocks])
        # The receive waits for the send, so gather + receive + scatter spans the whole move.
        e2e = (
            statistics.median(sent[blocks]["gather"]) + t_med + statistics.median(received[blocks]["scatter"])
        )
        table.append(
            {
                "blocks": blocks,
                "tokens": blocks * args.block_size,
                "mb": round(nbytes / 1e6, 3),
                "transfer_ms": round(t_med * 1e3, 3),
                "transfer_gb_s": round(nbytes / t_med / 1e9, 3),
                "local_copy_ms": round(c_med * 1e3, 3),
                "local_copy_gb_s": round(nbytes / c_med / 1e9, 3),
                "ratio_to_local": round(c_med / t_med, 3),
                "end_to_end_ms": round(e2e * 1e3, 3),
            }
        )
    doc = {"benchmark": "kv-transfer", "args": asdict(args), "bytes_per_block": per_block, "results": table}
    print(f"\nmodel={args.model} backend={args.backend} dtype={args.dtype} block_size={args.block_size}")
    print(
        f"{'blocks':>6} {'tokens':>7} {'MB':>8} {'xfer ms':>8} {'GB/s':>6} {'copy ms':>8} {'GB/s':>6} {'ratio':>6}"
    )
    for r in table:
        print(
            f"{r['blocks']:>6} {r['tokens']:>7} {r['mb']:>8.2f} {r['transfer_ms']:>8.2f} "
            f"{r['transfer_gb_s']:>6.2f} {r['local_copy_ms']:>8.2f} {r['local_copy_gb_s']:>6.2f} "
            f"{r['ratio_to_local']:>6.2f} {r['end_to_end_ms']:>7.2f}"
        )
    write_report(doc, output)
    return doc
