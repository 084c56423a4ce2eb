"""`moed top`: the Textual app that shows a moed daemon's Watch and Status."""

from __future__ import annotations

from textual import work
from textual.app import App, ComposeResult
from textual.containers import Grid
from textual.css.query import NoMatches
from textual.widgets import Footer, Static

from proto.moed.v1 import moed_pb2 as pb
from tui.feed import Connected, Disconnected, Feed, Snapshot, StatusReport
from tui.widgets.costmodel import CostModelPanel
from tui.widgets.devices import DevicesPanel
from tui.widgets.format import size
from tui.widgets.heatmap import Heatmap
from tui.widgets.help import HelpScreen
from tui.widgets.requests import RequestsPanel
from tui.widgets.throughput import ThroughputPanel
from tui.widgets.tiers import TiersPanel


class MoedTop(App[None]):
    """Panels fed by a daemon's Watch stream; target None shows only what show_* is given."""

    CSS_PATH = "moed_top.tcss"
    TITLE = "moed top"
    BINDINGS = [("q", "quit", "quit"), ("p", "pause", "pause"), ("question_mark", "help", "help")]

    def __init__(self, target: str | None, interval: float = 1.0, token: str | None = None) -> None:
        super().__init__()
        self.target = target
        self.feed = Feed(target, interval, token) if target else None
        self.paused = False
        self.problem: str | None = None  # why the feed is disconnected
        self.model = ""
        self.snapshots = 0

    def compose(self) -> ComposeResult:
        yield Static("connecting", id="conn", markup=False)
        with Grid(id="panels"):
            yield ThroughputPanel()
            yield RequestsPanel(markup=False)
            yield TiersPanel(markup=False)
            yield Heatmap()
            yield DevicesPanel(markup=False)
            yield CostModelPanel(markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ThroughputPanel).focus()
        if self.feed is not None:
            self.run_feed()

    def on_unmount(self) -> None:
        if self.feed is not None:
            self.feed.stop()

    @work(thread=True, exclusive=True, group="feed")
    def run_feed(self) -> None:
        """Run the feed in a worker thread; it posts its messages to this app."""
        self.feed.run(self.post_message)

    def on_snapshot(self, m: Snapshot) -> None:
        if not self.paused:
            self.show_snapshot(m.snapshot)

    def on_status_report(self, m: StatusReport) -> None:
        if not self.paused:
            self.show_status(m.status)

    def on_connected(self, m: Connected) -> None:
        self.problem = None
        self.refresh_conn()

    def on_disconnected(self, m: Disconnected) -> None:
        self.problem = f"disconnected from {self.target}: {m.reason} (retrying in {m.retry_in:.1f}s)"
        self.refresh_conn()

    def show_snapshot(self, s: pb.MetricsSnapshot) -> None:
        """Render one MetricsSnapshot in every panel."""
        self.snapshots += 1
        for panel in (ThroughputPanel, RequestsPanel, TiersPanel, Heatmap, DevicesPanel, CostModelPanel):
            if (w := self._main(panel)) is not None:
                w.update_snapshot(s)

    def show_status(self, st: pb.StatusResponse) -> None:
        """Render one StatusResponse (model line, devices)."""
        state = pb.ServingState.Name(st.state).removeprefix("SERVING_STATE_").lower()
        model = f"{st.model.name} ({st.model.architecture}, {st.model.moe_layers}x{st.model.experts_per_layer} " \
                f"experts)" if st.HasField("model") and st.model.name else "no model"
        self.model = f"moed {st.version}  {state}  {model}  rss {size(st.rss_bytes)}"
        if (w := self._main(DevicesPanel)) is not None:
            w.update_status(st)
        self.refresh_conn()

    def _main(self, what, kind=None):
        """A widget of the main screen (whichever screen is on top), or None once the app is closing: the
        feed's thread may still post a message then."""
        try:
            return self.screen_stack[0].query_one(what, kind)
        except (NoMatches, IndexError):
            return None

    def refresh_conn(self) -> None:
        """Redraw the top line: connection state, model, paused."""
        conn = self._main("#conn", Static)
        if conn is None:
            return
        conn.set_class(self.problem is not None, "disconnected")
        conn.set_class(self.paused, "paused")
        line = self.problem or (f"{self.target or 'recorded'}  {self.model}" if self.model
                                else f"connecting to {self.target}")
        conn.update(("[paused] " if self.paused else "") + line)

    def action_pause(self) -> None:
        """Stop or resume updating the panels."""
        self.paused = not self.paused
        self.refresh_conn()

    def action_help(self) -> None:
        """Show the key bindings."""
        self.push_screen(HelpScreen())
