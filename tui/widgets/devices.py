"""Devices panel: CPU, RAM and GPUs as the daemon reports them."""

from __future__ import annotations

from textual.widgets import Static

from proto.moed.v1 import moed_pb2 as pb
from tui.widgets.format import NA, size


class DevicesPanel(Static, can_focus=True):
    """The daemon's devices from Status, and its resident memory from Watch."""

    BORDER_TITLE = "devices"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.daemon_status: pb.StatusResponse | None = None
        self.rss = 0

    def on_mount(self) -> None:
        self.update("waiting for the daemon")

    def update_status(self, st: pb.StatusResponse) -> None:
        """Show one Status."""
        self.daemon_status = st
        self._render_lines()

    def update_snapshot(self, s: pb.MetricsSnapshot) -> None:
        """Take the daemon's resident memory from a snapshot."""
        self.rss = s.rss_bytes
        self._render_lines()

    def _render_lines(self) -> None:
        lines = []
        devices = list(self.daemon_status.devices) if self.daemon_status else []
        for d in devices:
            mem = f"{size(d.memory_used_bytes)} / {size(d.memory_total_bytes)}" if d.memory_total_bytes else NA
            threads = f"  {d.threads} threads" if d.threads else ""
            lines.append(f"{d.name:<7} {mem}{threads}  {d.description}")
        if not any(d.kind == "cuda" for d in devices):
            lines.append(f"gpu     {NA}")
        lines.append(f"daemon  rss {size(self.rss)}" + (f"  pid {self.daemon_status.pid}" if self.daemon_status else ""))
        self.update("\n".join(lines))
