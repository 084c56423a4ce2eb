#!/usr/bin/env python3
"""How long the intra-layer scheduler takes to decide one layer, and how far its plans are from the optimum.

Layers: a model of --shape (default qwen3-30b-a3b: 128 routed experts, 8 per token) decoding one
token (8 experts active, 1 token each), and as a second case 4 tokens at once (about 29 active,
1-4 tokens each). Residency is drawn afresh for every layer: with a GPU, VRAM holds a random
share F of the layer's experts and RAM a random min(1, 2F); without one, RAM holds F; the others
are on flash only. Each held expert is held at a random bit-width of 3, 4, 6 or 8 and every
expert is asked for at --bits (4), so one held at 3 bits needs its fourth plane read or copied.
Op times: each machine's cost model at the model's shapes (the spec-sheet machines under
profiler/machines through their roofline, and this machine's measured profile where there is
one); CPU-only machines are that measured profile (if any) and the laptop's spec sheet without
its GPU.

Per (machine, F, case): wall-clock time of one schedule() call per layer over --layers layers
(median and p99, after a warm-up pass; also the best of 3 calls per layer, which leaves out
interruptions by other work), and on the first --optimum decode layers the gap of schedule() and
of HybriMoE's rules alone (schedule(search=False)) to optimal_plan's exact optimum, judged by
the same timing model. Writes bench/results/schedule_decision.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload.schedule import LayerCosts, optimal_plan, schedule  # noqa: E402
from profiler.machine import Machine, load_machine, machine_names  # noqa: E402
from profiler.shapes import ModelShape, preset  # noqa: E402

FRACTIONS = (0.25, 0.5, 1.0)
HELD_BITS = (3, 4, 6, 8)
CASES = (("decode: 1 token, 8 active", 1), ("4 tokens, ~29 active", 4))


def machines() -> list[Machine]:
    """The shipped spec-sheet machines, the laptop without its GPU, and this machine's measured profile."""
    out = [load_machine(n) for n in machine_names()]
    laptop = next((m for m in out if m.name.startswith("laptop")), out[0])
    spec = {k: v for k, v in laptop.spec.items() if k not in ("gpu", "pcie")}
    out.append(dataclasses.replace(laptop, name=f"{laptop.name}-cpu-only", has_gpu=False, vram_bytes=0, spec=spec,
                                   description=laptop.description + "; its GPU left out"))
    for cand in (ROOT / "bench" / "results" / "profile_this_machine.json", "this"):
        try:
            out.append(load_machine(cand))
            break
        except Exception:
            continue
    return out


def layer(rng: random.Random, shape: ModelShape, has_gpu: bool, fraction: float, tokens: int) -> tuple[dict, dict]:
    """(demand, residency) of one layer: `tokens` tokens routed top-k, residency drawn as the docstring says."""
    e = shape.num_experts
    demand: dict[int, int] = {}
    for _ in range(tokens):
        for x in rng.sample(range(e), shape.top_k):
            demand[x] = demand.get(x, 0) + 1
    fast = rng.sample(range(e), int(fraction * e))
    ram = rng.sample(range(e), min(e, int(2 * fraction * e))) if has_gpu else []
    residency: dict[int, dict[str, int]] = {}
    for x in fast:
        residency[x] = {"vram" if has_gpu else "ram": rng.choice(HELD_BITS)}
    for x in ram:
        residency.setdefault(x, {})["ram"] = rng.choice(HELD_BITS)
    return demand, residency


def pct(values: list[float], q: float) -> float:
    """The q-quantile of values (nearest rank)."""
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def measure(costs: LayerCosts, layers: list[tuple[dict, dict]], bits: int) -> dict:
    """Decision time per layer in microseconds: one call each, and the best of three."""
    clock = time.perf_counter_ns
    for d, r in layers:  # warm-up: fills the op-time memo as a running daemon's would be
        schedule(d, r, bits, costs)
    once, best = [], []
    for d, r in layers:
        t0 = clock()
        schedule(d, r, bits, costs)
        once.append((clock() - t0) / 1e3)
    for d, r in layers:
        ts = []
        for _ in range(3):
            t0 = clock()
            schedule(d, r, bits, costs)
            ts.append((clock() - t0) / 1e3)
        best.append(min(ts))
    return {"median_us": statistics.median(once), "p99_us": pct(once, 0.99), "max_us": max(once),
            "best_of_3_median_us": statistics.median(best), "best_of_3_p99_us": pct(best, 0.99)}


