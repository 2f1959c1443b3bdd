"""The router's answers about the cluster on the wire: a worker's state (`ClusterState`) and the
operator dashboard's overview (`Overview`), built from the controller's `ClusterOverview`, the
router's `Timeline` and its own events."""

from __future__ import annotations

import json

from pdserve.cluster.operator_actions import ClusterEvent, ClusterOverview, WorkerStatus
from pdserve.proto import pdserve_pb2
from pdserve.roles.messages import WorkerLoad
from pdserve.router.timeline import Timeline, TimelineSample


def worker_state(worker_id: str, role: str, alive: bool, restarts: int, load: WorkerLoad | None):
    """A worker and its last load report (zeros without one) as `WorkerState`."""
    msg = pdserve_pb2.WorkerState(
        worker_id=worker_id, role=role, alive=alive, restarts=restarts, context_cache_available=True
    )
    if load is not None:
        msg.MergeFrom(
            pdserve_pb2.WorkerState(
                num_waiting=load.num_waiting, num_running=load.num_running,
                kv_blocks_total=load.kv_blocks_total, kv_blocks_free=load.kv_blocks_free,
                waiting_prefill_tokens=load.waiting_prefill_tokens, last_step_seconds=load.last_step_seconds,
                spec_acceptance_rate=load.spec_acceptance_rate,
                spec_mean_accepted_length=load.spec_mean_accepted_length,
                rss_bytes=load.rss_bytes, open_fds=load.open_fds, threads=load.threads, pid=load.pid,
                context_cache_hit_tokens=load.context_cache_hit_tokens,
                context_cache_bytes_read=load.context_cache_bytes_read,
                context_cache_bytes_written=load.context_cache_bytes_written,
            )
        )  # fmt: skip
        msg.context_cache_available = load.context_cache_available  # a false would not merge
        msg.ranks.extend(
            pdserve_pb2.RankState(
                rank=r.rank, pid=r.pid, kv_blocks_total=r.kv_blocks_total, kv_blocks_free=r.kv_blocks_free,
                num_running=r.num_running, num_waiting=r.num_waiting, expert_tokens=r.expert_tokens,
                rss_bytes=r.rss_bytes,
            )
            for r in load.ranks
        )  # fmt: skip
    return msg


def worker_status(w: WorkerStatus) -> pdserve_pb2.WorkerStatus:
    hit_rate = w.load.prefix_cache_hit_rate if w.load is not None else None
    return pdserve_pb2.WorkerStatus(
        worker=worker_state(w.worker_id, w.role, w.alive, w.restarts, w.load),
        slot=w.slot,
        state=w.state,
        uptime_s=w.uptime_s,
        prefix_cache_hit_rate=-1.0 if hit_rate is None else hit_rate,
        prompt_tokens=w.load.prefix_cache_queried_tokens if w.load is not None else 0,
    )


def timeline_sample(s: TimelineSample) -> pdserve_pb2.TimelineSample:
    lat = s.latencies
    optional = {
        "ttft_p50_ms": lat.ttft_p50_ms, "ttft_p99_ms": lat.ttft_p99_ms,
        "itl_p50_ms": lat.itl_p50_ms, "itl_p99_ms": lat.itl_p99_ms, "slo_met": s.slo_met,
    }  # fmt: skip
    return pdserve_pb2.TimelineSample(
        at=s.at, requests_per_s=s.requests_per_s, tokens_per_s=s.tokens_per_s,
        migrations_per_s=s.migrations_per_s, in_flight=s.in_flight, goodput_per_s=s.goodput_per_s,
        **{k: v for k, v in optional.items() if v is not None},
    )  # fmt: skip


def cluster_event(e: ClusterEvent) -> pdserve_pb2.ClusterEvent:
    return pdserve_pb2.ClusterEvent(
        at=e.at, kind=e.kind, worker_id=e.worker_id, text=e.text, requested_by=e.requested_by
    )


def overview_response(
    overview: ClusterOverview,
    timeline: Timeline,
    router_events: list[ClusterEvent],
    router_settings: dict[str, object],
    samples: int,
) -> pdserve_pb2.OverviewResponse:
    """The dashboard's overview: the controller's part, the router's traffic, events and settings.

    The caller fills in the fields only the router service knows (model, policy, the index)."""
    events = sorted(overview.events + router_events, key=lambda e: e.at)
    settings = {**overview.settings, "router": router_settings}
    return pdserve_pb2.OverviewResponse(
        workers=[worker_status(w) for w in overview.workers],
        timeline=[timeline_sample(s) for s in timeline.samples(samples)],
        kv_flows=[
            pdserve_pb2.KVFlow(
                sender=f.sender, receiver=f.receiver, bytes_per_s=f.bytes_per_s, bytes_total=f.bytes_total
            )
            for f in timeline.flows
        ],
        events=[cluster_event(e) for e in events],
        settings_json=json.dumps(settings),
        planner_running=overview.planner_running,
    )
