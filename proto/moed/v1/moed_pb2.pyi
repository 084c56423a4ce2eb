from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_DEADLINE: _ClassVar[FinishReason]
    FINISH_REASON_SHUTDOWN: _ClassVar[FinishReason]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_AVAILABLE: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_LOADED: _ClassVar[ModelState]
    MODEL_STATE_IDLE_UNLOADED: _ClassVar[ModelState]

class ServingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATE_UNSPECIFIED: _ClassVar[ServingState]
    SERVING_STATE_STARTING: _ClassVar[ServingState]
    SERVING_STATE_SERVING: _ClassVar[ServingState]
    SERVING_STATE_DRAINING: _ClassVar[ServingState]
    SERVING_STATE_NO_MODEL: _ClassVar[ServingState]

class ExpertTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERT_TIER_UNSPECIFIED: _ClassVar[ExpertTier]
    EXPERT_TIER_FLASH: _ClassVar[ExpertTier]
    EXPERT_TIER_RAM: _ClassVar[ExpertTier]
    EXPERT_TIER_VRAM: _ClassVar[ExpertTier]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_DEADLINE: FinishReason
FINISH_REASON_SHUTDOWN: FinishReason
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_AVAILABLE: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_LOADED: ModelState
MODEL_STATE_IDLE_UNLOADED: ModelState
SERVING_STATE_UNSPECIFIED: ServingState
SERVING_STATE_STARTING: ServingState
SERVING_STATE_SERVING: ServingState
SERVING_STATE_DRAINING: ServingState
SERVING_STATE_NO_MODEL: ServingState
EXPERT_TIER_UNSPECIFIED: ExpertTier
EXPERT_TIER_FLASH: ExpertTier
EXPERT_TIER_RAM: ExpertTier
EXPERT_TIER_VRAM: ExpertTier

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "text", "tokens", "chat", "sampling", "max_tokens", "stop", "request_id", "ignore_eos")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    tokens: TokenIds
    chat: ChatMessages
    sampling: SamplingParams
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    ignore_eos: bool
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class StepTiming(_message.Message):
    __slots__ = ("step_seconds", "since_previous_seconds", "batch_size", "engine_step")
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SINCE_PREVIOUS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STEP_FIELD_NUMBER: _ClassVar[int]
    step_seconds: float
    since_previous_seconds: float
    batch_size: int
    engine_step: int
    def __init__(self, step_seconds: _Optional[float] = ..., since_previous_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ..., engine_step: _Optional[int] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("prompt_tokens", "generated_tokens", "finish_reason", "ttft_seconds", "decode_tokens_per_second", "queue_seconds", "prefill_seconds", "prefill_tokens_per_second", "total_seconds", "model")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: FinishReason
    ttft_seconds: float
    decode_tokens_per_second: float
    queue_seconds: float
    prefill_seconds: float
    prefill_tokens_per_second: float
    total_seconds: float
    model: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., ttft_seconds: _Optional[float] = ..., decode_tokens_per_second: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., prefill_tokens_per_second: _Optional[float] = ..., total_seconds: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "timing", "summary")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    timing: StepTiming
    summary: GenerateSummary
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., timing: _Optional[_Union[StepTiming, _Mapping]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "text", "chat", "no_special")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    NO_SPECIAL_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    chat: ChatMessages
    no_special: bool
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., no_special: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "pieces")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    pieces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., pieces: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "path", "architecture", "state", "parameters", "layers", "moe_layers", "experts_per_layer", "experts_per_token", "context_length", "vocab_size", "dtype", "load_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    architecture: str
    state: ModelState
    parameters: int
    layers: int
    moe_layers: int
    experts_per_layer: int
    experts_per_token: int
    context_length: int
    vocab_size: int
    dtype: str
    load_seconds: float
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., architecture: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., parameters: _Optional[int] = ..., layers: _Optional[int] = ..., moe_layers: _Optional[int] = ..., experts_per_layer: _Optional[int] = ..., experts_per_token: _Optional[int] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Device(_message.Message):
    __slots__ = ("name", "kind", "description", "memory_total_bytes", "memory_used_bytes", "threads", "utilization", "pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    PCIE_TX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PCIE_RX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    description: str
    memory_total_bytes: int
    memory_used_bytes: int
    threads: int
    utilization: float
    pcie_tx_bytes_per_second: int
    pcie_rx_bytes_per_second: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., utilization: _Optional[float] = ..., pcie_tx_bytes_per_second: _Optional[int] = ..., pcie_rx_bytes_per_second: _Optional[int] = ...) -> None: ...

class MemoryTier(_message.Message):
    __slots__ = ("name", "device", "budget_bytes", "used_bytes", "experts_resident", "experts_total", "hits", "misses", "hit_rate", "experts_by_bits")
    class ExpertsByBitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_BY_BITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    budget_bytes: int
    used_bytes: int
    experts_resident: int
    experts_total: int
    hits: int
    misses: int
    hit_rate: float
    experts_by_bits: _containers.ScalarMap[int, int]
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., experts_resident: _Optional[int] = ..., experts_total: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ..., experts_by_bits: _Optional[_Mapping[int, int]] = ...) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("source", "target", "bytes_moved", "transfers", "busy_seconds")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    bytes_moved: int
    transfers: int
    busy_seconds: float
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., bytes_moved: _Optional[int] = ..., transfers: _Optional[int] = ..., busy_seconds: _Optional[float] = ...) -> None: ...

