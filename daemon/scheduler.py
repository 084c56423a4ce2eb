"""Request queue and batch admission for continuous batching: plain data, no torch."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from daemon.request_errors import QueueFull, Unavailable


class Schedulable(Protocol):
    """What the scheduler reads of a request: set from other threads, read between steps."""

    cancelled: bool
    deadline: float | None  # monotonic seconds, None: no deadline


T = TypeVar("T", bound=Schedulable)


@dataclass(slots=True)
class Schedule(Generic[T]):
    """One step's decision: who runs, who joined, who left early and why."""

    running: list[T] = field(default_factory=list)
    admitted: list[T] = field(default_factory=list)
    dropped: list[tuple[T, str]] = field(default_factory=list)  # reason: "deadline" or "cancelled"


def drop_reason(item: Schedulable, now: float) -> str | None:
    """"deadline" once the deadline has passed, "cancelled" once cancelled, else None."""
    if item.deadline is not None and now >= item.deadline:
        return "deadline"
    if item.cancelled:
        return "cancelled"
    return None


class Scheduler(Generic[T]):
    """FIFO queue in front of a running batch of at most `max_batch`; `max_queue` may wait beyond it."""

    def __init__(self, max_batch: int, max_queue: int) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[T] = deque()
        self.running: list[T] = []
        self.accepting = True
        self.rejected = 0

    @property
    def idle(self) -> bool:
        """No request is running or waiting."""
        return not self.running and not self.waiting

    def submit(self, item: T) -> None:
        """Queue a request; QueueFull when batch and queue are full, Unavailable when draining."""
        if not self.accepting:
            self.rejected += 1
            raise Unavailable("the daemon is shutting down")
        if len(self.running) + len(self.waiting) >= self.max_batch + self.max_queue:
            self.rejected += 1
            raise QueueFull(f"the queue is full ({len(self.running)} running, {len(self.waiting)} waiting, "
                            f"limit {self.max_queue}); retry later")
        self.waiting.append(item)

    def schedule(self, now: float) -> Schedule[T]:
        """Between steps: drop cancelled and expired requests, then admit waiting ones into free slots."""
        out: Schedule[T] = Schedule()
        keep = []
        for item in self.running:
            reason = drop_reason(item, now)
            if reason is None:
                keep.append(item)
            else:
                out.dropped.append((item, reason))
        self.running = keep
        still = deque()
        for item in self.waiting:
            reason = drop_reason(item, now)
            if reason is not None:
                out.dropped.append((item, reason))
            elif len(self.running) < self.max_batch:
                self.running.append(item)
                out.admitted.append(item)
            else:
                still.append(item)
        self.waiting = still
        out.running = list(self.running)
        return out

    def finish(self, item: T) -> None:
        """Remove a request that ended on its own (stop, length, error)."""
        self.running = [r for r in self.running if r is not item]

    def take_all(self) -> list[T]:
        """Remove and return every running and waiting request (shutdown)."""
        items = [*self.running, *self.waiting]
        self.running, self.waiting = [], deque()
        return items
