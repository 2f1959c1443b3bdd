"""`pdserve up / down / status`: the whole cluster on one command.

`up` starts a local Ray instance on loopback (or joins one with `--address`), the controller
and its workers as Ray actors, and the router and the gateway in its own event loop; it serves
in the foreground, like `vllm serve`, until Ctrl-C or `pdserve down` (SIGTERM to the pid in its
record, `pdserve.cluster_state`), and then stops everything it started. `status` and `down` live
in `pdserve.cluster_state`, which imports none of this. Every start-up error (port in use, bad model, unreachable Ray or Redis) is one line and a
non-zero exit, with whatever was started torn down again.

(`ray start` was the first idea, so the cluster could outlive the command: in Ray 2.60 it
binds the node to the machine's external address whatever `--node-ip-address` says, and we
run Ray on loopback only.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import uvloop

from pdserve.cluster.controller import CONTROLLER_NAME, ControllerConfig, start_controller
from pdserve.cluster.core_plan import CorePlan, plan_cores
from pdserve.cluster_state import ClusterRecord, claim, remove_record, running, write_record
from pdserve.config import ClusterConfig, env_name
from pdserve.engine.engine_config import EngineConfig
from pdserve.roles.cpu_binding import bind_this_process, can_bind

if TYPE_CHECKING:
    from pdserve.engine.served_model import ServedModel
    from pdserve.gateway.config import GatewayConfig
    from pdserve.router.config import RouterConfig

NAMESPACE = "pdserve"
# What a single-machine cluster's own parts bind and dial: Ray, the workers' KV transfer, the router.
LOOPBACK = "127.0.0.1"
# Ray starts its worker processes at nice 15, as background work; here they are the engines, and at
# 15 every nice-0 process on the machine (the gateway, anything else running) outweighs them 29 to 1
# for the CPU. A Ray cluster that `up` joins (--address) keeps its own setting.
WORKER_NICENESS = 0
KEY_ENV = env_name("api_key")  # PDSERVE_API_KEY: what the start-up lines show instead of the key


class LaunchError(RuntimeError):
    """`pdserve up` cannot start the cluster; the message says why and what to change."""


def engine_config(c: ClusterConfig) -> EngineConfig:
    """The engine every worker hosts, from the cluster settings (the controller drops the
    expert-parallel group from it for the slots `expert_parallel.roles` leaves plain)."""
    # Every worker gets the same engine, speculation included: roles switch at run time without
    # reloading, and with MTP the layer's KV travels in the handoff, so both sides must have it
    # (a prefill worker feeds it while computing prompts; only decoding guesses).
    return EngineConfig(
        model=c.model, load_format=c.load_format, hf_overrides=dict(c.hf_overrides), dtype=c.dtype,
        device=c.device, seed=c.seed, kv_cache_blocks=c.kv_cache_blocks, progress=False,
        num_threads=c.threads or 1,  # several workers share the machine's cores
        cpu_gemm=c.cpu_gemm,
        speculative_config=c.speculative_config, context_cache=c.context_cache, quantization=c.quantization,
        expert_parallel=c.expert_parallel.group,
    )  # fmt: skip


def controller_config(c: ClusterConfig) -> ControllerConfig:
    """The controller's settings; ValueError (nothing started yet) when they cannot work.

    Each worker's CPU share is set once Ray says what the cluster has (`worker_cpus`)."""
    return ControllerConfig(
        engine_config(c), prefill=c.prefill, decode=c.decode, both=c.both, role_planner=c.role_planner,
        expert_parallel_roles=c.expert_parallel.roles,
        # Joined to a Ray cluster, workers may be on other machines: each listens on its node's address.
        kv_host=None if c.address else LOOPBACK,
    )  # fmt: skip


# A worker's smallest CPU share: below it, engines on one core starve each other's steps.
MIN_WORKER_CPUS = 0.25
# How long `up` waits for every worker to load before it gives up with the reason.
WORKER_READY_TIMEOUT_S = 300.0
# A joined Ray cluster's resources are asked this often while its nodes join, and said this often.
NODES_POLL_S = 1.0
NODES_WAIT_SAY_S = 15.0
# How often the start-up line asks the workers what they are doing.
PROGRESS_INTERVAL_S = 0.5


