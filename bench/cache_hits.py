"""Hit rates of the expert cache policies on recorded routing traces, at several cache sizes.

    python bench/cache_hits.py [TRACE ...]   (default: bench/traces/*.jsonl)

Each trace is replayed through offload/cache.py's policies (the same objects the runtime's tiered
experts use) with a cache of 25%, 50% and 75% of the model's routed experts (all experts the same
size, demand-fetched, a layer's experts pinned while it runs). An access is one distinct expert of
a layer in a step (as `moed trace stats` counts them); the prefill step of each trace counts too. Beside
them, the bound on every policy: the most hits a cache of that size starting empty could have knowing the
future (profiler.tracestats.fewest_misses: Belady's MIN, a missed expert used without being kept if that
is better).
Writes bench/results/cache_hits.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offload.cache import POLICIES, make_cache_policy, replay  # noqa: E402
from profiler.trace import read_trace  # noqa: E402
from profiler.tracestats import fewest_misses, model_accesses  # noqa: E402

SHARES = (0.25, 0.5, 0.75)


def events(trace):
    """(layer, counts, scores) per layer routing, in step order."""
    top = 2 * trace.header.model.top_k
    for step in trace.steps:
        for r in step.layers:
            yield r.layer, r.counts(), r.expert_scores(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    files = [Path(t) for t in a.traces] or sorted((ROOT / "bench" / "traces").glob("*.jsonl"))
    if not files:
        sys.exit("no traces (record some with tools/record_traces.py)")
    results = []
    for f in files:
        trace = read_trace(f)
        shape = trace.header.model
        n = len(shape.moe_layers) * shape.num_experts
        for share in SHARES:
            cap = max(1, round(share * n))
            row = {"trace": f.name, "share": share, "capacity_experts": cap}
            for name in POLICIES:
                r = replay(events(trace), make_cache_policy(name, len(shape.moe_layers)), cap)
                row[name] = round(r.hit_rate, 4)
                row["accesses"] = r.accesses
            seq = model_accesses(trace)
            assert len(seq) == row["accesses"], "the bound counts other accesses than the replays"
            row["ideal"] = round(1 - fewest_misses(seq, cap, preload=False) / len(seq), 4)
            results.append(row)
            print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_hits.json").write_text(json.dumps({"command": "python bench/cache_hits.py " + " ".join(a.traces),
                                                     "results": results}, indent=1) + "\n")
    names = list(POLICIES)
    lines = ["# Expert cache hit rates on recorded traces", "",
             f"Command: `python bench/cache_hits.py {' '.join(a.traces)}`. Cache = share of all routed experts "
             "(one pool; lru/lfu/score split it evenly per layer, moed shares it). Hit rate = hits / accesses "
             "(distinct experts of a layer per step). ideal: the most any policy could hit, knowing the future "
             "(Belady's MIN from an empty cache, leaving a missed expert out where that is better).", "",
             "| trace | cache | accesses | " + " | ".join(names) + " | moed - score | ideal |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for r in results:
        lines.append(f"| {r['trace']} | {r['share']:.0%} ({r['capacity_experts']}) | {r['accesses']} | "
                     + " | ".join(f"{r[n]:.3f}" for n in names)
                     + f" | {r['moed'] - r['score']:+.3f} | {r['ideal']:.3f} |")
    (out / "cache_hits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