def gaps(costs: LayerCosts, layers: list[tuple[dict, dict]], bits: int) -> dict:
    """Mean and largest relative gap to the exact optimum of schedule() and of HybriMoE's rules alone."""
    ours, rules = [], []
    for d, r in layers:
        best = optimal_plan(d, r, bits, costs).finish_time
        ours.append(schedule(d, r, bits, costs).finish_time / best - 1)
        rules.append(schedule(d, r, bits, costs, search=False).finish_time / best - 1)
    return {"layers": len(layers), "gap_mean_pct": 100 * statistics.fmean(ours), "gap_max_pct": 100 * max(ours),
            "over_1pct": sum(g > 0.01 for g in ours),
            "rules_gap_mean_pct": 100 * statistics.fmean(rules), "rules_gap_max_pct": 100 * max(rules)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", help="model shape preset (default qwen3-30b-a3b)")
    ap.add_argument("--bits", type=int, default=4, help="bit-width every expert is asked for (default 4)")
    ap.add_argument("--layers", type=int, default=2000, help="decode layers timed per machine and share")
    ap.add_argument("--optimum", type=int, default=200, help="decode layers also solved exactly per machine and share")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="200 layers, 20 exact (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.optimum = 200, 20

    from profiler.hardware import describe
    shape = preset(a.shape)
    load_before = os.getloadavg()[0]
    rows = []
    t_start = time.perf_counter()
    for m in machines():
        costs = LayerCosts.from_op_times({b: m.times(shape, b) for b in HELD_BITS}, shape)
        for f in FRACTIONS:
            for case, tokens in CASES:
                rng = random.Random(a.seed)
                n = a.layers if tokens == 1 else max(a.layers // 4, 50)
                ls = [layer(rng, shape, m.has_gpu, f, tokens) for _ in range(n)]
                row = {"machine": m.name, "kind": m.kind, "gpu": m.has_gpu, "unified": m.unified, "fraction": f,
                       "case": case, "tokens": tokens, "layers": n,
                       "active_mean": statistics.fmean(len(d) for d, _ in ls), **measure(costs, ls, a.bits)}
                if tokens == 1 and a.optimum:
                    row.update(gaps(costs, ls[:a.optimum], a.bits))
                rows.append(row)
                print(f"{m.name:30} {f:4.2f} {case:26} median {row['median_us']:7.1f} us  p99 {row['p99_us']:7.1f} us"
                      + (f"  gap mean {row['gap_mean_pct']:.3f}% max {row['gap_max_pct']:.2f}%"
                         f"  (HybriMoE rules {row['rules_gap_mean_pct']:.2f}% / {row['rules_gap_max_pct']:.1f}%)"
                         if "gap_mean_pct" in row else ""), flush=True)
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shape": shape.to_dict(),
              "bits": a.bits, "held_bits": HELD_BITS, "fractions": FRACTIONS, "seed": a.seed,
              "seconds": round(time.perf_counter() - t_start, 1), "this_machine": describe(),
              "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
              "note": "decision times are wall clock on this machine in CPython; gaps are in predicted layer time "
                      "under the scheduler's timing model, against its exact optimum (optimal_plan)",
              "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "schedule_decision.json").write_text(json.dumps(result, indent=1) + "\n")
    cpu = result["this_machine"]
    lines = ["# Intra-layer scheduler: decision time and gap to the optimum", "",
             f"{result['created']}; {shape.name} ({shape.num_experts} experts, {shape.top_k} per token), experts "
             f"asked for at {a.bits} bits, held at {'/'.join(map(str, HELD_BITS))}; timed on {cpu['cpu']} "
             f"({cpu['logical_cpus']} CPUs, Python {cpu['python']}), load average {load_before:.2f} before, "
             f"{result['load_average_after']:.2f} after.",
             "Cache: the share of a layer's experts in the fast tier (VRAM, or RAM without a GPU); with a GPU RAM "
             "holds twice that share. Time: one schedule() call per layer (best of 3 in brackets). Gap: predicted "
             "layer time over the exact optimum, mean (max), for schedule() and for HybriMoE's rules alone, on "
             f"the first {a.optimum} decode layers.", "",
             "| machine | cache | layers | active | median us | p99 us | gap schedule | gap HybriMoE rules |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gap = (f"{r['gap_mean_pct']:.3f}% ({r['gap_max_pct']:.2f}%)", f"{r['rules_gap_mean_pct']:.2f}% "
               f"({r['rules_gap_max_pct']:.1f}%)") if "gap_mean_pct" in r else ("", "")
        lines.append(f"| {r['machine']}{'' if r['gpu'] else ' (no GPU)'} | {r['fraction']:.0%} | {r['case']} | "
                     f"{r['active_mean']:.1f} | {r['median_us']:.1f} ({r['best_of_3_median_us']:.1f}) | "
                     f"{r['p99_us']:.1f} ({r['best_of_3_p99_us']:.1f}) | {gap[0]} | {gap[1]} |")
    (out / "schedule_decision.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out / 'schedule_decision.json'} and {out / 'schedule_decision.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
