"""Brute-force cache statistics of a routing trace, written independently of profiler.tracestats."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from profiler.trace import Trace


def bf_accesses(trace: Trace, layer: int) -> list[int]:
    out = []
    for s in trace.steps:
        for r in s.layers:
            if r.layer == layer:
                used = set()
                for row in r.experts:
                    used.update(row)
                out += sorted(used)
    return out


def bf_skew(trace: Trace, layer: int) -> float:
    counts = Counter()
    for s in trace.steps:
        for r in s.layers:
            if r.layer == layer:
                for row in r.experts:
                    for e in row:
                        counts[e] += 1
    e = trace.header.model.num_experts
    top = math.ceil(e / 10)
    return sum(sorted(counts.values(), reverse=True)[:top]) / sum(counts.values())


def bf_reuse(seq: list[int]) -> list[int | None]:
    out = []
    for t, x in enumerate(seq):
        prev = [u for u in range(t) if seq[u] == x]
        out.append(None if not prev else len(set(seq[prev[-1] + 1:t]) - {x}))
    return out


def bf_lru(seq: list[int], cap: int) -> int:
    cache: list[int] = []  # least recent first
    hits = 0
    for x in seq:
        if x in cache:
            hits += 1
            cache.remove(x)
        elif len(cache) == cap:
            cache.pop(0)
        cache.append(x)
    return hits


def bf_belady(seq: list[int], cap: int) -> int:
    cache: set[int] = set()
    hits = 0
    for t, x in enumerate(seq):
        if x in cache:
            hits += 1
            continue
        if len(cache) == cap:
            def next_use(y):
                return next((u for u in range(t + 1, len(seq)) if seq[u] == y), math.inf)
            cache.remove(max(sorted(cache), key=next_use))
        cache.add(x)
    return hits


def bf_optimal(seq: list[int], cap: int) -> int:
    """The most hits any demand-fetching cache of `cap` can get: search over every eviction choice."""
    best = {frozenset(): 0}
    for x in seq:
        nxt: dict[frozenset, int] = {}
        for cache, hits in best.items():
            if x in cache:
                options = [(cache, hits + 1)]
            elif len(cache) < cap:
                options = [(cache | {x}, hits)]
            else:
                options = [((cache - {v}) | {x}, hits) for v in cache]
            for c, h in options:
                nxt[c] = max(nxt.get(c, -1), h)
        best = nxt
    return max(best.values())


def bf_fewest_misses(seq: list[int], cap: int, preload: bool = True) -> int:
    """The fewest misses of a cache of `cap` that may start with any items (else empty) and may leave a missed
    item out: search over every starting set and every choice at every miss."""
    items = sorted(set(seq))
    best = {frozenset(c): 0 for n in range(min(cap, len(items)) + 1) for c in itertools.combinations(items, n)} \
        if preload else {frozenset(): 0}
    for x in seq:
        nxt: dict[frozenset, int] = {}
        for cache, misses in best.items():
            if x in cache:
                options = [(cache, misses)]
            else:
                options = [(cache, misses + 1)]  # read, used, not kept
                if len(cache) < cap:
                    options.append((cache | {x}, misses + 1))
                options += [((cache - {v}) | {x}, misses + 1) for v in cache]
            for c, m in options:
                nxt[c] = min(nxt.get(c, m), m)
        best = nxt
    return min(best.values())


def check_against_brute_force(tr: Trace, d: dict) -> None:
    """Every number `moed trace stats --json` prints, recomputed by brute force."""
    e = tr.header.model.num_experts
    total_hits = {"lru": [0] * e, "opt": [0] * e}
    total = 0
    for ls in d["layers"]:
        seq = bf_accesses(tr, ls["layer"])
        reuse = bf_reuse(seq)
        finite = sorted(r for r in reuse if r is not None)
        assert ls["accesses"] == len(seq)
        assert ls["skew"] == pytest.approx(bf_skew(tr, ls["layer"]))
        assert ls["cold"] == reuse.count(None)
        if finite:
            assert ls["reuse_mean"] == pytest.approx(sum(finite) / len(finite))
            n = len(finite)
            med = finite[n // 2] if n % 2 else (finite[n // 2 - 1] + finite[n // 2]) / 2
            assert ls["reuse_median"] == pytest.approx(med)
            assert ls["reuse_p90"] == finite[math.ceil(0.9 * n) - 1]
        for c in range(1, e + 1):
            lru, opt = bf_lru(seq, c), bf_belady(seq, c)
            assert ls["lru_hit_rate"][c - 1] == pytest.approx(lru / len(seq))
            assert ls["opt_hit_rate"][c - 1] == pytest.approx(opt / len(seq))
            total_hits["lru"][c - 1] += lru
            total_hits["opt"][c - 1] += opt
        total += len(seq)
    assert d["lru_hit_rate"] == pytest.approx([h / total for h in total_hits["lru"]])
    assert d["opt_hit_rate"] == pytest.approx([h / total for h in total_hits["opt"]])
    assert all(o >= l for o, l in zip(d["opt_hit_rate"], d["lru_hit_rate"]))
