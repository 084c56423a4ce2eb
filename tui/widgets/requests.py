"""Requests panel: active and queued requests, TTFT and inter-token latency percentiles."""

from __future__ import annotations

from textual.widgets import Static

from proto.moed.v1 import moed_pb2 as pb
from tui.widgets.format import ms


class RequestsPanel(Static, can_focus=True):
    """Queue state and latency percentiles of one snapshot."""

    BORDER_TITLE = "requests"

    def on_mount(self) -> None:
        self.update("waiting for the daemon")

    def update_snapshot(self, s: pb.MetricsSnapshot) -> None:
        """Show one snapshot."""
        q, t, i = s.queue, s.ttft_seconds, s.inter_token_seconds
        done = ", ".join(f"{k} {v}" for k, v in sorted(s.finished_by_reason.items())) or "none"
        self.update("\n".join([
            f"active   {q.running:>4} / {q.max_batch}    queued {q.waiting:>4} / {q.max_queue}",
            f"total    {s.requests_total:>4}    completed {q.completed}    rejected {q.rejected}",
            f"TTFT     p50 {ms(t.p50, t.count):>10}   p95 {ms(t.p95, t.count):>10}   (n={t.count})",
            f"ITL      p50 {ms(i.p50, i.count):>10}   p95 {ms(i.p95, i.count):>10}   (n={i.count})",
            f"finished {done}",
        ]))
