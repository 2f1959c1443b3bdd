"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pdserve.config import FIELDS, add_flags, flags_given, load_config
from pdserve.router.policies import POLICIES


def _json_dict(flag: str):
    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a JSON object, e.g. '{{\"num_hidden_layers\": 2}}': {e}"
            ) from e
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {type(value).__name__}")
        return value

    return parse


def _int_at_least(flag: str, minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be > 0, got {text}")
        return value

    return parse


def _int_list(flag: str, minimum: int = 1):
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} takes comma-separated integers, e.g. 1,8,32, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} needs at least one integer")
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{flag}: every value must be >= {minimum}, got {text!r}")
        return values

    return parse


def _scheme_list(text: str) -> list[str]:
    from pdserve.engine.quantization.config import METHODS

    schemes = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in schemes if x not in ("fp32", *METHODS)]
    if bad or not schemes:
        raise argparse.ArgumentTypeError(
            f"--quantization takes comma-separated schemes from fp32, {', '.join(METHODS)}; got {text!r}"
        )
    return [x for x in schemes if x != "fp32"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=FIELDS["model"].default, help="checkpoint directory or bundled model name"
    )
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument(
        "--hf-overrides",
        type=_json_dict("--hf-overrides"),
        default={},
        help="JSON object overriding config.json keys, e.g. '{\"num_hidden_layers\": 2}'",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings `_add_model_args` parsed, as `EngineConfig` / `LLM` keyword arguments."""
    return {
        "model": args.model,
        "load_format": args.load_format,
        "hf_overrides": args.hf_overrides,
        "dtype": args.dtype,
        "seed": args.seed,
        "num_threads": args.threads,
    }


def _cmd_generate(args: argparse.Namespace) -> int:
    from pdserve.engine import LLM, SamplingParams

    prompts: list[Any] = list(args.prompt)
    if args.prompt_token_ids:
        prompts.append(args.prompt_token_ids)
    if not prompts:
        print("pdserve generate: give a prompt, or --prompt-token-ids 1,2,3", file=sys.stderr)
        return 2
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sample_seed,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(**_engine_args(args), quantization=args.quantization)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    n = 0
    for out in outs:
        c = out.outputs[0]
        n += len(c.token_ids)
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": out.prompt,
                        "prompt_token_ids": out.prompt_token_ids,
                        "text": c.text,
                        "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason,
                    }
                )
            )
        else:
            shown = out.prompt if out.prompt is not None else out.prompt_token_ids
            print(f"prompt: {shown!r}")
            print(f"output: {c.text!r}" if llm.tokenizer is not None else f"output token ids: {c.token_ids}")
            print(f"finish_reason: {c.finish_reason}")
    print(f"{n} tokens in {seconds:.2f}s ({n / seconds:.1f} tok/s)", file=sys.stderr)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pdserve.engine import LLM
    from pdserve.engine.quantization.checkpoint import write_quantized_checkpoint

    llm = LLM(**_engine_args(args), quantization=args.quantization, kv_cache_blocks=1)
    sizes = write_quantized_checkpoint(llm.engine, args.out)
    q = llm.engine.quantization
    print(
        f"wrote {args.out}: {q.method} (group {q.group}, lm_head {q.lm_head}"
        + (f", code {q.code}" if q.method == "wint2" else "")
        + "), quantized layers "
        f"{sizes['packed_bytes'] / 2**20:.1f} MiB (fp32 {sizes['fp32_bytes'] / 2**20:.1f} MiB, "
        f"{sizes['packed_bytes'] / sizes['fp32_bytes']:.3f}x)"
    )
    return 0


def _bench_output(args: argparse.Namespace, suite: str) -> Path:
    """--output, or bench-results/<suite>-<timestamp>.json."""
    return args.output or Path("bench-results") / f"{suite}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _cmd_bench_engine(args: argparse.Namespace) -> int:
    from pdserve.bench.engine_bench import EngineBenchArgs, run_engine_bench

    bench_args = EngineBenchArgs(
        model=args.model,
        load_format=args.load_format,
        hf_overrides=args.hf_overrides,
        dtype="float32" if args.dtype == "auto" else args.dtype,
        batches=tuple(args.batch),
        input_len=args.input_len,
        output_len=args.output_len,
        threads=args.threads,
        seed=args.seed,
        skip_transformers=args.skip_transformers,
        speculative_configs=tuple(args.speculative_config),
        workload=args.workload,
        repeats=args.repeats,
        quantizations=tuple(args.quantization),
    )
    output = _bench_output(args, "engine")
    if args.workload == "json":
        from pdserve.bench.guided_bench import run_guided_bench

        run_guided_bench(bench_args, output)
        return 0
    run_engine_bench(bench_args, output)
    return 0


def _cmd_bench_context_cache(args: argparse.Namespace) -> int:
    from pdserve.bench.context_cache_bench import ContextCacheBenchArgs, run_context_cache_bench

    bench_args = ContextCacheBenchArgs(
        model=args.model, load_format=args.load_format, prefix_tokens=args.prefix_tokens,
        threads=args.threads, redis_url=args.redis_url, repeats=args.repeats,
    )  # fmt: skip
    run_context_cache_bench(bench_args, _bench_output(args, "context-cache"))
    return 0


def _cmd_bench_quant_accuracy(args: argparse.Namespace) -> int:
    from pdserve.bench.quant_accuracy_bench import QuantAccuracyArgs, run_quant_accuracy_bench

    bench_args = QuantAccuracyArgs(model=args.model, windows=args.windows, prompts=args.prompts,
                                   peers=not args.skip_peers)  # fmt: skip
    if args.scheme:
        bench_args.schemes = tuple(args.scheme)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_quant_accuracy_bench(bench_args, _bench_output(args, "quant-accuracy"))
    return 0


def _cmd_bench_kv_transfer(args: argparse.Namespace) -> int:
    import torch

    from pdserve.bench.kv_transfer_bench import KVTransferBenchArgs, run_kv_transfer_bench

    if args.backend == "nccl" and not torch.cuda.is_available():
        print("error: --backend nccl needs a CUDA GPU on this machine; use --backend gloo", file=sys.stderr)
        return 2
    bench_args = KVTransferBenchArgs(
        model=args.model,
        backend=args.backend,
        blocks=tuple(args.blocks),
        block_size=args.block_size,
        dtype=args.dtype,
        repeats=args.repeats,
    )
    output = _bench_output(args, "kv-transfer")
    run_kv_transfer_bench(bench_args, output)
    return 0


def _cmd_bench_router(args: argparse.Namespace) -> int:
    from pdserve.bench.router_bench import RouterBenchArgs, run_router_bench

    bench_args = RouterBenchArgs(
        workers=args.workers,
        index_blocks=args.index_blocks,
        prompt_tokens=args.prompt_tokens,
        redis_url=args.redis_url or None,
        concurrency=args.concurrency,
        duration=args.duration,
        skip_cluster=args.skip_cluster,
    )
    output = _bench_output(args, "router")
    run_router_bench(bench_args, output)
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from pdserve.bench.serve_bench import ServeBenchArgs, run_serve_bench

    bench_args = ServeBenchArgs(
        url=args.url.rstrip("/"),
        concurrency=tuple(args.concurrency),
        workload=args.workload,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        api_key=args.api_key,
        seed=args.seed,
        prefix_words=args.prefix_words,
        num_prefixes=args.num_prefixes,
        compare_layouts=args.compare_layouts,
        compare_context_cache=args.compare_context_cache,
        context_cache_url=args.context_cache_url,
        kv_cache_blocks=args.kv_cache_blocks,
        model=args.model,
        overhead_probes=args.overhead_probes,
        baseline_url=args.baseline_url.rstrip("/") if args.baseline_url else None,
        baseline_label=args.baseline_label,
        engine_throughput=not args.skip_engine,
        worker_cores=args.worker_cores,
    )
    output = _bench_output(args, "serve")
    try:
        run_serve_bench(bench_args, output)
    except (ConnectionError, RuntimeError) as e:
        print(f"pdserve bench serve: error: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_bench_planner(args: argparse.Namespace) -> int:
    if not args.simulate:
        print(
            "pdserve bench planner: this suite simulates (add --simulate); the planner of a running "
            "cluster is measured by `pdserve bench serve --workload shifting`",
            file=sys.stderr,
        )
        return 2
    from pdserve.bench.planner_bench import PlannerBenchArgs, run_planner_bench
    from pdserve.cluster.planner import RolePlannerConfig
    from pdserve.config import settings_group

    try:
        planner = settings_group(RolePlannerConfig, args.role_planner)
    except ValueError as e:
        raise ValueError(f"--role-planner: {e}") from None
    bench_args = PlannerBenchArgs(
        workers=tuple(args.workers),
        phase_s=args.phase_s,
        load=args.load,
        seed=args.seed,
        planner=planner,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_itl_ms=args.slo_itl_ms,
    )
    run_planner_bench(bench_args, _bench_output(args, "planner"))
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    # The same settings as `up` (flags, PDSERVE_* variables, --config file), checked before Ray loads.
    settings = load_config(flags_given(args), os.environ, args.config)

    import asyncio
    import gc
    import logging

    import ray

    from pdserve.cluster.controller import CONTROLLER_NAME
    from pdserve.launcher import router_config
    from pdserve.router.server import start_router

    config = router_config(settings)
    address = settings.address or "auto"  # the router joins a running cluster, never starts one
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ray.init(address=address, namespace=args.namespace, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise ValueError(
            f"cannot join Ray at {address!r} ({e}); start the cluster first or fix --address"
        ) from None
    try:
        controller = ray.get_actor(args.controller or CONTROLLER_NAME)
    except ValueError:
        raise ValueError(
            f"no controller actor named {args.controller or CONTROLLER_NAME!r}; is the cluster up?"
        ) from None

    async def serve() -> None:
        router = await start_router(controller, config)
        gc.freeze()  # start-up objects out of the collector's reach, as in `pdserve up` (launcher.py)
        if args.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, addr=config.host, registry=router.service.metrics.registry)
        print(f"pdserve router listening on {config.host}:{router.port} (policy {config.policy})", flush=True)
        await router.server.wait_for_termination()

    asyncio.run(serve())
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    # Checked before the launcher (and torch, Ray) is imported: a bad setting starts nothing.
    settings = load_config(flags_given(args), os.environ, args.config)

    from pdserve.cluster_state import ClusterStateError
    from pdserve.launcher import LaunchError, up

    try:
        return up(settings)
    except (LaunchError, ClusterStateError) as e:
        print(f"pdserve up: error: {e}", file=sys.stderr)
        return 1


def _up_settings(args: argparse.Namespace):
    """The settings `up` was started with, found the way `up` finds them: the state dir from
    --state-dir, else PDSERVE_STATE_DIR, else `state_dir` in the --config / PDSERVE_CONFIG file,
    else ~/.pdserve; the API key from PDSERVE_API_KEY or the file."""
    flags = {} if args.state_dir is None else {"state_dir": args.state_dir}
    return load_config(flags, os.environ, args.config)


def _on_cluster(command: str, args: argparse.Namespace, act) -> int:
    """Runs `act(settings)` against a running cluster (settings found as `up` finds them), prints
    what it returns, and turns a ClusterStateError into one line on stderr and exit code 1.

    cluster_state, not the launcher: these commands must not pay for importing torch and Ray."""
    from pdserve.cluster_state import ClusterStateError

    try:
        shown = act(_up_settings(args))
    except ClusterStateError as e:
        print(f"pdserve {command}: {e}", file=sys.stderr)
        return 1
    if shown is not None:
        print(shown)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from pdserve.cluster_state import down

    return _on_cluster("down", args, lambda settings: down(settings.state_dir, args.name))


def _cmd_status(args: argparse.Namespace) -> int:
    from pdserve.cluster_state import listing, status

    def show(settings) -> str:
        if args.all:
            return listing(settings.state_dir)
        return status(settings.state_dir, args.name, settings.api_key)

    return _on_cluster("status", args, show)


def _cmd_role(args: argparse.Namespace) -> int:
    from pdserve.cluster_state import set_role

    return _on_cluster(
        "role",
        args,
        lambda s: set_role(s.state_dir, args.name, args.worker_id, args.role, s.admin_key or s.api_key),
    )


def _cmd_planner(args: argparse.Namespace) -> int:
    from pdserve.cluster_state import planner

    return _on_cluster(
        "planner", args, lambda s: planner(s.state_dir, args.name, args.action, s.admin_key or s.api_key)
    )


def _cmd_worker_action(args: argparse.Namespace) -> int:
    from pdserve.cluster_state import worker_action

    return _on_cluster(
        args.command,
        args,
        lambda s: worker_action(
            s.state_dir, args.name, args.worker_id, args.command, s.admin_key or s.api_key
        ),
    )


def _cmd_policy(args: argparse.Namespace) -> int:
    from pdserve.cluster_state import set_policy

    return _on_cluster(
        "policy", args, lambda s: set_policy(s.state_dir, args.name, args.policy, s.admin_key or s.api_key)
    )


class FlagError(SystemExit):
    """A flag argparse refused, already reported in one line; exit code 2."""

    def __init__(self) -> None:
        super().__init__(2)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump), so `main` can return 2 instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise FlagError


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pdserve", description="Prefill/decode-disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_quantize(sub)
    _add_cluster_commands(sub)
    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    for add in (
        _add_bench_engine,
        _add_bench_quant_accuracy,
        _add_bench_kv_transfer,
        _add_bench_context_cache,
        _add_bench_ep,
        _add_bench_router,
        _add_bench_serve,
        _add_bench_planner,
        _add_bench_chaos,
        _add_bench_local_prefill,
    ):
        add(bench_sub)
    return parser


_QUANTIZATION_HELP = (
    "weight-only quantization: wint8, wint4, wint2, or a JSON object of method, group_size, lm_head "
    "(and code for wint2: hybrid, ccq or plain)"
)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="offline generation with one engine")
    _add_model_args(gen)
    gen.add_argument("--quantization", default=None, help=_QUANTIZATION_HELP)
    gen.add_argument("prompt", nargs="*", help="text prompts (need a model with tokenizer files)")
    gen.add_argument("--prompt-token-ids", type=_int_list("--prompt-token-ids"), default=None)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=_cmd_generate)


def _add_quantize(sub) -> None:
    q = sub.add_parser(
        "quantize",
        help="write a weight-only quantized checkpoint (safetensors + quantization_config) of a model",
    )
    q.add_argument("model", help="checkpoint directory or bundled model name (full precision)")
    q.add_argument("out", type=Path, help="new directory for the quantized checkpoint")
    q.add_argument("--quantization", required=True, help=_QUANTIZATION_HELP)
    q.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    q.add_argument("--hf-overrides", type=_json_dict("--hf-overrides"), default={})
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None, help="threads for the encoder (default: torch's)")
    q.set_defaults(func=_cmd_quantize, dtype="auto")


def _add_cluster_commands(sub) -> None:
    """`up`, `down`, `status` and `router`: their settings come from the one schema (pdserve.config)."""
    up_p = sub.add_parser(
        "up",
        help="start the cluster: Ray, controller, workers, router, gateway",
        description="Settings come from flags, else PDSERVE_* environment variables, else the --config "
        "YAML file, else the defaults; the names are the same in all three.",
        allow_abbrev=False,  # exact names only, as in the environment and the file
    )
    add_flags(up_p)
    up_p.set_defaults(func=_cmd_up)
    down_p = sub.add_parser("down", help="stop what `pdserve up` started")
    status_p = sub.add_parser("status", help="workers, roles, load and KV use of the running cluster")
    role_p = sub.add_parser(
        "role",
        help="switch a worker's role in place (its running requests move live to other workers)",
    )
    role_p.add_argument("worker_id", help="a worker id from `pdserve status`")
    role_p.add_argument("role", choices=["prefill", "decode", "both"])
    planner_p = sub.add_parser("planner", help="pause, resume or show the role planner")
    planner_p.add_argument("action", choices=["pause", "resume", "status"])
    worker_ps = []
    for action, what in (
        ("drain", "stop giving a worker new work (it finishes what it holds)"),
        ("undrain", "give a drained worker new work again"),
        ("restart", "kill a worker and start a replacement in its slot (its requests continue elsewhere)"),
    ):
        worker_p = sub.add_parser(action, help=what)
        worker_p.add_argument("worker_id", help="a worker id from `pdserve status`")
        worker_ps.append((worker_p, _cmd_worker_action))
    policy_p = sub.add_parser("policy", help="change the router's placement policy")
    policy_p.add_argument("policy", choices=list(POLICIES))
    for p, func in (
        (down_p, _cmd_down),
        (status_p, _cmd_status),
        (role_p, _cmd_role),
        (planner_p, _cmd_planner),
        *worker_ps,
        (policy_p, _cmd_policy),
    ):
        # The settings `up` was started with say where it keeps its state.
        p.add_argument("--state-dir", default=None, help="where `up` recorded what it started")
        p.add_argument(
            "--config", type=Path, default=None, metavar="FILE", help="the YAML file `up` was given"
        )
        p.add_argument("--name", default=None, help="which cluster (default: the only one running)")
        p.set_defaults(func=func)
    status_p.add_argument("--all", action="store_true", help="list every running cluster instead")

    router = sub.add_parser(
        "router",
        help="run the gRPC router standalone (joins a running cluster)",
        description="Settings as for `up` (flags, PDSERVE_* variables, --config file); --port is --router-port.",
        allow_abbrev=False,
    )
    add_flags(
        router,
        ("name", "host", "router_port", "policy", "redis_url", "address", "api_key"),
        {"router_port": "--port"},
    )
    router.add_argument("--namespace", default="pdserve", help="Ray namespace the controller lives in")
    router.add_argument("--controller", default=None, help="controller actor name")
    router.add_argument(
        "--metrics-port",
        type=_int_at_least("--metrics-port", 1),
        default=None,
        help="serve Prometheus metrics here",
    )
    router.set_defaults(func=_cmd_router)


def _add_bench_quant_accuracy(bench_sub) -> None:
    qa = bench_sub.add_parser(
        "quant-accuracy",
        help="loss and greedy agreement of each weight-only scheme against fp32 on held-out data",
    )
    qa.add_argument("--model", default="demo", help="a checkpoint trained by training/ (its held-out split)")
    qa.add_argument("--windows", type=_int_at_least("--windows", 1), default=8, help="512-token loss windows")
    qa.add_argument("--prompts", type=_int_at_least("--prompts", 1), default=16, help="agreement prefixes")
    qa.add_argument("--skip-peers", action="store_true", help="leave torchao's schemes out")
    qa.add_argument(
        "--scheme",
        action="append",
        default=None,
        help="a scheme to measure (repeatable; a name or a JSON object as for --quantization); "
        "default: the wint8/wint4/wint2 variants of the closing comparison",
    )
    qa.add_argument("--threads", type=int, default=None)
    qa.add_argument("--output", type=Path, default=None, help="JSON path")
    qa.set_defaults(func=_cmd_bench_quant_accuracy)


def _add_bench_engine(bench_sub) -> None:
    eng = bench_sub.add_parser("engine", help="engine tokens/s beside transformers' generate")
    _add_model_args(eng)
    eng.add_argument("--batch", type=_int_list("--batch"), default=[1, 8, 32])
    eng.add_argument("--input-len", type=int, default=128)
    eng.add_argument("--output-len", type=int, default=128)
    eng.add_argument(
        "--output", type=Path, default=None, help="JSON path (default bench-results/engine-*.json)"
    )
    eng.add_argument("--skip-transformers", action="store_true")
    eng.add_argument(
        "--quantization",
        type=_scheme_list,
        default=[],
        help="compare weight-only schemes beside full precision, e.g. fp32,wint8,wint4,wint2 (each "
        "quantized once into a checkpoint that every round loads; transformers is skipped)",
    )
    eng.add_argument(
        "--speculative-config",
        type=_json_dict("--speculative-config"),
        action="append",
        default=[],
        help='JSON object, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'; repeat to '
        "compare several; each runs beside the same workload without speculation",
    )
    eng.add_argument(
        "--workload",
        choices=["random", "code", "json"],
        default="random",
        help="prompts: random token ids, or openings of Python stdlib files (needs a tokenizer); json: "
        "random prompts decoded under a JSON schema beside the same unguided, and the schema's compile time",
    )
    eng.add_argument(
        "--repeats",
        type=_int_at_least("--repeats", 1),
        default=3,
        help="rounds per batch size (new prompts each, every system in a fresh process, taking turns), pooled",
    )
    eng.set_defaults(func=_cmd_bench_engine)


def _add_bench_context_cache(bench_sub) -> None:
    cc = bench_sub.add_parser(
        "context-cache", help="a long prefix's KV loaded from Redis beside recomputing it and a local copy"
    )
    cc.add_argument("--model", default="ernie-4.5-0.3b", help="the engine's model")
    cc.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default="dummy")
    cc.add_argument("--prefix-tokens", type=_int_at_least("--prefix-tokens", 16), default=2048)
    cc.add_argument("--threads", type=_int_at_least("--threads", 1), default=2, help="the engine's threads")
    cc.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="the Redis holding the blocks")
    cc.add_argument("--repeats", type=_int_at_least("--repeats", 1), default=3, help="rounds (new prompts)")
    cc.add_argument(
        "--output", type=Path, default=None, help="JSON path (default bench-results/context-cache-*.json)"
    )
    cc.set_defaults(func=_cmd_bench_context_cache)


def _cmd_bench_ep(args: argparse.Namespace) -> int:
    from pdserve.bench.ep_bench import EPBenchArgs, run_ep_bench

    bench_args = EPBenchArgs(
        model=args.model,
        load_format=args.load_format,
        hf_overrides=args.hf_overrides,
        sizes=tuple(args.ep),
        batches=tuple(args.batch),
        input_len=args.input_len,
        output_len=args.output_len,
        total_threads=args.threads or 2,
        num_redundant_experts=args.num_redundant_experts,
        worker_memory_gb=args.worker_memory_gb,
        repeats=args.repeats,
        seed=args.seed,
        split_dense=not args.no_split_dense,
    )
    run_ep_bench(bench_args, _bench_output(args, "ep"))
    return 0


def _add_bench_ep(bench_sub) -> None:
    ep = bench_sub.add_parser(
        "ep",
        help="expert-parallel groups of several sizes: RSS per rank, decode tok/s, dispatch share, balance",
    )
    _add_model_args(ep)
    ep.add_argument("--ep", type=_int_list("--ep"), default=[1, 2, 4], help="group sizes to compare")
    ep.add_argument("--batch", type=_int_list("--batch"), default=[1, 8, 32])
    ep.add_argument("--input-len", type=_int_at_least("--input-len", 4), default=32)
    ep.add_argument("--output-len", type=_int_at_least("--output-len", 2), default=16)
    ep.add_argument(
        "--repeats",
        type=_int_at_least("--repeats", 1),
        default=3,
        help="decode rounds per size and batch (median)",
    )
    ep.add_argument(
        "--num-redundant-experts",
        type=int,
        default=None,
        help="spare slots for the balance run (default: EP size)",
    )
    ep.add_argument(
        "--no-split-dense",
        action="store_true",
        help="every rank holds the LM head, embedding and dense MLPs whole (expert_parallel.split_dense false), for comparison",
    )
    ep.add_argument(
        "--worker-memory-gb",
        type=float,
        default=None,
        help="refuse sizes whose ranks' weights exceed this (GiB); mark which fit by peak RSS",
    )
    ep.add_argument("--output", type=Path, default=None, help="JSON path (default bench-results/ep-*.json)")
    ep.set_defaults(func=_cmd_bench_ep)


def _add_bench_kv_transfer(bench_sub) -> None:
    kv = bench_sub.add_parser(
        "kv-transfer", help="KV block transfer between two processes beside a local copy"
    )
    kv.add_argument("--model", default="ernie-4.5-0.3b", help="model whose KV block shape is used")
    kv.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    kv.add_argument("--blocks", type=_int_list("--blocks"), default=[1, 8, 32, 128])
    kv.add_argument("--block-size", type=_int_at_least("--block-size", 1), default=16)
    kv.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    kv.add_argument("--repeats", type=_int_at_least("--repeats", 1), default=10)
    kv.add_argument(
        "--output", type=Path, default=None, help="JSON path (default bench-results/kv-transfer-*.json)"
    )
    kv.set_defaults(func=_cmd_bench_kv_transfer)


def _add_bench_router(bench_sub) -> None:
    rb = bench_sub.add_parser(
        "router", help="router decision time, requests/s through one router, prefix hit rate per policy"
    )
    rb.add_argument(
        "--workers",
        type=_int_at_least("--workers", 1),
        default=64,
        help="synthetic prefill workers for the decision time",
    )
    rb.add_argument(
        "--index-blocks",
        type=_int_at_least("--index-blocks", 1),
        default=100_000,
        help="(worker, block) entries in the index",
    )
    rb.add_argument(
        "--prompt-tokens",
        type=_int_at_least("--prompt-tokens", 16),
        default=2048,
        help="prompt length for the decision time (at least one 16-token KV block, to reach the index)",
    )
    rb.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for the Redis index row ('' skips it)"
    )
    rb.add_argument(
        "--concurrency",
        type=_int_at_least("--concurrency", 1),
        default=8,
        help="concurrent gRPC clients for requests/s",
    )
    rb.add_argument(
        "--duration", type=_positive_float("--duration"), default=10.0, help="seconds per requests/s row"
    )
    rb.add_argument("--skip-cluster", action="store_true", help="skip requests/s (no Ray cluster)")
    rb.add_argument(
        "--output", type=Path, default=None, help="JSON path (default bench-results/router-*.json)"
    )
    rb.set_defaults(func=_cmd_bench_router)


def _add_bench_serve(bench_sub) -> None:
    sb = bench_sub.add_parser(
        "serve", help="TTFT/TPOT/ITL/latency, throughput and goodput over the OpenAI HTTP API"
    )
    sb.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the gateway (ignored with --compare-layouts)"
    )
    sb.add_argument("--concurrency", type=_int_list("--concurrency"), default=[1, 4, 16])
    sb.add_argument(
        "--workload",
        choices=["chat", "shared-prefix", "long-document", "json", "shifting"],
        default="chat",
        help="json: the chat questions answered free, then under a JSON schema (response_format), side by "
        "side; shifting: prefill-heavy, decode-heavy, then mixed load against static splits of 4 workers "
        "and the role planner (needs --model; starts its own clusters)",
    )
    sb.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level")
    sb.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (EOS ignored)")
    sb.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    sb.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT at most this")
    sb.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    sb.add_argument("--seed", type=int, default=0, help="prompt set seed")
    sb.add_argument(
        "--prefix-words",
        type=int,
        default=300,
        help="shared-prefix: system prompt words; long-document: words",
    )
    sb.add_argument(
        "--num-prefixes",
        type=int,
        default=1,
        help="shared-prefix/long-document: distinct prefixes to pick from",
    )
    sb.add_argument(
        "--compare-context-cache",
        action="store_true",
        help="start 1 prefill + 1 decode twice, the Redis context cache off and on; run the workload on each",
    )
    sb.add_argument(
        "--context-cache-url",
        default="redis://127.0.0.1:6379/15",
        help="--compare-context-cache: the Redis for the blocks (its pdserve:ctx:* keys are deleted first)",
    )
    sb.add_argument(
        "--kv-cache-blocks", type=int, default=None, help="KV blocks per worker of the clusters it starts"
    )
    sb.add_argument(
        "--worker-cores",
        type=float,
        default=None,
        help="shifting: limit each worker to this many CPUs (a cgroup quota), as if each had its own device; "
        "on a machine with fewer cores than workers a split otherwise changes batching, not capacity",
    )
    sb.add_argument(
        "--compare-layouts",
        action="store_true",
        help="start `pdserve up` with 1 prefill + 1 decode, then 2 both workers; run the workload on each",
    )
    sb.add_argument(
        "--model", default=None, help="the served model: started by --compare-layouts; enables the overhead"
    )
    sb.add_argument(
        "--overhead-probes",
        type=int,
        default=8,
        help="one-token requests timed for the overhead (with --model)",
    )
    sb.add_argument(
        "--baseline-url",
        default=None,
        help="another OpenAI-compatible server on the same model (e.g. `vllm serve`): every level runs on it "
        "too, level by level beside pdserve",
    )
    sb.add_argument("--baseline-label", default="baseline", help="the baseline's name in the tables")
    sb.add_argument(
        "--skip-engine", action="store_true", help="with --model: skip the engine-alone tokens/s per level"
    )
    sb.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON path, PNG beside it (default bench-results/serve-*.json)",
    )
    sb.set_defaults(func=_cmd_bench_serve)


def _add_bench_planner(bench_sub) -> None:
    pb = bench_sub.add_parser(
        "planner",
        help="the role planner against static prefill/decode splits on a shifting workload (--simulate)",
        description="Simulates the shifting workload (long prompts, short answers; short prompts, long "
        "answers; mixed) with a cost model measured on the demo model: static splits of a quarter, "
        "half and three quarters prefill workers, and the planner from half and half.",
    )
    pb.add_argument("--simulate", action="store_true", help="run the discrete-event simulation")
    pb.add_argument(
        "--workers", type=_int_list("--workers", 2), default=[64, 4], help="cluster sizes to simulate"
    )
    pb.add_argument("--phase-s", type=_positive_float("--phase-s"), default=120.0, help="seconds per phase")
    pb.add_argument(
        "--load",
        type=_positive_float("--load"),
        default=0.75,
        help="each phase's arrival rate, as a share of what its best static split sustains",
    )
    pb.add_argument("--seed", type=int, default=0, help="workload seed")
    pb.add_argument(
        "--role-planner",
        type=_json_dict("--role-planner"),
        default={},
        help="planner settings as for `pdserve up --role-planner`, e.g. '{\"interval_s\": 2}'",
    )
    pb.add_argument(
        "--slo-ttft-ms", type=float, default=None, help="goodput's TTFT (default: ttft_target_ms)"
    )
    pb.add_argument("--slo-itl-ms", type=float, default=None, help="goodput's ITL (default: itl_target_ms)")
    pb.add_argument(
        "--output", type=Path, default=None, help="JSON path (default bench-results/planner-*.json)"
    )
    pb.set_defaults(func=_cmd_bench_planner)


def _cmd_bench_chaos(args: argparse.Namespace) -> int:
    from pdserve.bench.chaos_bench import ChaosArgs, run_chaos_bench

    bench_args = ChaosArgs(
        model=args.model, duration_s=args.duration_s, concurrency=args.concurrency,
        max_tokens=args.max_tokens, prompts=args.prompts, cancels=args.cancels, seed=args.seed,
    )  # fmt: skip
    report = run_chaos_bench(bench_args, _bench_output(args, "chaos"))
    clean = not report.failed_by_status and report.exact_passed == report.exact_checked
    return 0 if clean and not any(report.leaked_blocks.values()) else 1


def _add_bench_chaos(bench_sub) -> None:
    pc = bench_sub.add_parser(
        "chaos",
        help="a bounded load while workers are killed and Redis restarts, then cancelled streams",
        description="Starts 2 prefill + 2 decode workers with a private Redis, runs greedy completions "
        "while killing a decode worker, a prefill worker, stopping and starting Redis and killing a "
        "decode worker again; checks every answer against the fault-free one; then cancels streams. "
        "Reports failures by status, recovery times, fds/threads per worker and leaked KV blocks; "
        "exits 1 if any request failed, any answer differed or any block leaked.",
    )
    pc.add_argument("--model", default="demo", help="checkpoint directory or bundled model name")
    pc.add_argument(
        "--duration-s", type=_positive_float("--duration-s"), default=60.0, help="seconds of load"
    )
    pc.add_argument("--concurrency", type=_int_at_least("--concurrency", 1), default=6, help="clients")
    pc.add_argument(
        "--max-tokens", type=_int_at_least("--max-tokens", 1), default=32, help="tokens per answer"
    )
    pc.add_argument("--prompts", type=_int_at_least("--prompts", 1), default=12, help="distinct prompts")
    pc.add_argument(
        "--cancels", type=_int_at_least("--cancels", 0), default=500, help="streams cancelled after the load"
    )
    pc.add_argument("--seed", type=int, default=0, help="prompt and victim seed")
    pc.add_argument(
        "--output", type=Path, default=None, help="JSON path (default bench-results/chaos-*.json)"
    )
    pc.set_defaults(func=_cmd_bench_chaos)


def _cmd_bench_local_prefill(args: argparse.Namespace) -> int:
    from pdserve.bench.local_prefill_bench import LocalPrefillArgs, run_local_prefill_bench

    bench_args = LocalPrefillArgs(
        model=args.model,
        lengths=tuple(args.lengths),
        probes=args.probes,
        background=args.background,
        seed=args.seed,
    )
    run_local_prefill_bench(bench_args, _bench_output(args, "local-prefill"))
    return 0


def _add_bench_local_prefill(bench_sub) -> None:
    pl = bench_sub.add_parser(
        "local-prefill",
        help="conditional disaggregation: TTFT and decode ITL with prompts computed locally vs transferred",
        description="Runs 1 prefill + 1 decode twice (every prompt transferred; every prompt computed on the "
        "decode worker) and measures, per prompt length, TTFT idle and under background decoding, and the "
        "background streams' inter-token latency.",
    )
    pl.add_argument("--model", default="demo", help="checkpoint directory or bundled model name")
    pl.add_argument(
        "--lengths", type=_int_list("--lengths"), default=[16, 64, 128, 256, 512], help="prompt words"
    )
    pl.add_argument(
        "--probes", type=_int_at_least("--probes", 1), default=6, help="requests per length and mode"
    )
    pl.add_argument(
        "--background", type=_int_at_least("--background", 0), default=4, help="streams decoding meanwhile"
    )
    pl.add_argument("--seed", type=int, default=0, help="prompt seed")
    pl.add_argument(
        "--output", type=Path, default=None, help="JSON path (default bench-results/local-prefill-*.json)"
    )
    pl.set_defaults(func=_cmd_bench_local_prefill)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except FlagError:
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input from the user: one clear line, no traceback.
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
