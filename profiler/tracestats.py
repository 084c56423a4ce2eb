"""Statistics of a routing trace: skew, reuse distance, and hit-rate curves of ideal and LRU caches.

Definitions (per MoE layer):
- uses: (token, expert) assignments; skew = share of the layer's uses taken by its top 10% of
  experts (at least one expert), i.e. the ceil(0.1 * E) most used ones.
- accesses: in every step, each distinct expert the layer used, in ascending expert id; this
  is the reference string a per-layer expert cache sees.
- reuse distance of an access: the number of distinct other experts of the layer accessed since
  the previous access to the same expert (an LRU stack distance); first accesses have none
  ("cold"). Step gap: steps since that previous access.
- hit-rate curves, for a per-layer cache of C experts (C = 1..E), demand-fetched (every missed
  expert is brought in): LRU hits = accesses whose reuse distance is < C; the ideal cache is
  Belady's MIN (evict the expert needed furthest in the future), computed for every C in one
  pass with Mattson's OPT stack algorithm. Curves over the whole model add hits and accesses
  of all layers at the same per-layer C.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from statistics import median

from profiler.trace import Trace

TOP_SHARE = 0.1


def layer_accesses(trace: Trace) -> dict[int, list[tuple[int, int]]]:
    """Per MoE layer, its accesses as (step, expert): the distinct experts of each step, ascending id."""
    out: dict[int, list[tuple[int, int]]] = {layer: [] for layer in trace.header.model.moe_layers}
    for s in trace.steps:
        for r in s.layers:
            out.setdefault(r.layer, []).extend((s.step, e) for e in _distinct(r))
    return out


def model_accesses(trace: Trace, decode_only: bool = False) -> list[tuple[int, int]]:
    """Every layer's accesses in the order a cache shared by all layers meets them (step by step, layer by layer):
    (layer, expert), each step's distinct experts of a layer in ascending id; decode steps (one token) only if
    asked."""
    return [(r.layer, e) for s in trace.steps if not decode_only or s.tokens == 1 for r in s.layers
            for e in _distinct(r)]


def _distinct(r) -> list[int]:
    """The distinct experts of a layer routing, ascending id."""
    return sorted({e for row in r.experts for e in row})


def layer_uses(trace: Trace) -> dict[int, Counter]:
    """Per MoE layer, the (token, expert) assignments of each expert."""
    out: dict[int, Counter] = {layer: Counter() for layer in trace.header.model.moe_layers}
    for s in trace.steps:
        for r in s.layers:
            out.setdefault(r.layer, Counter()).update(e for row in r.experts for e in row)
    return out


def skew(uses: Counter | dict[int, int], num_experts: int, share: float = TOP_SHARE) -> float:
    """Share of all uses taken by the ceil(share * E) most used experts (0 when there are no uses)."""
    total = sum(uses.values())
    if not total:
        return 0.0
    n = max(1, math.ceil(share * num_experts - 1e-9))
    return sum(sorted(uses.values(), reverse=True)[:n]) / total


def stack_distances(seq: list[int]) -> list[int | None]:
    """LRU stack distance of every access (distinct others since its previous access; None if first)."""
    stack: list[int] = []  # most recent first
    out: list[int | None] = []
    for x in seq:
        try:
            i = stack.index(x)
        except ValueError:
            out.append(None)
        else:
            out.append(i)
            del stack[i]
        stack.insert(0, x)
    return out


def lru_hits(distances: list[int | None], max_capacity: int) -> list[int]:
    """LRU hits for capacities 1..max_capacity from stack distances."""
    hist = Counter(d for d in distances if d is not None)
    hits, acc = [], 0
    for c in range(1, max_capacity + 1):
        acc += hist.get(c - 1, 0)
        hits.append(acc)
    return hits


def opt_hits(seq: list[int], max_capacity: int) -> list[int]:
    """Belady-MIN hits for capacities 1..max_capacity in one pass (Mattson's OPT stack algorithm)."""
    inf = math.inf
    next_use = [inf] * len(seq)
    seen: dict[int, int] = {}
    for t in range(len(seq) - 1, -1, -1):
        next_use[t] = seen.get(seq[t], inf)
        seen[seq[t]] = t
    prio: dict[int, float] = {}  # expert -> time of its next access
    stack: list[int] = []
    hist: Counter = Counter()
    for t, x in enumerate(seq):
        try:
            depth = stack.index(x)
        except ValueError:
            depth = len(stack)
            stack.append(x)
        else:
            hist[depth] += 1
        prio[x] = next_use[t]
        carried = stack[0] if depth > 0 else None
        for j in range(1, depth):  # level j keeps the one needed sooner; the other moves down
            if prio[stack[j]] > prio[carried]:
                stack[j], carried = carried, stack[j]
        if depth > 0:
            stack[depth] = carried
        stack[0] = x
    hits, acc = [], 0
    for c in range(1, max_capacity + 1):
        acc += hist.get(c - 1, 0)
        hits.append(acc)
    return hits


def fewest_misses(seq: list, capacity: int, preload: bool = True) -> int:
    """The fewest misses any cache of `capacity` items can have on `seq` knowing the future: it may start out
    holding any items (with `preload`: chosen with hindsight; else it starts empty) and may leave a missed item
    out (read, used once, not kept). Belady's MIN with that choice: the first `capacity` distinct items fill the
    cache (the preload, or misses), and on a miss the item needed furthest ahead, the missed one included, is
    the one not kept. A bound on every policy."""
    if capacity <= 0:
        return len(seq)
    inf = math.inf
    next_use = [inf] * len(seq)
    seen: dict = {}
    for t in range(len(seq) - 1, -1, -1):
        next_use[t] = seen.get(seq[t], inf)
        seen[seq[t]] = t
    cache: dict = {}  # item -> time of its next access
    misses = 0
    for t, x in enumerate(seq):
        if x not in cache and len(cache) < capacity:  # filling: the preload, or a miss
            misses += not preload
        elif x not in cache:
            misses += 1
            far = max(cache, key=cache.__getitem__)
            if cache[far] <= next_use[t]:
                continue  # the missed item is needed last: not kept
            del cache[far]
        cache[x] = next_use[t]
    return misses


@dataclass(frozen=True, slots=True)
class LayerStats:
    """The statistics of one MoE layer."""

    layer: int
    uses: int
    accesses: int
    skew: float
    cold: int  # first accesses
    reuse_mean: float | None
    reuse_median: float | None
    reuse_p90: float | None
    step_gap_mean: float | None
    lru_hits: tuple[int, ...]  # per capacity 1..E
    opt_hits: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TraceStats:
    """Per-layer statistics and the whole-model hit-rate curves."""

    label: str
    num_experts: int
    steps: int
    tokens: int
    layers: tuple[LayerStats, ...]

    def curve(self, kind: str) -> list[float]:
        """Whole-model hit rate per per-layer capacity 1..E; kind is 'lru' or 'opt'."""
        acc = sum(ls.accesses for ls in self.layers)
        if not acc:
            return [0.0] * self.num_experts
        return [sum(getattr(ls, f"{kind}_hits")[c] for ls in self.layers) / acc for c in range(self.num_experts)]

    def to_dict(self) -> dict:
        """A JSON-ready record."""
        return {"label": self.label, "num_experts": self.num_experts, "steps": self.steps, "tokens": self.tokens,
                "capacities": list(range(1, self.num_experts + 1)),
                "lru_hit_rate": self.curve("lru"), "opt_hit_rate": self.curve("opt"),
                "layers": [{"layer": ls.layer, "uses": ls.uses, "accesses": ls.accesses, "skew": ls.skew,
                            "cold": ls.cold, "reuse_mean": ls.reuse_mean, "reuse_median": ls.reuse_median,
                            "reuse_p90": ls.reuse_p90, "step_gap_mean": ls.step_gap_mean,
                            "lru_hit_rate": [h / ls.accesses if ls.accesses else 0.0 for h in ls.lru_hits],
                            "opt_hit_rate": [h / ls.accesses if ls.accesses else 0.0 for h in ls.opt_hits]}
                           for ls in self.layers]}


def _p90(v: list[int]) -> float:
    s = sorted(v)
    return float(s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)])


