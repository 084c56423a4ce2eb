"""Help screen: the key bindings."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = """\
moed top: a live view of a moed daemon

  q               quit
  p               pause / resume updates
  tab, shift+tab  next / previous panel
  h/l, arrows     previous / next layer in the expert heatmap
  ?               this help (escape or ? closes it)

Panels: throughput (tokens/s), requests (queue, TTFT and inter-token
latency p50/p95), memory tiers (used of budget, hit rate, link bytes/s),
expert heatmap (colour: recent use per layer and expert; text: the tier
it is held in, v vram / r ram / f flash, and its bits), devices (CPU,
RAM; GPU use, memory and PCIe traffic from NVML), cost model (predicted
vs measured decode step time; needs a profile from `moed profile`)."""


class HelpScreen(ModalScreen[None]):
    """The key bindings, over the main screen."""

    BINDINGS = [("escape,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        yield Static(KEYS, id="help")
