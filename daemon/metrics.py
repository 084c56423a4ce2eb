"""Counters and timings of the engine for Status and Watch (daemon/costcheck.py checks the cost model
against them): no torch."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank percentiles of the samples in a window."""

    count: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0


def percentiles(values: Iterable[float]) -> Percentiles:
    """p50/p90/p95/p99/max of values by the nearest-rank rule (zeros when empty)."""
    v = sorted(values)
    if not v:
        return Percentiles()

    def rank(q: float) -> float:
        k = max(1, math.ceil(q * len(v) - 1e-9))  # 1-based rank; the epsilon absorbs float drift
        return v[k - 1]

    return Percentiles(count=len(v), p50=rank(0.50), p90=rank(0.90), p95=rank(0.95), p99=rank(0.99), max=v[-1])


@dataclass(frozen=True, slots=True)
class MetricsView:
    """A consistent copy of the metrics at one moment."""

    uptime_seconds: float
    window_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    ttft: Percentiles
    inter_token: Percentiles
    step: Percentiles
    mean_batch_size: float
    requests_total: int
    finished_by_reason: dict[str, int]
    prompt_tokens_total: int
    generated_tokens_total: int
    steps_total: int
    decode_steps: dict[int, tuple[int, float]]  # batch size -> (decode-only steps, their seconds) in the window


class Window:
    """(time, value) samples younger than `seconds`, at most `limit` of them."""

    def __init__(self, seconds: float, limit: int = 20000) -> None:
        self.seconds = seconds
        self.samples: deque[tuple[float, float]] = deque(maxlen=limit)

    def add(self, t: float, value: float) -> None:
        """Record a sample taken at time t."""
        self.samples.append((t, value))

    def values(self, now: float) -> list[float]:
        """Values of the samples still inside the window."""
        cutoff = now - self.seconds
        while self.samples and self.samples[0][0] < cutoff:
            self.samples.popleft()
        return [v for _, v in self.samples]


class Metrics:
    """Thread-safe engine metrics: token rates over `rate_window`, latencies over `latency_window`."""

    def __init__(self, rate_window: float = 10.0, latency_window: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.rate_window = rate_window
        self._lock = threading.Lock()
        self._prefill = Window(rate_window)
        self._decode = Window(rate_window)
        self._batch = Window(rate_window)
        self._ttft = Window(latency_window)
        self._itl = Window(latency_window)
        self._step = Window(latency_window)
        self._decode_step = Window(latency_window)  # steps with no prefill: their seconds ...
        self._decode_batch = Window(latency_window)  # ... and batch sizes, added together
        self._reasons: Counter[str] = Counter()
        self._requests = self._prompt_tokens = self._generated = self._steps = 0

    def record_request(self) -> None:
        """A request was accepted into the queue."""
        with self._lock:
            self._requests += 1

    def record_step(self, seconds: float, batch: int, prefill_tokens: int, decode_tokens: int) -> None:
        """One engine step: its duration, sequences, and the prompt and decode tokens it processed."""
        now = self.clock()
        with self._lock:
            self._steps += 1
            self._step.add(now, seconds)
            self._batch.add(now, batch)
            if prefill_tokens:
                self._prefill.add(now, prefill_tokens)
            if decode_tokens:
                self._decode.add(now, decode_tokens)
                if not prefill_tokens:
                    self._decode_step.add(now, seconds)
                    self._decode_batch.add(now, batch)

    def record_token(self, since_previous: float, first: bool) -> None:
        """A token went out: time to first token, or the gap since the previous one."""
        now = self.clock()
        with self._lock:
            (self._ttft if first else self._itl).add(now, since_previous)
            self._generated += 1

    def record_finish(self, reason: str, prompt_tokens: int) -> None:
        """A request ended for `reason` ("stop", "length", "cancelled", ...)."""
        with self._lock:
            self._reasons[reason] += 1
            self._prompt_tokens += prompt_tokens

    def view(self) -> MetricsView:
        """The metrics now."""
        now = self.clock()
        with self._lock:
            up = now - self.started
            span = max(min(self.rate_window, up), 1e-9)
            batches = self._batch.values(now)
            decode: dict[int, tuple[int, float]] = {}
            for b, sec in zip(self._decode_batch.values(now), self._decode_step.values(now)):
                n, total = decode.get(int(b), (0, 0.0))
                decode[int(b)] = (n + 1, total + sec)
            return MetricsView(
                uptime_seconds=up, window_seconds=self.rate_window,
                prefill_tokens_per_second=sum(self._prefill.values(now)) / span,
                decode_tokens_per_second=sum(self._decode.values(now)) / span,
                ttft=percentiles(self._ttft.values(now)), inter_token=percentiles(self._itl.values(now)),
                step=percentiles(self._step.values(now)),
                mean_batch_size=sum(batches) / len(batches) if batches else 0.0,
                requests_total=self._requests, finished_by_reason=dict(self._reasons),
                prompt_tokens_total=self._prompt_tokens, generated_tokens_total=self._generated,
                steps_total=self._steps, decode_steps=decode)