def worker_cpus(c: ClusterConfig, resources: dict[str, float], on_gpu: bool) -> float:
    """Each worker's Ray CPU request, so that every worker fits the cluster at once.

    Every worker asks Ray for a whole CPU where there are enough, else for an equal share (Ray
    schedules fractions): asking for more than exists would leave workers waiting for ever.
    Raises LaunchError naming the numbers and the flags when they cannot fit.
    """
    n = c.prefill + c.decode + c.both
    if on_gpu and n > resources.get("GPU", 0):
        raise LaunchError(
            f"{n} GPU workers need {n} GPUs (one each) and the Ray cluster has {resources.get('GPU', 0):g}; "
            "lower --prefill/--decode/--both or add GPU nodes"
        )
    cpus = resources.get("CPU", 0.0)
    if cpus < n * MIN_WORKER_CPUS:
        raise LaunchError(
            f"{n} workers need at least {n * MIN_WORKER_CPUS:g} CPUs ({MIN_WORKER_CPUS:g} each) and the "
            f"Ray cluster has {cpus:g}; lower --prefill/--decode/--both"
        )
    return min(1.0, cpus / n)


def joined_worker_cpus(
    c: ClusterConfig, on_gpu: bool, cluster_resources: Callable[[], dict[str, float]], echo,
    timeout_s: float = WORKER_READY_TIMEOUT_S, sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> float:  # fmt: skip
    """`worker_cpus` for a Ray cluster this process joined, whose nodes may still be joining: a
    Kubernetes head starts beside its worker pods, not after them. It waits (saying so every
    NODES_WAIT_SAY_S) until the workers fit, and raises the LaunchError after `timeout_s`."""
    deadline, said = clock() + timeout_s, None
    while True:
        try:
            return worker_cpus(c, cluster_resources(), on_gpu)
        except LaunchError as e:
            if clock() >= deadline:
                raise LaunchError(f"{e}, after waiting {timeout_s:g} s for Ray nodes to join") from None
            if said is None or clock() - said >= NODES_WAIT_SAY_S:
                echo(f"waiting for Ray nodes to join: {e}")
                said = clock()
        sleep(NODES_POLL_S)


def core_plan(c: ClusterConfig, controllers: ControllerConfig) -> tuple[CorePlan | None, str]:
    """Which cores the workers keep to themselves under `cpu_binding: auto`, and the start-up line
    that says so (or why nothing is bound)."""
    if c.cpu_binding == "off":
        return None, ""
    if c.address or controllers.engine.on_gpu or not can_bind():
        return None, ""  # a joined Ray's nodes are not this machine's; GPU workers wait on the device
    if others := [r.name for r in running(c.state_dir) if r.name != c.name]:
        # Their workers hold cores this process cannot see; binding ours to the same ones would be worse.
        return None, f"cores: not bound, another cluster runs on this machine ({', '.join(others)})"
    threads, cores = controllers.engine.num_threads or 1, sorted(os.sched_getaffinity(0))
    plan = plan_cores(cores, controllers.slots(), threads)
    if plan is None:
        return None, (
            f"cores: not bound, {len(cores)} cores do not give each decode and colocated "
            f"worker {threads} of its own and one for the rest (cpu_binding: off silences this)"
        )
    return plan, plan.describe()


def router_config(c: ClusterConfig) -> RouterConfig:
    """The router's settings, from the cluster settings."""
    from pdserve.router.config import RouterConfig

    return RouterConfig(
        host=c.router_host, port=c.router_port, policy=c.policy, local_prefill_tokens=c.local_prefill_tokens, redis_url=c.redis_url, cluster=c.name,
        api_key=c.api_key, admin_key=c.admin_key,
        slo_ttft_ms=c.role_planner.ttft_target_ms, slo_itl_ms=c.role_planner.itl_target_ms,
    )  # fmt: skip


def router_address(c: ClusterConfig, port: int) -> str:
    """Where clients on this machine (the gateway, `pdserve status`) reach the router."""
    host = LOOPBACK if c.router_host in ("0.0.0.0", "::") else c.router_host
    return f"{host}:{port}"


def gateway_config(c: ClusterConfig, served: ServedModel, router_port: int) -> GatewayConfig:
    """The gateway's settings: the cluster's, with the limits the workers' engines computed."""
    from pdserve.gateway.config import GatewayConfig

    return GatewayConfig(
        router_address=router_address(c, router_port),
        model_name=served.name,
        tokenizer_path=served.tokenizer_path or "",
        max_model_len=served.max_model_len,
        api_key=c.api_key,
        admin_key=c.admin_key,
        max_body_bytes=c.max_body_bytes,
        body_timeout_s=c.body_timeout_s,
        header_timeout_s=c.header_timeout_s,
        keep_alive_timeout_s=c.keep_alive_timeout_s,
        tokenizer_threads=c.tokenizer_threads,
        max_chars_per_token=c.max_chars_per_token,
        metrics_cache_s=c.metrics_cache_s,
    )


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As uvicorn and gRPC bind: connections of a cluster just stopped (TIME_WAIT) do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class _Stopped(BaseException):
    """SIGINT or SIGTERM before the serving loop has its own handlers (a BaseException, so that
    no `except Exception` on the way mistakes it for the step's own failure)."""


def _stop_on_signal(signum: int, frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def up(config: ClusterConfig, echo=print) -> int:
    """Starts the cluster and serves until SIGINT/SIGTERM; returns the exit code."""
    controllers = controller_config(config)  # worker counts, speculative_config
    _check_host(config)
    running(config.state_dir, echo)  # what killed `up`s left behind goes first
    # The name first: a second `up` of a running cluster hears that, not that its port is busy.
    try:
        claim(config.state_dir, config.name, os.getpid())
    except OSError as e:
        raise LaunchError(
            f"state_dir {config.state_dir}: cannot record the cluster there ({e.strerror}); "
            "pick a writable directory with --state-dir"
        ) from None
    # Until the serving loop installs its own: a signal while Ray starts stops cleanly too.
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _start(config, controllers, echo)
    except _Stopped as e:
        raise LaunchError(f"interrupted ({e} while starting); stopped everything it had started") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        remove_record(config.state_dir, config.name, os.getpid())


def _check_host(config: ClusterConfig) -> None:
    """A --host that is not an address of this machine, said as such (not as a busy port)."""
    try:
        infos = socket.getaddrinfo(config.host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchError(
            f"--host {config.host}: not an address ({e.strerror}); use 127.0.0.1 or 0.0.0.0"
        ) from None
    with socket.socket(infos[0][0]) as s:
        try:
            s.bind((config.host, 0))
        except OSError as e:
            raise LaunchError(
                f"--host {config.host}: not an address of this machine ({e.strerror}); use 127.0.0.1 or 0.0.0.0"
            ) from None


def _start(config: ClusterConfig, controllers: ControllerConfig, echo) -> int:
    # Ray's C++ failure handler would answer a SIGTERM during start-up with a stack dump and an
    # abrupt exit (leaving Ray's agents behind); this process handles its signals itself. Set
    # only while `ray` is imported (its constants are read then), so Ray's own processes keep it.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if not config.address:
        # A Ray of our own serves this machine only: its node address is loopback, so that GCS,
        # raylet, agents and every worker listen on loopback alone. (Ray turns a 127.0.0.1 node
        # address into the machine's external one unless it is told not to form multi-machine
        # clusters; the variable is read when `ray` is imported, and Ray's processes inherit it.)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    finally:
        if os.environ.get("RAY_DISABLE_FAILURE_SIGNAL_HANDLER") == "1":
            del os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"]

    from pdserve.engine.engine import check_model
    from pdserve.engine.model_source import resolve_model

    for host, port, flag in (
        (config.host, config.port, "--port"),
        (config.router_host, config.router_port, "--router-port"),
    ):
        if not _port_free(host, port):
            raise LaunchError(f"port {port} on {host} is in use; pick another with {flag}")
    source = resolve_model(config.model)  # ValueError names a bad model right away
    if not source.has_tokenizer:
        raise LaunchError(f"model {source.name!r} has no tokenizer files; the HTTP gateway needs one")
    # Quantization against the layers and the checkpoint's headers against the model, before any
    # worker starts: a worker's failure would only say that it died.
    check_model(controllers.engine)
    if config.redis_url:
        _check_redis(config.redis_url, "--redis-url")
    if config.context_cache.redis_url:
        # Workers would go on without it (recomputing), but a wrong URL at start is a mistake to say.
        _check_redis(config.context_cache.redis_url, "context_cache.redis_url")
    plan, said = core_plan(config, controllers)
    if plan is not None:
        bind_this_process(plan.serving)  # before Ray starts: its processes inherit the cores
        controllers = replace(controllers, slot_cores=plan.slots)
    if said:
        echo(said)
    try:
        try:
            if config.address:
                ray.init(address=config.address, namespace=NAMESPACE, log_to_driver=False)
            else:
                _quiet_ray_auth_notice()
                ray.init(
                    _node_ip_address=LOOPBACK,
                    include_dashboard=False,
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    _system_config={"worker_niceness": WORKER_NICENESS},
                )
        except Exception as e:
            raise LaunchError(f"cannot start or join Ray ({str(e).splitlines()[0]}); check --address") from e
        except SystemExit:  # Ray's own SIGTERM handler, installed while it starts, exits this way
            raise _Stopped("SIGTERM") from None
        for sig in (signal.SIGINT, signal.SIGTERM):  # ours again, in place of Ray's
            signal.signal(sig, _stop_on_signal)
        record = ClusterRecord(config.name, os.getpid(), "", "", "", ray_session_dir=_own_ray_session(config))
        write_record(config.state_dir, record)  # from here a kill -9 leaves something to clean up
        on_gpu = controllers.engine.on_gpu
        if config.address:
            cpus = joined_worker_cpus(config, on_gpu, ray.cluster_resources, echo)
        else:
            cpus = worker_cpus(config, ray.cluster_resources(), on_gpu)
        # uvloop: the gateway's and router's loop does per-token work for every stream (about 9%
        # less CPU in this process under `bench serve`, docs/DECISIONS.md 2026-12-05).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(
                _serve(config, replace(controllers, worker_num_cpus=cpus), record, source.name, echo)
            )
    finally:
        ray.shutdown()


def _own_ray_session(config: ClusterConfig) -> str:
    """The session directory of the Ray this `up` started; empty when it joined a cluster (whose
    processes are not ours to stop)."""
    if config.address:
        return ""
    from ray._private import worker  # no public accessor for the session directory in Ray 2.60

    return worker._global_node.get_session_dir_path()


def _quiet_ray_auth_notice() -> None:
    """Drops Ray's notice that it turned token authentication on for a new local cluster.

    Known and harmless (authentication stays on); it is the one warning of a normal start. Only
    that message goes: Ray's other warnings are kept. (Setting RAY_AUTH_MODE=token instead makes
    Ray 2.60 refuse to start its own cluster without a pre-made token.)
    """
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: "Token authentication is enabled" not in record.getMessage()
    )


def _root_cause(error: BaseException) -> BaseException:
    """The user's error inside Ray's wrappers (a worker's ValueError inside the controller's)."""
    while isinstance(getattr(error, "cause", None), BaseException):
        error = error.cause  # type: ignore[attr-defined]
    return error


async def _serve(
    config: ClusterConfig, controllers: ControllerConfig, record: ClusterRecord, model: str, echo
) -> int:
    import ray
    import uvicorn

    from pdserve.gateway.app import create_app
    from pdserve.gateway.http_server import server_config
    from pdserve.gateway.router_client import RouterClient
    from pdserve.router.local_call import local_generate
    from pdserve.router.server import start_router

    _print_audit_log()
    # Ctrl-C / SIGTERM from here on stop everything this command started, also while loading.
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    controller = start_controller(controllers, name=CONTROLLER_NAME)
    echo(f"loading {model} on {config.prefill} prefill + {config.decode} decode + {config.both} both workers")
    router = server = serving = None
    try:
        try:
            await _with_progress(
                controller.start.remote(),
                "starting workers",
                WORKER_READY_TIMEOUT_S,
                stop,
                detail=lambda: controller.startup_phases.remote(),
            )
        except TimeoutError:
            raise LaunchError(
                f"the workers were not ready within {WORKER_READY_TIMEOUT_S:g} s (Ray could not place them, "
                "or loading is stuck); see `ray status` and the workers' logs"
            ) from None
        except ray.exceptions.RayTaskError as e:
            cause = _root_cause(e)
            raise LaunchError(f"the workers could not start: {type(cause).__name__}: {cause}") from e
        served = await controller.served_model.remote()
        router = await start_router(controller, router_config(config))
        gateway = gateway_config(config, served, router.port)
        # The gateway calls this router's Generate in process: same loop, no gRPC hop per chunk.
        client = RouterClient(gateway.router_address, gateway.api_key, local_generate(router.service))
        app = create_app(gateway, client, registries=(router.service.metrics.registry,))
        server = uvicorn.Server(server_config(app, gateway, config.host, config.port, config.drain_timeout_s))
        server.install_signal_handlers = lambda: None  # ours below stop everything, not just uvicorn
        serving = asyncio.get_running_loop().create_task(server.serve())
        while not server.started:
            if serving.done():
                raise LaunchError(f"the gateway could not listen on {config.host}:{config.port}")
            await asyncio.sleep(0.05)
        # Ray's, FastAPI's, the tokenizer's and the router's start-up objects live as long as the
        # process: moved out of the collector's reach, a full collection walks only what serving
        # made. Unfrozen, full collections here took 124-189 ms, one in the middle of a level of
        # `bench serve`, the gateway and router answering nobody meanwhile (docs/DECISIONS.md
        # 2026-12-06); frozen, none over 5 ms while serving.
        gc.freeze()
        state = replace(
            record, gateway_url=f"http://{config.host}:{config.port}", router_address=router_address(config, router.port),
            model=served.name, ready=True, drain_timeout_s=config.drain_timeout_s,
        )  # fmt: skip
        write_record(config.state_dir, state)
        # The key itself is never printed (terminals and CI logs are kept); the shell fills it in.
        auth = f' -H "Authorization: Bearer ${KEY_ENV}"' if config.api_key else ""
        echo(
            f"pdserve {state.name} is up: {state.gateway_url} (model {state.model}, router {state.router_address})"
        )
        echo(f"try:  curl {state.gateway_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
             """-d '{"messages": [{"role": "user", "content": "Write a function that adds two numbers."}]}'""")  # fmt: skip
        if config.api_key:
            echo(f"auth: /v1 and `pdserve status` need the api_key: export {KEY_ENV}=<it> where you run them")
        echo(f"stop: Ctrl-C here, or `pdserve down --name {state.name}`")
        await _until_stopped_or_controller_lost(stop, controller)
        echo(
            f"stopping: new requests are refused; requests in flight get up to {config.drain_timeout_s:g} s "
            "to finish (Ctrl-C again: stop now)"
        )
        return 0
    finally:
        stop.clear()  # from here, a second Ctrl-C / SIGTERM cuts the drain short
        await _drain(server, serving, router, config.drain_timeout_s, stop)
        with contextlib.suppress(Exception):
            await controller.shutdown.remote()


# How often `up` checks that the controller lives, and how long a busy one may take to answer.
CONTROLLER_CHECK_INTERVAL_S = 2.0
CONTROLLER_CHECK_TIMEOUT_S = 30.0


async def _until_stopped_or_controller_lost(stop: asyncio.Event, controller) -> None:
    """Returns on Ctrl-C / SIGTERM; raises LaunchError when the controller actor dies (killed
    by Ray's OOM killer, say): its workers die with it and nothing would start them again, so
    serving on would only answer every request with an error. Exiting lets a supervisor restart it."""
    import ray

    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stopping.done():
            await asyncio.wait({stopping}, timeout=CONTROLLER_CHECK_INTERVAL_S)
            if stopping.done():
                return
            try:
                await asyncio.wait_for(controller.served_model.remote(), CONTROLLER_CHECK_TIMEOUT_S)
            except TimeoutError:
                continue  # busy, not gone
            except ray.exceptions.RayActorError as e:
                raise LaunchError(
                    f"the controller died ({str(e).splitlines()[0]}); its workers went with it, so this "
                    "cluster has stopped: start it again with `pdserve up`"
                ) from None
    finally:
        stopping.cancel()


async def _drain(server, serving, router, drain_timeout_s: float, cut: asyncio.Event) -> None:
    """Stops admitting at once and lets requests in flight finish, up to `drain_timeout_s`.

    The gateway stops listening and closes its idle connections (uvicorn's graceful shutdown,
    bounded by the same timeout in its config); the router refuses new calls while its calls in
    flight go on (gRPC's grace). Both drain side by side. `cut` being set ends the wait early."""
    draining = []
    if server is not None:
        server.should_exit = True
        draining.append(asyncio.ensure_future(asyncio.wait_for(serving, drain_timeout_s + 5)))
    if router is not None:  # the cluster stops: its prefix entries go too
        draining.append(asyncio.ensure_future(router.stop(grace_s=drain_timeout_s, clear_index=True)))
    if not draining:
        return
    every = asyncio.ensure_future(asyncio.gather(*draining, return_exceptions=True))
    cut_short = asyncio.ensure_future(cut.wait())
    await asyncio.wait([every, cut_short], return_when=asyncio.FIRST_COMPLETED)
    cut_short.cancel()
    if not every.done():
        if server is not None:
            server.force_exit = True
        if router is not None:
            await router.server.stop(0)  # its stop() goes on to close the view and the index
        with contextlib.suppress(Exception):
            await asyncio.wait_for(every, 5)


def _print_audit_log() -> None:
    """Operator actions (the gateway's `pdserve.audit` log: who, what, when) go to stderr."""
    import logging

    audit = logging.getLogger("pdserve.audit")
    if not audit.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        audit.addHandler(handler)
        audit.setLevel(logging.INFO)


async def _with_progress(
    ref, what: str, timeout_s: float, stop: asyncio.Event, detail: Callable[[], Awaitable[dict]] | None = None
) -> None:
    """Awaits `ref` while one line shows the elapsed time and, from `detail()`, what each part is
    doing ("prefill-0 loading weights 40/57"); TimeoutError after `timeout_s`, and LaunchError when
    `stop` is set meanwhile (Ctrl-C)."""
    from tqdm import tqdm

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with tqdm(desc=what, bar_format="{desc} {elapsed}") as bar:
        task = asyncio.ensure_future(ref)
        while not task.done():
            if stop.is_set():
                task.cancel()
                raise LaunchError(f"interrupted ({what}); stopped everything it had started")
            if loop.time() > deadline:
                task.cancel()
                raise TimeoutError(what)
            await asyncio.wait({task}, timeout=PROGRESS_INTERVAL_S)
            if detail is not None and not task.done():
                bar.set_description_str(f"{what}: {_phases_line(await detail())}", refresh=False)
            bar.update()
        task.result()


def _phases_line(phases: dict[str, str]) -> str:
    """ "decode-0 loading weights 3/57, prefill-0 starting": workers with the same phase share it."""
    by_phase: dict[str, list[str]] = {}
    for worker_id, phase in sorted(phases.items()):
        by_phase.setdefault(phase, []).append(worker_id)
    return ", ".join(f"{' '.join(ids)} {phase}" for phase, ids in by_phase.items()) or "connecting"


def _check_redis(url: str, setting: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as e:
        raise LaunchError(f"Redis at {url} is unreachable ({e}); start it or drop {setting}") from e