class QueueInfo(_message.Message):
    __slots__ = ("running", "waiting", "max_batch", "max_queue", "completed", "rejected", "engine_steps")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STEPS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    max_batch: int
    max_queue: int
    completed: int
    rejected: int
    engine_steps: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_queue: _Optional[int] = ..., completed: _Optional[int] = ..., rejected: _Optional[int] = ..., engine_steps: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "uptime_seconds", "state", "model", "devices", "tiers", "links", "queue", "listening", "pid", "rss_bytes", "peak_rss_bytes", "keep_alive_seconds", "gpu_note")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    LISTENING_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPU_NOTE_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_seconds: float
    state: ServingState
    model: ModelInfo
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    tiers: _containers.RepeatedCompositeFieldContainer[MemoryTier]
    links: _containers.RepeatedCompositeFieldContainer[LinkStats]
    queue: QueueInfo
    listening: _containers.RepeatedScalarFieldContainer[str]
    pid: int
    rss_bytes: int
    peak_rss_bytes: int
    keep_alive_seconds: float
    gpu_note: str
    def __init__(self, version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., state: _Optional[_Union[ServingState, str]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[MemoryTier, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., queue: _Optional[_Union[QueueInfo, _Mapping]] = ..., listening: _Optional[_Iterable[str]] = ..., pid: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., keep_alive_seconds: _Optional[float] = ..., gpu_note: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("interval_seconds", "include_experts")
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    interval_seconds: float
    include_experts: bool
    def __init__(self, interval_seconds: _Optional[float] = ..., include_experts: _Optional[bool] = ...) -> None: ...

class Percentiles(_message.Message):
    __slots__ = ("count", "p50", "p90", "p99", "max", "p95")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P90_FIELD_NUMBER: _ClassVar[int]
    P99_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    P95_FIELD_NUMBER: _ClassVar[int]
    count: int
    p50: float
    p90: float
    p99: float
    max: float
    p95: float
    def __init__(self, count: _Optional[int] = ..., p50: _Optional[float] = ..., p90: _Optional[float] = ..., p99: _Optional[float] = ..., max: _Optional[float] = ..., p95: _Optional[float] = ...) -> None: ...

class LayerExpertUse(_message.Message):
    __slots__ = ("layer", "counts", "bits", "tier")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    counts: _containers.RepeatedScalarFieldContainer[int]
    bits: _containers.RepeatedScalarFieldContainer[int]
    tier: _containers.RepeatedScalarFieldContainer[ExpertTier]
    def __init__(self, layer: _Optional[int] = ..., counts: _Optional[_Iterable[int]] = ..., bits: _Optional[_Iterable[int]] = ..., tier: _Optional[_Iterable[_Union[ExpertTier, str]]] = ...) -> None: ...

class CostModelCheck(_message.Message):
    __slots__ = ("problem", "predicted_step_seconds", "measured_step_seconds", "relative_error", "steps", "batch", "context", "bits", "machine")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    problem: str
    predicted_step_seconds: float
    measured_step_seconds: float
    relative_error: float
    steps: int
    batch: float
    context: float
    bits: int
    machine: str
    def __init__(self, problem: _Optional[str] = ..., predicted_step_seconds: _Optional[float] = ..., measured_step_seconds: _Optional[float] = ..., relative_error: _Optional[float] = ..., steps: _Optional[int] = ..., batch: _Optional[float] = ..., context: _Optional[float] = ..., bits: _Optional[int] = ..., machine: _Optional[str] = ...) -> None: ...

class MetricsSnapshot(_message.Message):
    __slots__ = ("timestamp", "uptime_seconds", "window_seconds", "prefill_tokens_per_second", "decode_tokens_per_second", "ttft_seconds", "inter_token_seconds", "step_seconds", "queue", "requests_total", "finished_by_reason", "prompt_tokens_total", "generated_tokens_total", "expert_use", "tiers", "links", "rss_bytes", "mean_batch_size", "cost_model")
    class FinishedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXPERT_USE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    uptime_seconds: float
    window_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    ttft_seconds: Percentiles
    inter_token_seconds: Percentiles
    step_seconds: Percentiles
    queue: QueueInfo
    requests_total: int
    finished_by_reason: _containers.ScalarMap[str, int]
    prompt_tokens_total: int
    generated_tokens_total: int
    expert_use: _containers.RepeatedCompositeFieldContainer[LayerExpertUse]
    tiers: _containers.RepeatedCompositeFieldContainer[MemoryTier]
    links: _containers.RepeatedCompositeFieldContainer[LinkStats]
    rss_bytes: int
    mean_batch_size: float
    cost_model: CostModelCheck
    def __init__(self, timestamp: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., window_seconds: _Optional[float] = ..., prefill_tokens_per_second: _Optional[float] = ..., decode_tokens_per_second: _Optional[float] = ..., ttft_seconds: _Optional[_Union[Percentiles, _Mapping]] = ..., inter_token_seconds: _Optional[_Union[Percentiles, _Mapping]] = ..., step_seconds: _Optional[_Union[Percentiles, _Mapping]] = ..., queue: _Optional[_Union[QueueInfo, _Mapping]] = ..., requests_total: _Optional[int] = ..., finished_by_reason: _Optional[_Mapping[str, int]] = ..., prompt_tokens_total: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., expert_use: _Optional[_Iterable[_Union[LayerExpertUse, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[MemoryTier, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., rss_bytes: _Optional[int] = ..., mean_batch_size: _Optional[float] = ..., cost_model: _Optional[_Union[CostModelCheck, _Mapping]] = ...) -> None: ...
