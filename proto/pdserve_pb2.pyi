from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "skip_special_tokens", "logit_bias", "guided_decoding")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    GUIDED_DECODING_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    max_tokens: int
    min_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    include_stop_str_in_output: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logprobs: int
    skip_special_tokens: bool
    logit_bias: _containers.ScalarMap[int, float]
    guided_decoding: GuidedDecoding
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., include_stop_str_in_output: _Optional[bool] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., logprobs: _Optional[int] = ..., skip_special_tokens: _Optional[bool] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., guided_decoding: _Optional[_Union[GuidedDecoding, _Mapping]] = ...) -> None: ...

class GuidedDecoding(_message.Message):
    __slots__ = ("kind", "value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    value: str
    def __init__(self, kind: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "session_id", "prefill_group")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_GROUP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    session_id: str
    prefill_group: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., session_id: _Optional[str] = ..., prefill_group: _Optional[str] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "rank")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    rank: int
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "rank", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    rank: int
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., rank: _Optional[int] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_tokens", "context_cached_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    context_cached_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., context_cached_tokens: _Optional[int] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "finished", "finish_reason", "stop_reason", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finished: bool
    finish_reason: str
    stop_reason: str
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., stop_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class ClusterStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerState(_message.Message):
    __slots__ = ("worker_id", "role", "alive", "num_waiting", "num_running", "kv_blocks_total", "kv_blocks_free", "waiting_prefill_tokens", "last_step_seconds", "restarts", "spec_acceptance_rate", "spec_mean_accepted_length", "rss_bytes", "open_fds", "threads", "pid", "context_cache_hit_tokens", "context_cache_bytes_read", "context_cache_bytes_written", "context_cache_available", "ranks")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    WAITING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_MEAN_ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_FDS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    alive: bool
    num_waiting: int
    num_running: int
    kv_blocks_total: int
    kv_blocks_free: int
    waiting_prefill_tokens: int
    last_step_seconds: float
    restarts: int
    spec_acceptance_rate: float
    spec_mean_accepted_length: float
    rss_bytes: int
    open_fds: int
    threads: int
    pid: int
    context_cache_hit_tokens: int
    context_cache_bytes_read: int
    context_cache_bytes_written: int
    context_cache_available: bool
    ranks: _containers.RepeatedCompositeFieldContainer[RankState]
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., alive: _Optional[bool] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., waiting_prefill_tokens: _Optional[int] = ..., last_step_seconds: _Optional[float] = ..., restarts: _Optional[int] = ..., spec_acceptance_rate: _Optional[float] = ..., spec_mean_accepted_length: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., open_fds: _Optional[int] = ..., threads: _Optional[int] = ..., pid: _Optional[int] = ..., context_cache_hit_tokens: _Optional[int] = ..., context_cache_bytes_read: _Optional[int] = ..., context_cache_bytes_written: _Optional[int] = ..., context_cache_available: _Optional[bool] = ..., ranks: _Optional[_Iterable[_Union[RankState, _Mapping]]] = ...) -> None: ...

class RankState(_message.Message):
    __slots__ = ("rank", "pid", "kv_blocks_total", "kv_blocks_free", "num_running", "num_waiting", "expert_tokens", "rss_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    pid: int
    kv_blocks_total: int
    kv_blocks_free: int
    num_running: int
    num_waiting: int
    expert_tokens: int
    rss_bytes: int
    def __init__(self, rank: _Optional[int] = ..., pid: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., expert_tokens: _Optional[int] = ..., rss_bytes: _Optional[int] = ...) -> None: ...

class ClusterStateResponse(_message.Message):
    __slots__ = ("model", "policy", "workers", "index_entries", "index_backend", "index_available", "requests_in_flight", "context_cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    INDEX_BACKEND_FIELD_NUMBER: _ClassVar[int]
    INDEX_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerState]
    index_entries: int
    index_backend: str
    index_available: bool
    requests_in_flight: int
    context_cache: str
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerState, _Mapping]]] = ..., index_entries: _Optional[int] = ..., index_backend: _Optional[str] = ..., index_available: _Optional[bool] = ..., requests_in_flight: _Optional[int] = ..., context_cache: _Optional[str] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("text", "unreachable")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    text: str
    unreachable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., unreachable: _Optional[_Iterable[str]] = ...) -> None: ...

class RoleSwitch(_message.Message):
    __slots__ = ("worker_id", "from_role", "to_role", "reason", "at", "seconds", "moved", "handed_back", "error")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ROLE_FIELD_NUMBER: _ClassVar[int]
    TO_ROLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    HANDED_BACK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    from_role: str
    to_role: str
    reason: str
    at: float
    seconds: float
    moved: int
    handed_back: int
    error: str
    def __init__(self, worker_id: _Optional[str] = ..., from_role: _Optional[str] = ..., to_role: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[float] = ..., seconds: _Optional[float] = ..., moved: _Optional[int] = ..., handed_back: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("worker_id", "role", "requested_by")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    requested_by: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., requested_by: _Optional[str] = ...) -> None: ...

class PlannerRequest(_message.Message):
    __slots__ = ("action", "requested_by")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    action: str
    requested_by: str
    def __init__(self, action: _Optional[str] = ..., requested_by: _Optional[str] = ...) -> None: ...

