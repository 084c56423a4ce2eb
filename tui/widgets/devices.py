"""Devices panel: CPU, RAM and GPUs (utilisation, memory, PCIe traffic) as the daemon reports them."""

from __future__ import annotations

from textual.widgets import Static

from proto.moed.v1 import moed_pb2 as pb
from tui.widgets.format import NA, size


def device_lines(d: pb.Device) -> list[str]:
    """One device: name, utilisation, memory (used / total), threads, model; a GPU adds its PCIe traffic."""
    util = f"{d.utilization:4.0%}" if d.HasField("utilization") else f"{NA:>4}"
    mem = f"{size(d.memory_used_bytes)} / {size(d.memory_total_bytes)}" if d.memory_total_bytes else NA
    threads = f"  {d.threads} threads" if d.threads else ""
    lines = [f"{d.name:<7} {util}  {mem}{threads}  {d.description}"]
    if d.kind == "cuda":
        tx = f"{size(d.pcie_tx_bytes_per_second)}/s" if d.HasField("pcie_tx_bytes_per_second") else NA
        rx = f"{size(d.pcie_rx_bytes_per_second)}/s" if d.HasField("pcie_rx_bytes_per_second") else NA
        lines.append(f"{'':<7} pcie  to gpu {rx}  from gpu {tx}")
    return lines


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
        st = self.daemon_status
        devices = list(st.devices) if st else []
        lines = [f"{'':<7} {'busy':>4}  memory"] if devices else []
        for d in devices:
            lines += device_lines(d)
        if st and not any(d.kind == "cuda" for d in devices):
            lines.append(f"gpu     {st.gpu_note or NA}")
        lines.append(f"daemon  rss {size(self.rss)}" + (f"  pid {st.pid}" if st else ""))
        self.update("\n".join(lines))
