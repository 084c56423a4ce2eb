"""Throughput panel: prefill and decode tokens/s over time."""

from __future__ import annotations

from collections import deque

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline

from proto.moed.v1 import moed_pb2 as pb

HISTORY = 120  # snapshots kept for the sparklines


class ThroughputPanel(Vertical, can_focus=True):
    """Prefill and decode tokens/s as numbers and sparklines."""

    BORDER_TITLE = "throughput"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.prefill: deque[float] = deque(maxlen=HISTORY)
        self.decode: deque[float] = deque(maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        yield Label("prefill n/a", id="prefill-label", markup=False)
        yield Sparkline([], id="prefill-spark")
        yield Label("decode n/a", id="decode-label", markup=False)
        yield Sparkline([], id="decode-spark")

    def update_snapshot(self, s: pb.MetricsSnapshot) -> None:
        """Append one snapshot's rates."""
        self.prefill.append(s.prefill_tokens_per_second)
        self.decode.append(s.decode_tokens_per_second)
        window = f"{s.window_seconds:.0f}s window"
        self.query_one("#prefill-label", Label).update(
            f"prefill {s.prefill_tokens_per_second:9.1f} tok/s  ({s.prompt_tokens_total} tokens, {window})")
        self.query_one("#decode-label", Label).update(
            f"decode  {s.decode_tokens_per_second:9.1f} tok/s  ({s.generated_tokens_total} tokens, "
            f"batch {s.mean_batch_size:.1f})")
        self.query_one("#prefill-spark", Sparkline).data = list(self.prefill)
        self.query_one("#decode-spark", Sparkline).data = list(self.decode)