class WorkerActionRequest(_message.Message):
    __slots__ = ("worker_id", "action", "requested_by")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    action: str
    requested_by: str
    def __init__(self, worker_id: _Optional[str] = ..., action: _Optional[str] = ..., requested_by: _Optional[str] = ...) -> None: ...

class WorkerActionResponse(_message.Message):
    __slots__ = ("worker_id", "action", "message")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    action: str
    message: str
    def __init__(self, worker_id: _Optional[str] = ..., action: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PolicyRequest(_message.Message):
    __slots__ = ("policy", "requested_by")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    policy: str
    requested_by: str
    def __init__(self, policy: _Optional[str] = ..., requested_by: _Optional[str] = ...) -> None: ...

class PolicyResponse(_message.Message):
    __slots__ = ("policy", "previous")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    previous: str
    def __init__(self, policy: _Optional[str] = ..., previous: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker", "slot", "state", "uptime_s", "prefix_cache_hit_rate", "prompt_tokens")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerState
    slot: str
    state: str
    uptime_s: float
    prefix_cache_hit_rate: float
    prompt_tokens: int
    def __init__(self, worker: _Optional[_Union[WorkerState, _Mapping]] = ..., slot: _Optional[str] = ..., state: _Optional[str] = ..., uptime_s: _Optional[float] = ..., prefix_cache_hit_rate: _Optional[float] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class ClusterEvent(_message.Message):
    __slots__ = ("at", "kind", "worker_id", "text", "requested_by")
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    at: float
    kind: str
    worker_id: str
    text: str
    requested_by: str
    def __init__(self, at: _Optional[float] = ..., kind: _Optional[str] = ..., worker_id: _Optional[str] = ..., text: _Optional[str] = ..., requested_by: _Optional[str] = ...) -> None: ...

class TimelineSample(_message.Message):
    __slots__ = ("at", "requests_per_s", "tokens_per_s", "migrations_per_s", "in_flight", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "slo_met", "goodput_per_s")
    AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_PER_S_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    ITL_P50_MS_FIELD_NUMBER: _ClassVar[int]
    ITL_P99_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_MET_FIELD_NUMBER: _ClassVar[int]
    GOODPUT_PER_S_FIELD_NUMBER: _ClassVar[int]
    at: float
    requests_per_s: float
    tokens_per_s: float
    migrations_per_s: float
    in_flight: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    slo_met: float
    goodput_per_s: float
    def __init__(self, at: _Optional[float] = ..., requests_per_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., migrations_per_s: _Optional[float] = ..., in_flight: _Optional[int] = ..., ttft_p50_ms: _Optional[float] = ..., ttft_p99_ms: _Optional[float] = ..., itl_p50_ms: _Optional[float] = ..., itl_p99_ms: _Optional[float] = ..., slo_met: _Optional[float] = ..., goodput_per_s: _Optional[float] = ...) -> None: ...

class KVFlow(_message.Message):
    __slots__ = ("sender", "receiver", "bytes_per_s", "bytes_total")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    sender: str
    receiver: str
    bytes_per_s: float
    bytes_total: int
    def __init__(self, sender: _Optional[str] = ..., receiver: _Optional[str] = ..., bytes_per_s: _Optional[float] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class OverviewRequest(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: int
    def __init__(self, samples: _Optional[int] = ...) -> None: ...

class OverviewResponse(_message.Message):
    __slots__ = ("model", "policy", "workers", "timeline", "kv_flows", "events", "settings_json", "planner_running", "index_backend", "index_available", "index_entries", "requests_in_flight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    KV_FLOWS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    PLANNER_RUNNING_FIELD_NUMBER: _ClassVar[int]
    INDEX_BACKEND_FIELD_NUMBER: _ClassVar[int]
    INDEX_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    timeline: _containers.RepeatedCompositeFieldContainer[TimelineSample]
    kv_flows: _containers.RepeatedCompositeFieldContainer[KVFlow]
    events: _containers.RepeatedCompositeFieldContainer[ClusterEvent]
    settings_json: str
    planner_running: bool
    index_backend: str
    index_available: bool
    index_entries: int
    requests_in_flight: int
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., timeline: _Optional[_Iterable[_Union[TimelineSample, _Mapping]]] = ..., kv_flows: _Optional[_Iterable[_Union[KVFlow, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[ClusterEvent, _Mapping]]] = ..., settings_json: _Optional[str] = ..., planner_running: _Optional[bool] = ..., index_backend: _Optional[str] = ..., index_available: _Optional[bool] = ..., index_entries: _Optional[int] = ..., requests_in_flight: _Optional[int] = ...) -> None: ...

class PlannerResponse(_message.Message):
    __slots__ = ("running", "config_json", "switches", "decisions")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    running: bool
    config_json: str
    switches: _containers.RepeatedCompositeFieldContainer[RoleSwitch]
    decisions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, running: _Optional[bool] = ..., config_json: _Optional[str] = ..., switches: _Optional[_Iterable[_Union[RoleSwitch, _Mapping]]] = ..., decisions: _Optional[_Iterable[str]] = ...) -> None: ...
