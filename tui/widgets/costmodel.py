"""Cost-model panel: predicted against measured step time, when the daemon reports it."""

from __future__ import annotations

from textual.widgets import Static

from proto.moed.v1 import moed_pb2 as pb
from tui.widgets.format import NA, ms


class CostModelPanel(Static, can_focus=True):
    """The cost model's error; n/a until the snapshot carries a prediction."""

    BORDER_TITLE = "cost model"

    def on_mount(self) -> None:
        self.update(f"error {NA}")

    def update_snapshot(self, s: pb.MetricsSnapshot) -> None:
        """Show the measured step time and the prediction error (n/a: the snapshot has no prediction)."""
        st = s.step_seconds
        self.update(f"error     {NA} (no prediction in the snapshot)\n"
                    f"step      p50 {ms(st.p50, st.count)}  p90 {ms(st.p90, st.count)}  (n={st.count})")
