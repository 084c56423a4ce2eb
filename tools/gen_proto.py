#!/usr/bin/env python3
"""Regenerate proto/moed/v1/moed_pb2*.py(i) from moed.proto (or into --out for a check)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "proto/moed/v1/moed.proto"


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) on moed.proto, writing the Python modules under out; return them."""
    from grpc_tools import protoc
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    folder = out / Path(PROTO).parent
    return sorted(p for p in folder.iterdir() if p.name.startswith("moed_pb2"))


def main() -> int:
    """Command line: write into the repository (default) or --out."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=ROOT, help="root to write proto/moed/v1/... under")
    for f in generate(p.parse_args().out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
