"""The gRPC side of `moed top`: a Watch/Status consumer that posts messages, reconnecting with backoff."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
from textual.message import Message

from daemon.client import Client
from proto.moed.v1 import moed_pb2 as pb

MIN_BACKOFF, MAX_BACKOFF = 0.1, 2.0
STATUS_EVERY = 5  # refresh Status (devices, model) every this many snapshots


class Snapshot(Message):
    """A MetricsSnapshot from Watch."""

    def __init__(self, snapshot: pb.MetricsSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class StatusReport(Message):
    """A StatusResponse from Status."""

    def __init__(self, status: pb.StatusResponse) -> None:
        super().__init__()
        self.status = status


class Connected(Message):
    """The feed reached the daemon."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target


class Disconnected(Message):
    """The feed lost the daemon (or never reached it); it keeps retrying."""

    def __init__(self, reason: str, retry_in: float) -> None:
        super().__init__()
        self.reason = reason
        self.retry_in = retry_in


class Feed:
    """Streams a daemon's Watch snapshots (and periodic Status) to a post function until stopped."""

    def __init__(self, target: str, interval: float = 1.0, token: str | None = None) -> None:
        self.target, self.interval, self.token = target, interval, token
        self._stop = threading.Event()
        self._call: grpc.Future | None = None

    def stop(self) -> None:
        """End run() soon: cancel the open stream and the backoff wait."""
        self._stop.set()
        if self._call is not None:
            self._call.cancel()

    def run(self, post: Callable[[Message], object]) -> None:
        """Connect, stream, and on any failure say so and retry with exponential backoff (blocking)."""
        delay = MIN_BACKOFF
        while not self._stop.is_set():
            try:
                self._stream(post)
                reason = "the daemon ended the stream"
                delay = MIN_BACKOFF
            except grpc.RpcError as e:
                reason = e.details() or e.code().name
            if self._stop.is_set():
                return
            post(Disconnected(reason, delay))
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    def _stream(self, post: Callable[[Message], object]) -> None:
        with Client(self.target, self.token) as client:
            post(StatusReport(client.status(timeout=2.0)))
            post(Connected(self.target))
            req = pb.WatchRequest(interval_seconds=self.interval, include_experts=True)
            self._call = client.stub.Watch(req, metadata=client.metadata)
            if self._stop.is_set():
                self._call.cancel()
            for n, snap in enumerate(self._call, 1):
                post(Snapshot(snap))
                if n % STATUS_EVERY == 0:
                    post(StatusReport(client.status(timeout=2.0)))
