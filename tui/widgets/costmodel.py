"""Cost-model panel: the machine profile's predicted decode step time against the measured one."""

from __future__ import annotations

from textual.widgets import Static

from proto.moed.v1 import moed_pb2 as pb
from tui.widgets.format import NA, ms

NO_PROFILE = "no profile (run moed profile)"


def check_lines(c: pb.CostModelCheck) -> list[str]:
    """What the daemon's CostModelCheck says: the error and what the prediction assumed, or why there is none."""
    if c.problem:
        return [f"no prediction: {c.problem}"]
    if not c.steps:
        return ["predicted n/a (no decode steps in the window yet)", f"profile   {c.machine}"]
    return [f"decode step predicted {ms(c.predicted_step_seconds)}  measured {ms(c.measured_step_seconds)}"
            f"  n={c.steps}",
            f"error     {c.relative_error:+.0%}  (predicted - measured) / measured",
            f"assumes   batch {c.batch:.1f}, context ~{c.context:.0f}, {c.bits}-bit experts resident",
            f"profile   {c.machine}"]


class CostModelPanel(Static, can_focus=True):
    """The cost model's error, or why there is none (no profile: run `moed profile`)."""

    BORDER_TITLE = "cost model"

    def on_mount(self) -> None:
        self.update(f"error {NA}")

    def update_snapshot(self, s: pb.MetricsSnapshot) -> None:
        """Show the snapshot's cost-model check and the measured step times of every step."""
        st = s.step_seconds
        lines = check_lines(s.cost_model) if s.HasField("cost_model") else [NO_PROFILE]
        self.update("\n".join(lines + [f"all steps p50 {ms(st.p50, st.count)}  p95 {ms(st.p95, st.count)}  "
                                       f"(n={st.count})"]))
