"""Expert heatmap: layers x experts, shaded by recent use, marked with each expert's tier and bits."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import Static

from proto.moed.v1 import moed_pb2 as pb

SHADES = ("grey23", "blue", "cyan", "green", "yellow", "red")  # cold to hot
INK = ("white", "white", "black", "black", "black", "white")  # readable text on each shade
TIERS = {pb.EXPERT_TIER_VRAM: "v", pb.EXPERT_TIER_RAM: "r", pb.EXPERT_TIER_FLASH: "f"}
TIER_NAMES = {"v": "vram", "r": "ram", "f": "flash"}


def bits_mark(bits: int) -> str:
    """One character for a bit-width: the digit, '+' above 9 (16- or 32-bit floats), '-' for none."""
    return "-" if bits == 0 else str(bits) if bits < 10 else "+"


class Heatmap(Static, can_focus=True):
    """One row per MoE layer, one cell per expert; h/l or arrows move the selected layer.

    A cell's colour is the expert's recent use; its text is where it is held: the tier (v vram, r ram,
    f flash only) and the bit-width.
    """

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
        self.held: list[list[tuple[str, int]]] = []  # per layer, per expert: (tier letter, bits); [] unknown

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
        self.held = [[(TIERS.get(t, "?"), b) for t, b in zip(u.tier, u.bits)] for u in s.expert_use]
        self.selected = min(self.selected, max(len(self.layer_ids) - 1, 0))
        self.refresh_map()

    def action_move(self, step: int) -> None:
        """Select the next or previous layer."""
        if self.layer_ids:
            self.selected = (self.selected + step) % len(self.layer_ids)

    def watch_selected(self) -> None:
        self.refresh_map()

    def refresh_map(self) -> None:
        """Redraw the grid, the selected layer's counts and residency, and the legend."""
        if not self.layer_ids:
            self.update("no expert use reported (no MoE model loaded?)")
            return
        top = max(max(r, default=0) for r in self.recent) or 1
        text = Text(f"{len(self.layer_ids)} layers x {len(self.counts[0])} experts\n")
        for row, (layer, recent) in enumerate(zip(self.layer_ids, self.recent)):
            mark = ">" if row == self.selected else " "
            text.append(f"{mark}L{layer:<3}", style="bold" if row == self.selected else "")
            held = self.held[row] if row < len(self.held) else []
            for e, r in enumerate(recent):
                shade = min(len(SHADES) - 1, r * (len(SHADES) - 1) // top + (r > 0))
                if e < len(held):
                    tier, bits = held[e]
                    text.append(tier + bits_mark(bits), style=f"{'bold ' if tier == 'v' else ''}"
                                                              f"{INK[shade]} on {SHADES[shade]}")
                else:
                    text.append("██", style=SHADES[shade])
            text.append("\n")
        counts = self.counts[self.selected]
        total = sum(counts) or 1
        hot = sorted(range(len(counts)), key=lambda e: -counts[e])[:3]
        text.append(f"layer {self.layer_ids[self.selected]}: {sum(counts)} uses; hottest " +
                    ", ".join(f"e{e} {counts[e] / total:.0%}" for e in hot) + "\n")
        held = self.held[self.selected] if self.selected < len(self.held) else []
        text.append(f"held   {residency(held)}\n")
        text.append_text(legend(held))
        self.update(text)


def residency(held: list[tuple[str, int]]) -> str:
    """Experts per tier and bit-width, fastest tier first ("ram 5 at 8 bits, flash 3")."""
    if not held:
        return "n/a (the daemon does not report tiers)"
    groups: dict[tuple[str, int], int] = {}
    for key in held:
        groups[key] = groups.get(key, 0) + 1
    order = {"v": 0, "r": 1, "f": 2}
    return ", ".join(f"{TIER_NAMES.get(t, t)} {n}" + (f" at {b} bits" if b else "")
                     for (t, b), n in sorted(groups.items(), key=lambda g: (order.get(g[0][0], 3), -g[0][1])))


def legend(held: list[tuple[str, int]]) -> Text:
    """What a cell's letters and colours mean."""
    wide = sorted({b for _, b in held if b >= 10})
    out = Text(("v vram r ram f flash, then bits" + (f" (+ {'/'.join(map(str, wide))})" if wide else "") + "  "
                if held else "") + "cold ")
    for shade in SHADES:
        out.append("▆", style=shade)
    out.append(" hot")
    return out
