#!/usr/bin/env python3
"""Every placement/caching policy over the available routing traces and machine profiles, simulated.

Traces: synthetic ones generated here (labelled SYNTHETIC: real models' shapes, routing drawn
with tunable skew and temporal locality), plus every *.jsonl under bench/traces/ (recorded
with `moed generate --record-trace`). Machines: this machine's measured profile (if one was
made: bench/results/profile_this_machine.json or moed's state directory) and the spec-sheet
files under profiler/machines/. Budgets: 25%, 50% and 75% of all routed-expert bytes (at
--bits) in the fast tier (VRAM with a discrete GPU with RAM unbounded, RAM on a CPU-only
machine with the rest on flash, the shared pool on unified memory). Writes
bench/results/policies.json and bench/results/policies.md: simulated time per token relative
to the lower bound of the same work (perfect overlap, every expert resident).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from profiler.machine import Machine, load_machine, machine_names  # noqa: E402
from profiler.policies import make_policy  # noqa: E402
from profiler.shapes import preset  # noqa: E402
from profiler.simulator import lower_bound, simulate  # noqa: E402
from profiler.synthetic import SyntheticParams, synthetic_trace  # noqa: E402
from profiler.trace import Trace, read_trace  # noqa: E402

POLICIES = ("llamacpp", "ktransformers", "lru", "hybrimoe")
FRACTIONS = (0.25, 0.5, 0.75)
UNBOUNDED = 1 << 50
SYNTHETIC = (  # (shape, knobs): real shapes, routing with the skew and locality stated
    ("qwen3-30b-a3b", SyntheticParams(steps=96, prefill=32, skew=1.0, locality=0.3, drift=32, seed=1)),
    ("mixtral-8x7b", SyntheticParams(steps=96, prefill=32, skew=0.6, locality=0.3, seed=2)),
    ("deepseek-v2-lite", SyntheticParams(steps=96, prefill=32, skew=1.2, locality=0.4, drift=48, seed=3)),
)


def traces(extra: Path, quick: bool) -> list[tuple[str, Trace]]:
    """The synthetic traces and any recorded ones under `extra`."""
    out = []
    for name, p in SYNTHETIC[:1] if quick else SYNTHETIC:
        if quick:
            p = SyntheticParams(steps=24, prefill=8, skew=p.skew, locality=p.locality, seed=p.seed)
        out.append((f"synthetic:{name}", synthetic_trace(preset(name), p)))
    for f in sorted(extra.glob("*.jsonl")) if extra.is_dir() else []:
        out.append((f"recorded:{f.stem}", read_trace(f)))
    return out


def machines(this: str | None) -> list[Machine]:
    """This machine's measured profile (when there is one) and the shipped spec-sheet machines."""
    out = []
    for cand in ([this] if this else []) + [str(ROOT / "bench" / "results" / "profile_this_machine.json"), "this"]:
        try:
            out.append(load_machine(cand))
            break
        except Exception:
            continue
    return out + [load_machine(n) for n in machine_names()]


def budgets(m: Machine, total: int, fraction: float) -> tuple[int, int]:
    """(vram, ram) budgets putting `fraction` of the expert bytes in the machine's fast tier."""
    fast = int(total * fraction)
    if m.unified:
        return fast, 0
    return (fast, UNBOUNDED) if m.has_gpu else (0, fast)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4, help="bit-width experts are held at (default 4)")
    ap.add_argument("--this-profile", help="profile JSON of this machine (default: bench/results or state dir)")
    ap.add_argument("--traces", default=str(ROOT / "bench" / "traces"), help="folder of recorded traces")
    ap.add_argument("--quick", action="store_true", help="one short synthetic trace (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    a = ap.parse_args()

    rows = []
    t0 = time.perf_counter()
    ms = machines(a.this_profile)
    for tname, tr in traces(Path(a.traces), a.quick):
        shape = tr.header.model
        total = len(shape.moe_layers) * shape.num_experts * shape.expert_bytes(a.bits)
        decode = [i for i, s in enumerate(tr.steps) if s.tokens == 1]
        for m in ms:
            times = m.times(shape, a.bits)
            lb, lb_steps = lower_bound(tr, times)
            for f in FRACTIONS:
                vram, ram = budgets(m, total, f)
                for p in POLICIES:
                    r = simulate(tr, times, make_policy(p), vram, ram, a.bits)
                    dec = sum(r.step_times[i] for i in decode) / len(decode) if decode else None
                    dec_lb = sum(lb_steps[i] for i in decode) / len(decode) if decode else None
                    rows.append({"trace": tname, "trace_label": tr.header.label, "machine": m.name,
                                 "machine_kind": m.kind, "fraction": f, "policy": p,
                                 "per_token_ms": 1e3 * r.per_token_s, "lower_bound_per_token_ms": 1e3 * lb / tr.tokens,
                                 "ratio": r.time_s / lb, "decode_ms_per_token": None if dec is None else 1e3 * dec,
                                 "decode_ratio": None if dec is None else dec / dec_lb,
                                 "hit_rate": {t: round(r.hit_rate(t), 4) for t in ("vram", "ram", "flash")},
                                 "link_gib": {k: round(v / 2**30, 4) for k, v in r.link_bytes.items()},
                                 "prefetched": r.prefetched, "notes": times.notes})
                    print(f"{tname:28} {m.name:24} {f:4.2f} {p:13} {rows[-1]['per_token_ms']:10.3f} ms/token "
                          f"x{rows[-1]['ratio']:.3f} of bound", flush=True)
    elapsed = time.perf_counter() - t0
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "bits": a.bits,
              "seconds": round(elapsed, 1), "policies": POLICIES, "fractions": FRACTIONS,
              "machines": [{"name": m.name, "kind": m.kind, "description": m.description, "sources": m.sources}
                           for m in ms],
              "note": "simulated, not measured: op times come from each machine's profile; the synthetic traces "
                      "are labelled SYNTHETIC and are not any real model's routing",
              "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policies.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Policies in the trace-driven simulator", "",
             f"{result['created']}; experts at {a.bits} bits; {result['note']}.",
             "Each cell: simulated time per token / lower bound of the same work (perfect overlap, every expert "
             "resident); the bound's ms per token is in its own column. Fraction: share of all routed-expert bytes "
             "in the fast tier (VRAM; RAM on CPU-only; the shared pool on unified memory).", "",
             "| trace | machine | fast tier | bound ms/token | " + " | ".join(POLICIES) + " |",
             "|---|---|---:|---:|" + "---:|" * len(POLICIES)]
    keyed: dict[tuple, dict] = {}
    for r in rows:
        keyed.setdefault((r["trace"], r["machine"], r["fraction"]), {})[r["policy"]] = r
    for (tname, mname, f), by in keyed.items():
        any_row = next(iter(by.values()))
        lines.append(f"| {tname} | {mname} | {f:.0%} | {any_row['lower_bound_per_token_ms']:.3f} | "
                     + " | ".join(f"{by[p]['ratio']:.2f}" for p in POLICIES) + " |")
    lines += ["", "Machines:"] + [f"- {m.name} ({m.kind}): {m.description}" for m in ms]
    lines += ["", "Traces:"] + sorted({f"- {r['trace']}: {r['trace_label']}" for r in rows})
    (out / "policies.md").write_text("\n".join(lines) + "\n")
    print(f"\n{len(rows)} simulations in {elapsed:.0f} s; wrote {out / 'policies.json'} and {out / 'policies.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