def trace_stats(trace: Trace) -> TraceStats:
    """Skew, reuse distances and LRU/ideal hit counts of every MoE layer of a trace."""
    e = trace.header.model.num_experts
    uses = layer_uses(trace)
    out = []
    for layer, acc in sorted(layer_accesses(trace).items()):
        seq = [x for _, x in acc]
        dist = stack_distances(seq)
        last: dict[int, int] = {}
        gaps = []
        for step, x in acc:
            if x in last:
                gaps.append(step - last[x])
            last[x] = step
        finite = [d for d in dist if d is not None]
        out.append(LayerStats(
            layer, sum(uses[layer].values()), len(seq), skew(uses[layer], e), len(dist) - len(finite),
            sum(finite) / len(finite) if finite else None, float(median(finite)) if finite else None,
            _p90(finite) if finite else None, sum(gaps) / len(gaps) if gaps else None,
            tuple(lru_hits(dist, e)), tuple(opt_hits(seq, e))))
    return TraceStats(trace.header.label, e, len(trace.steps), trace.tokens, tuple(out))


def format_stats(st: TraceStats, fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)) -> str:
    """A text report: the label, per-layer skew and reuse, and hit rates at a few cache sizes."""
    caps = sorted({max(1, min(st.num_experts, round(f * st.num_experts))) for f in fractions})
    lines = [st.label, f"{st.steps} steps, {st.tokens} tokens, {len(st.layers)} MoE layers, "
                       f"{st.num_experts} experts per layer", ""]
    head = f"{'layer':>5} {'uses':>7} {'skew':>6} {'cold':>5} {'reuse mean':>10} {'median':>7} {'p90':>5} {'gap':>6}"
    for c in caps:
        head += f" {'LRU@' + str(c):>7} {'MIN@' + str(c):>7}"
    lines.append(head)

    def fmt(v: float | None, w: int, p: int = 1) -> str:
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}"

    for ls in st.layers:
        row = (f"{ls.layer:>5} {ls.uses:>7} {ls.skew:>6.3f} {ls.cold:>5} {fmt(ls.reuse_mean, 10, 2)} "
               f"{fmt(ls.reuse_median, 7)} {fmt(ls.reuse_p90, 5, 0)} {fmt(ls.step_gap_mean, 6, 2)}")
        for c in caps:
            a = ls.accesses or 1
            row += f" {ls.lru_hits[c - 1] / a:>7.3f} {ls.opt_hits[c - 1] / a:>7.3f}"
        lines.append(row)
    lru, opt = st.curve("lru"), st.curve("opt")
    lines += ["", "hit rate vs per-layer cache capacity (experts):",
              f"{'capacity':>8} {'LRU':>7} {'ideal':>7}"]
    for c in range(1, st.num_experts + 1):
        lines.append(f"{c:>8} {lru[c - 1]:>7.3f} {opt[c - 1]:>7.3f}")
    return "\n".join(lines)
