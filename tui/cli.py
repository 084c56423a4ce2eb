"""`moed top`: register the subcommand."""

from __future__ import annotations

import argparse

from daemon.errors import MoedError


def cmd_top(a: argparse.Namespace) -> int:
    """Run the monitor against the daemon."""
    from daemon.client import daemon_target
    from tui.app import MoedTop

    if a.interval <= 0:
        raise MoedError("--interval must be positive")
    target = daemon_target(a.socket, a.tcp)
    if target is None:
        raise MoedError("no daemon answers on the default sockets (give --socket or --tcp)")
    MoedTop(target, a.interval).run()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `moed top`."""
    t = sub.add_parser("top", help="live monitor of a running daemon (Textual)")
    where = t.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the daemon's unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="the daemon's TCP address (token: $MOED_TOKEN)")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between updates (default 1)")
    t.set_defaults(func=cmd_top)
