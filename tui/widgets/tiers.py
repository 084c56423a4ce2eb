"""Memory tiers panel: bytes used of budget, hit rate, and bytes/s per link."""

from __future__ import annotations

from textual.widgets import Static

from proto.moed.v1 import moed_pb2 as pb
from tui.widgets.format import NA, size

TIERS = ("vram", "ram", "flash")
LINKS = (("flash", "ram"), ("ram", "vram"))


class TiersPanel(Static, can_focus=True):
    """The VRAM, RAM and flash tiers and the links between them."""

    BORDER_TITLE = "memory tiers"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._last: tuple[float, dict[tuple[str, str], int]] | None = None

    def on_mount(self) -> None:
        self.update("waiting for the daemon")

    def update_snapshot(self, s: pb.MetricsSnapshot) -> None:
        """Show one snapshot; link rates come from the change since the previous one."""
        by_name = {t.name: t for t in s.tiers}
        lines = []
        for name in TIERS + tuple(n for n in by_name if n not in TIERS):
            t = by_name.get(name)
            if t is None:
                lines.append(f"{name:<6}{NA}")
                continue
            bits = " ".join(f"{n}@{b}b" for b, n in sorted(t.experts_by_bits.items())) or NA
            lines.append(f"{name:<6}{size(t.used_bytes)} / {size(t.budget_bytes)}  hit {t.hit_rate:.0%}  "
                         f"{t.experts_resident}/{t.experts_total} ({bits})")
        moved = {(k.source, k.target): k.bytes_moved for k in s.links}
        for src, dst in LINKS + tuple(k for k in moved if k not in LINKS):
            lines.append(f"{src + '->' + dst:<11} {self._rate(s.timestamp, moved, (src, dst))}")
        self._last = (s.timestamp, moved)
        self.update("\n".join(lines))

    def _rate(self, now: float, moved: dict[tuple[str, str], int], key: tuple[str, str]) -> str:
        if key not in moved:
            return NA
        if self._last is None or key not in self._last[1] or now <= self._last[0]:
            return f"{size(moved[key])} moved"
        return f"{size((moved[key] - self._last[1][key]) / (now - self._last[0]))}/s"
