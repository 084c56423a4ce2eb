"""Plain records the engine takes and gives: requests, their events and summaries, views of its state."""

from __future__ import annotations

import math
from dataclasses import dataclass

from daemon.request_errors import RequestError
from daemon.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class Prompt:
    """Exactly one of: text, token ids, or chat messages (role, content)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    chat: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class GenRequest:
    """A generation request as the engine sees it; max_tokens None: the configured default."""

    prompt: Prompt
    params: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    request_id: str = ""
    model: str = ""
    deadline: float | None = None  # time.monotonic() seconds


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """Tokens new in one step of one request, their text, and the step's timings."""

    ids: tuple[int, ...]
    text: str
    step_seconds: float
    since_previous: float
    batch_size: int
    engine_step: int


@dataclass(frozen=True, slots=True)
class RequestSummary:
    """What a finished request did."""

    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # stop, length, cancelled, deadline, shutdown
    ttft: float
    decode_tps: float
    queue_seconds: float
    prefill_seconds: float
    prefill_tps: float
    total_seconds: float
    model: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a request: its remaining text and summary."""

    text: str
    summary: RequestSummary


@dataclass(frozen=True, slots=True)
class Failed:
    """A request failed inside the engine; the error says why."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class FinishRecord:
    """How a request left the engine; steps_late: steps started after its cancel or deadline."""

    seq: int
    request_id: str
    reason: str
    generated: int
    steps_late: int
    freed_step: int


@dataclass(frozen=True, slots=True)
class ModelView:
    """The model the engine serves."""

    name: str
    path: str
    architecture: str
    state: str  # loading, loaded, idle_unloaded
    parameters: int
    layers: int
    moe_layers: int
    experts_per_layer: int
    experts_per_token: int
    context_length: int
    vocab_size: int
    dtype: str
    load_seconds: float
    expert_bytes: int


@dataclass(frozen=True, slots=True)
class QueueView:
    """Queue and batch occupancy."""

    running: int
    waiting: int
    max_batch: int
    max_queue: int
    completed: int
    rejected: int
    engine_steps: int


def check_params(p: SamplingParams) -> None:
    """Raise RequestError for a non-finite or out-of-range sampling parameter."""
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if not math.isfinite(getattr(p, name)):
            raise RequestError(f"{name} must be a finite number (got {getattr(p, name)})")
    try:
        p.validate()
    except ValueError as e:
        raise RequestError(str(e)) from None
