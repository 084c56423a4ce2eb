"""Expert heatmap: layers x experts, shaded by recent use, with a selected layer."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import Static

from proto.moed.v1 import moed_pb2 as pb

SHADES = ("grey23", "blue", "cyan", "green", "yellow", "red")  # cold to hot


class Heatmap(Static, can_focus=True):
    """One row per MoE layer, one cell per expert; h/l or arrows move the selected layer."""

    BORDER_TITLE = "experts"
    BINDINGS = [
        Binding("l,down,right", "move(1)", "next layer", show=False),
        Binding("h,up,left", "move(-1)", "previous layer", show=False),
    ]
    selected: reactive[int] = reactive(0)

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.layer_ids: list[int] = []
        self.counts: list[list[int]] = []
        self.recent: list[list[int]] = []

    def on_mount(self) -> None:
        self.update("waiting for the daemon")

    def update_snapshot(self, s: pb.MetricsSnapshot) -> None:
        """Take the per-layer use counts; recent use is the change since the previous snapshot."""
        counts = [list(u.counts) for u in s.expert_use]
        same = len(counts) == len(self.counts) and all(len(a) == len(b) for a, b in zip(counts, self.counts))
        self.recent = [[a - b for a, b in zip(x, y)] for x, y in zip(counts, self.counts)] if same else counts
        if not any(map(any, self.recent)):
            self.recent = counts  # idle: shade by all use since load
        self.layer_ids, self.counts = [u.layer for u in s.expert_use], counts
        self.selected = min(self.selected, max(len(self.layer_ids) - 1, 0))
        self.refresh_map()

    def action_move(self, step: int) -> None:
        """Select the next or previous layer."""
        if self.layer_ids:
            self.selected = (self.selected + step) % len(self.layer_ids)

    def watch_selected(self) -> None:
        self.refresh_map()

    def refresh_map(self) -> None:
        """Redraw the grid and the selected layer's counts."""
        if not self.layer_ids:
            self.update("no expert use reported (no MoE model loaded?)")
            return
        top = max(max(r, default=0) for r in self.recent) or 1
        text = Text(f"{len(self.layer_ids)} layers x {len(self.counts[0])} experts\n")
        for row, (layer, recent) in enumerate(zip(self.layer_ids, self.recent)):
            mark = ">" if row == self.selected else " "
            text.append(f"{mark}L{layer:<3}", style="bold" if row == self.selected else "")
            for r in recent:
                text.append("██", style=SHADES[min(len(SHADES) - 1, r * (len(SHADES) - 1) // top + (r > 0))])
            text.append("\n")
        counts = self.counts[self.selected]
        total = sum(counts) or 1
        hot = sorted(range(len(counts)), key=lambda e: -counts[e])[:3]
        text.append(f"layer {self.layer_ids[self.selected]}: {sum(counts)} uses; hottest " +
                    ", ".join(f"e{e} {counts[e] / total:.0%}" for e in hot))
        self.update(text)
