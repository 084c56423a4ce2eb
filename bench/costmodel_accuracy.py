#!/usr/bin/env python3
"""How well the fitted cost model predicts op times it was not fitted on.

Fits a CostModel on one probe run (token counts 1, 2, 4, ... 512; attention batches 1 and 4;
flash reads of 4 KiB .. 16 MiB; ...) and then probes a held-out set of sizes the fit never saw
(token counts 3, 6, 12, ... 384; attention batch 2 and other context lengths; other read and
unpack sizes). For every op it reports the mean absolute percentage error (MAPE) of the
prediction against the held-out lower quartiles (the statistic the fit goes through; timing
noise from other work only adds time). Writes bench/results/costmodel.json and
bench/results/costmodel.md with the machine's description and its load while measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from profiler.costmodel import FIT_QUANTILE, CostModel, Sample, op_kind, quantile  # noqa: E402
from profiler.probes import ProbePlan  # noqa: E402
from profiler.profile import busy  # noqa: E402

FIT = ProbePlan(tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), ffn_bits=(8, 4), rotate=4, attn_batches=(1, 4),
                attn_contexts=(128, 512, 2048, 8192), copy_sizes=tuple(1 << i for i in range(12, 29, 2)),
                flash_sizes=(4096, 65536, 1 << 20, 16 << 20), flash_file_bytes=256 << 20, unpack_bits=(8, 4),
                unpack_rows=(64, 256, 1024), repeats=5, min_time=0.05, max_time=0.6)
HELD_OUT = dataclasses.replace(FIT, tokens=(3, 6, 12, 24, 48, 96, 192, 384), attn_batches=(1, 2),
                               attn_contexts=(256, 1024, 4096), copy_sizes=tuple(3 << i for i in range(12, 27, 2)),
                               flash_sizes=(16384, 262144, 4 << 20), unpack_rows=(128, 512))
QUICK_FIT = dataclasses.replace(FIT, tokens=(1, 4, 16, 64, 256), ffn_bits=(4,), attn_contexts=(128, 2048),
                                flash_sizes=(4096, 1 << 20, 16 << 20), flash_file_bytes=64 << 20, unpack_rows=(64, 512),
                                repeats=3, min_time=0.02, max_time=0.3)
QUICK_HELD = dataclasses.replace(QUICK_FIT, tokens=(2, 8, 32, 128), attn_batches=(1, 2), attn_contexts=(512,),
                                 flash_sizes=(65536, 4 << 20), unpack_rows=(256,))


def run_probes(plan: ProbePlan, shape, folder: Path) -> tuple[list[Sample], dict]:
    """Every probe of the plan on this machine's devices."""
    import torch

    from profiler.flash import probe_flash
    from profiler.probes import probe_attention, probe_ffn, probe_h2d, probe_unpack

    samples, meta = [], {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        s, m, _ = probe_ffn(shape, plan, dev)
        samples += s
        meta.update(m)
        s, m = probe_attention(shape, plan, dev)
        samples += s
        meta.update(m)
    samples += probe_h2d(plan)[0]
    s, info = probe_flash(folder, list(plan.flash_sizes), plan.repeats, plan.flash_file_bytes)
    samples += s
    meta["flash:read"] = info
    s, m, _ = probe_unpack(shape, plan)
    samples += s
    meta.update(m)
    return samples, meta


def predict(cm: CostModel, op: str, x: float) -> float | None:
    """The model's answer for a held-out sample's op and size (attention through batch interpolation)."""
    if op_kind(op) == "attn":
        _, dev, b = op.split(":")
        return cm.attention(dev, int(b[1:]), x)
    return cm.predict(op, x) if op in cm.curves else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    ap.add_argument("--shape", default="qwen3-30b-a3b", help="model shape to probe (profiler.shapes.PRESETS)")
    ap.add_argument("--flash-dir", default=None, help="folder on the disk to probe (default: moed's state dir)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    a = ap.parse_args()

    from profiler.hardware import machine_facts
    from profiler.profile import state_dir
    from profiler.shapes import preset

    shape = preset(a.shape)
    folder = Path(a.flash_dir) if a.flash_dir else state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fit_plan, held_plan = (QUICK_FIT, QUICK_HELD) if a.quick else (FIT, HELD_OUT)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    fit_samples, meta = run_probes(fit_plan, shape, folder)
    cm = CostModel.fit(fit_samples, meta)
    t1 = time.perf_counter()
    held, _ = run_probes(held_plan, shape, folder)
    t2 = time.perf_counter()
    load1 = os.getloadavg()[0]

    by_point: dict[tuple[str, float], list[float]] = {}
    for s in held:
        by_point.setdefault((s.op, s.x), []).append(s.seconds)
    ops: dict[str, dict] = {}
    for (op, x), secs in sorted(by_point.items()):
        measured = quantile(secs, FIT_QUANTILE)  # the statistic the fit targets
        pred = predict(cm, op, x)
        if pred is None:
            continue
        d = ops.setdefault(op, {"points": [], "ape_pct": []})
        d["points"].append({"x": x, "measured_s": measured, "predicted_s": pred, "samples": len(secs)})
        d["ape_pct"].append(100 * abs(pred - measured) / measured)
    for d in ops.values():
        d["mape_pct"] = round(statistics.mean(d.pop("ape_pct")), 2)
    kinds: dict[str, list[float]] = {}
    for op, d in ops.items():
        kinds.setdefault(op_kind(op), []).append(d["mape_pct"])
    facts = machine_facts(folder)
    note = (f"1-minute load average {load0:.2f} before and {load1:.2f} after on {os.cpu_count()} CPUs"
            + ("; other processes were running, so timings are noisy" if busy(load0) else ""))
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": a.quick,
        "machine": {"cpu": facts.cpu.model, "cores": facts.cpu.logical_cores,
                    "ram_gib": round(facts.ram_total_bytes / 2**30, 1),
                    "gpus": [g.name for g in facts.gpus], "disk": facts.disk.device if facts.disk else None,
                    "platform": facts.platform},
        "load_note": note, "shape": shape.to_dict(), "fit_plan": dataclasses.asdict(fit_plan),
        "held_out_plan": dataclasses.asdict(held_plan), "seconds": {"fit_probes": round(t1 - t0, 1),
                                                                    "held_out_probes": round(t2 - t1, 1)},
        "mape_pct_by_kind": {k: round(statistics.mean(v), 2) for k, v in sorted(kinds.items())},
        "ops": ops,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "costmodel.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Cost model accuracy on held-out sizes", "",
             f"{result['created']}, {facts.cpu.model} ({facts.cpu.logical_cores} CPUs), "
             f"{result['machine']['ram_gib']} GiB RAM, GPUs: {', '.join(result['machine']['gpus']) or 'none'}.",
             f"{note}.", "",
             "Fitted on one probe run, predicted on sizes the fit never saw "
             f"(tokens {', '.join(map(str, held_plan.tokens))}; attention batches {held_plan.attn_batches}, contexts "
             f"{held_plan.attn_contexts}; other read/copy/unpack sizes).", "",
             "| op | held-out points | MAPE % |", "|---|---:|---:|"]
    for op, d in ops.items():
        lines.append(f"| {op} | {len(d['points'])} | {d['mape_pct']:.1f} |")
    lines += ["", "| kind | mean MAPE % |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["mape_pct_by_kind"].items()]
    (out / "costmodel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
