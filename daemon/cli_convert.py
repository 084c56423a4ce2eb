"""`moed convert SOURCE OUT`: the subcommand and its terminal progress bar."""

from __future__ import annotations

import argparse
import sys
import time

from quant.groups import DEFAULT_GROUP, GROUP_SIZES
from quant.schemes import scheme_names


class ProgressBar:
    """A one-line progress bar on a terminal (stderr); silent when stderr is not a TTY."""

    def __init__(self, label: str, stream=None, width: int = 30) -> None:
        self.label, self.width = label, width
        self.stream = stream or sys.stderr
        self.on = self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        if not self.on:
            return
        frac = done / total if total else 1.0
        fill = int(frac * self.width)
        rate = nbytes / max(time.perf_counter() - self.t0, 1e-9) / 1e6
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{total} experts "
                          f"{nbytes / 1e6:.1f} MB {rate:.1f} MB/s")
        self.stream.flush()

    def close(self) -> None:
        """End the line."""
        if self.on:
            self.stream.write("\n")
            self.stream.flush()


def cmd_convert(a: argparse.Namespace) -> int:
    """Convert a model into a moed model directory."""
    from daemon.convert import convert

    bar = ProgressBar("converting")
    try:
        out = convert(a.source, a.out, a.group_size, a.scheme, a.force, bar)
    finally:
        bar.close()
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `convert` to the moed command line."""
    c = sub.add_parser("convert", help="convert a HF folder or GGUF file into a moed model directory")
    c.add_argument("source", help="Hugging Face model folder or GGUF file")
    c.add_argument("out", help="output directory (written under a temporary name, renamed when complete)")
    c.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP,
                   help="weights per scale/minimum along each row (default %(default)s)")
    c.add_argument("--scheme", choices=scheme_names(), default="msb",
                   help="msb: 8-bit codes as bit-planes; residual: 2-bit base + binary residual planes")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.set_defaults(func=cmd_convert)
