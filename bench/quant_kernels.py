#!/usr/bin/env python3
"""Expert FFN kernels per backend and bit-width: time per call, error against the reference, memory.

For each available backend (reference = dequantise-then-matmul in float32, torch = torch's CPU int4/int8
weight-only matmuls, onnxruntime = MatMulNBits at accuracy levels 4 and 0, native = moed's own int8
kernels in quant/native.c, cuda when present), each
scheme and r in 8, 6, 4, 3, 2: median seconds of one expert FFN on T tokens, the relative L2 error of its
output against the reference backend, the bytes its compute form holds, and the time to build that form
from the planes (the unpack cost the cost model needs). Shapes: one Qwen3-30B-A3B expert
(hidden 2048, expert width 768) and the tiny test expert (256, 256).

Writes bench/results/quant_kernels.json and bench/results/quant_kernels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.quant_quality import machine  # noqa: E402

BITS = (8, 6, 4, 3, 2)
SHAPES = {"qwen3-30b-a3b expert": (2048, 768), "tiny expert": (256, 256)}
BACKENDS = [("reference", {}), ("torch", {}), ("onnxruntime", {"accuracy_level": 4}),
            ("onnxruntime", {"accuracy_level": 0}), ("native", {}), ("cuda", {})]


def label(name: str, opts: dict) -> str:
    return name + "".join(f" ({k.replace('_', ' ')} {v})" for k, v in opts.items())


def timed(fn, repeat: int) -> tuple[float, float]:
    """(median, minimum) seconds of fn() after two warm-up calls; the minimum resists a busy machine."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


@torch.inference_mode()
def run(shapes: dict, schemes: list[str], tokens: list[int], repeat: int) -> list[dict]:
    from quant.kernels import available_backends, get_backend
    from quant.schemes import scheme
    from quant.views import ExpertViews
    rows = []
    ref = get_backend("reference")
    for shape_name, (d, i) in shapes.items():
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(i, d, generator=g) * d ** -0.5, torch.randn(i, d, generator=g) * d ** -0.5,
              torch.randn(d, i, generator=g) * i ** -0.5]
        xs = {t: torch.randn(t, d, generator=g) for t in tokens}
        for sname in schemes:
            s = scheme(sname)
            encs = [s.encode(w, 128) for w in ws]
            for r in BITS:
                views = ExpertViews(*(s.view(e, r) for e in encs))
                want = ref.prepare_expert(views, "silu")
                for name, opts in BACKENDS:
                    if name not in available_backends():
                        continue
                    b = get_backend(name, **opts)
                    t0 = time.perf_counter()
                    form = b.prepare_expert(views, "silu")
                    prep = time.perf_counter() - t0
                    row = {"shape": shape_name, "scheme": sname, "bits": r, "backend": label(name, opts),
                           "form_bytes": form.nbytes, "prepare_s": prep}
                    for t, x in xs.items():
                        y = b.ffn(x, form)
                        y_ref = ref.ffn(x, want)
                        row[f"rel_err_T{t}"] = float((y - y_ref).norm() / y_ref.norm())
                        row[f"seconds_T{t}"], row[f"min_seconds_T{t}"] = timed(lambda: b.ffn(x, form), repeat)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    return rows


def markdown(res: dict) -> str:
    """Tables: one row per backend, one column per bit-width."""
    tokens = res["tokens"]
    L = ["# Expert FFN kernels: speed and error per backend", "",
         f"Machine: {res['machine']['cpu']}, {res['machine']['torch_threads']} threads, torch {res['machine']['torch']}, "
         f"onnxruntime {res.get('onnxruntime')}; load average at start {res['loadavg']}, at end "
         f"{res.get('loadavg_end')} (a shared machine: read minima). Command: "
         f"`{res['command']}`. Time: minimum (median) of {res['repeat']} calls; error = ||y - y_ref|| / ||y_ref|| against "
         "the float32 dequantise-then-matmul reference; form = bytes the compute form holds; prepare = time to "
         "build it from the views.", ""]
    for shape in SHAPES:
        for sname in res["schemes"]:
            rows = [r for r in res["rows"] if r["shape"] == shape and r["scheme"] == sname]
            if not rows:
                continue
            L += [f"## {shape}, {sname}", "",
                  "| backend | " + " | ".join(f"r={r}" for r in BITS) + " |", "|---|" + "---|" * len(BITS)]
            for backend in dict.fromkeys(r["backend"] for r in rows):
                cells = []
                for b in BITS:
                    r = next(x for x in rows if x["backend"] == backend and x["bits"] == b)
                    t = " / ".join(f"T={n}: {r[f'min_seconds_T{n}'] * 1e6:.0f} ({r[f'seconds_T{n}'] * 1e6:.0f}) us"
                                   for n in tokens)
                    cells.append(f"{t}; err {max(r[f'rel_err_T{n}'] for n in tokens):.1e}; form "
                                 f"{r['form_bytes'] / 1e6:.2f} MB; prepare {r['prepare_s'] * 1e3:.0f} ms")
                L.append(f"| {backend} | " + " | ".join(cells) + " |")
            L.append("")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schemes", nargs="+", default=["msb", "residual"], choices=["msb", "residual"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args(argv)
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    res = {"machine": machine(), "onnxruntime": ort_version, "loadavg": [round(x, 2) for x in os.getloadavg()],
           "command": "python bench/quant_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "repeat": a.repeat, "tokens": a.tokens, "schemes": a.schemes,
           "rows": run({k: SHAPES[k] for k in a.shapes}, a.schemes, a.tokens, a.repeat)}
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quant_kernels.json").write_text(json.dumps(res, indent=1))
    (a.out / "quant_kernels.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
