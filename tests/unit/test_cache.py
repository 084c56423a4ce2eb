"""Expert cache policies (offload/cache.py): accounting, eviction order, admission, trace replays."""

from __future__ import annotations

import random

import pytest

from offload.cache import LFU, LRU, Moed, Score, Tier, make_cache_policy, replay
from profiler.tracestats import lru_hits, stack_distances


def test_tier_accounting():
    t = Tier("ram", 100)
    t.add((0, 1), 30)
    t.add((1, 2), 50)
    assert (t.used, t.free(), t.layer_used(0), t.layer_used(1)) == (80, 20, 30, 50)
    t.add((0, 1), 40)  # replaced, not added twice
    assert t.used == 90 and t.remove((1, 2)) == 50 and t.used == 40


def test_lru_evicts_least_recent_of_the_layer_within_its_share():
    p = LRU(n_layers=2)
    t = Tier("ram", 4)  # 2 experts per layer
    for e in (0, 1):
        p.observe(0, {e: 1})
        t.add((0, e), 1)
    p.observe(1, {5: 1})
    t.add((1, 5), 1)
    p.observe(0, {0: 1})  # 0 is now more recent than 1
    assert p.victims((0, 2), 1, t) == [(0, 1)]
    assert p.victims((1, 6), 1, t) == []  # layer 1 still has room in its share
    assert p.victims((0, 2), 1, t, pinned=[(0, 0), (0, 1)]) is None  # nothing evictable
    assert p.victims((0, 2), 3, t) is None  # more than the layer's share


def test_score_is_hybrimoe_update():
    p = Score(n_layers=1, alpha=0.5)
    p.observe(0, {0: 3, 1: 1}, {0: 0.6, 1: 0.2, 2: 0.1})
    p.observe(0, {1: 2}, {1: 0.8})
    # S <- 0.5 s + 0.5 S: expert 0: 0.3 then 0.15; expert 1: 0.1 then 0.45; expert 2: 0.05 then 0.025
    assert p.rank((0, 0)) == pytest.approx(0.15)
    assert p.rank((0, 1)) == pytest.approx(0.45)
    assert p.rank((0, 2)) == pytest.approx(0.025)


def test_lfu_counts_then_recency():
    p = LFU(n_layers=1)
    for counts in ({0: 1, 1: 1}, {0: 1}, {1: 1}, {2: 1}):
        p.observe(0, counts)
    assert sorted(range(3), key=lambda e: p.rank((0, e))) == [2, 0, 1]


def test_moed_shares_budget_across_layers_and_refuses_worse_experts():
    p = Moed(n_layers=2)
    t = Tier("ram", 3)
    for i in range(40):  # layer 0 never repeats itself from one routing to the next; layer 1 always does
        p.observe(0, {4 * (i % 2): 1, 4 * (i % 2) + 1: 1})
        p.observe(1, {6: 1, 7: 1})
    assert p.repeat[0] == pytest.approx(0.0, abs=1e-6) and p.repeat[1] == pytest.approx(1.0)
    for k in ((1, 6), (1, 7), (0, 0)):
        t.add(k, 1)
    p.observe(0, {3: 1})  # a one-off expert of a layer that does not repeat: worth less than layer 1's
    assert p.worth((0, 3)) < p.worth((1, 6))
    assert p.victims((0, 3), 1, t) is None  # not even over its own layer's more frequent expert 0
    p.observe(1, {5: 1})  # layer 1 changes: its new expert is likely used again (repeat rate ~1)
    assert p.worth((1, 5)) > p.worth((1, 6)) > p.worth((0, 0))
    assert p.victims((1, 5), 1, t) == [(0, 0)]  # one shared pool: another layer's expert goes
    # read ahead: an expert predicted with a measured chance of use above the lowest worth may displace it
    assert p.victims((0, 3), 1, t, chance=p.worth((0, 0)) + 0.01) == [(0, 0)]
    assert p.victims((0, 3), 1, t, chance=p.worth((0, 0)) - 0.01) is None
    assert LRU(n_layers=1).victims((0, 9), 1, Tier("ram", 1), chance=0.0) == []  # demand caches ignore it


def test_moed_averages_decay_between_uses_as_if_updated_at_every_routing():
    """moed's frequency and router-score averages (a layer's array updated at once) are the definition's:
    every expert of the layer updated one by one at every routing, number for number."""
    rng = random.Random(4)
    p = Moed(n_layers=2)
    freq: dict = {}
    recent: dict = {}
    for _ in range(300):
        layer = rng.randrange(2)
        used = set(rng.sample(range(16), 3))
        scores = {e: rng.random() for e in used | set(rng.sample(range(16), 3))}
        p.observe(layer, {e: 1 for e in used}, scores)
        for e in range(16):  # the definition: every expert of the layer, every routing
            k = (layer, e)
            freq[k] = p.slow * (e in used) + (1 - p.slow) * freq.get(k, 0.0)
            recent[k] = p.fast * scores.get(e, 0.0) + (1 - p.fast) * recent.get(k, 0.0)
        for e in range(16):
            k = (layer, e)
            again = p.repeat.get(layer, 0.0) if e in used else 0.0
            assert p.worth(k) == max(freq[k], again) + p.eps * recent[k]  # number for number


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown cache policy 'mru'.*lru"):
        make_cache_policy("mru", 1)


def random_decode_trace(n_steps: int, n_layers: int, n_experts: int, k: int, seed: int):
    """Skewed, temporally local routings: each layer drifts between hot sets."""
    rng = random.Random(seed)
    weights = {layer: [rng.random() ** 3 for _ in range(n_experts)] for layer in range(n_layers)}
    out = []
    for step in range(n_steps):
        for layer in range(n_layers):
            if step % 50 == 0:
                rng.shuffle(weights[layer])
            chosen = set()
            while len(chosen) < k:
                chosen.add(rng.choices(range(n_experts), weights[layer])[0])
            out.append((layer, {e: 1 for e in chosen}, None))
    return out


def step_lru_hits(seq_of_steps: list[list[int]], capacity: int) -> int:
    """A plain per-layer LRU that looks a step's experts up together, then brings in the missed ones."""
    cache: list[int] = []  # least recent first
    hits = 0
    for step in seq_of_steps:
        hits += sum(e in cache for e in step)
        for e in step:
            if e in cache:
                cache.remove(e)
            cache.append(e)
        while len(cache) > capacity:
            cache.pop(next(i for i, e in enumerate(cache) if e not in step))
    return hits


@pytest.mark.parametrize("capacity", [2, 3, 5, 8])
def test_lru_replay_matches_plain_lru(capacity):
    """Per-layer LRU replay == a plain LRU list; and never fewer hits than one-access-at-a-time LRU
    (trace stats' stack distances), which can evict an expert the same step needs next."""
    n_layers, k = 3, 2
    events = random_decode_trace(300, n_layers, 16, k, seed=capacity)
    got = replay(events, LRU(n_layers), capacity * n_layers)
    plain = stacked = 0
    for layer in range(n_layers):
        steps = [sorted(counts) for lay, counts, _ in events if lay == layer]
        plain += step_lru_hits(steps, capacity)
        stacked += lru_hits(stack_distances([e for s in steps for e in s]), capacity)[capacity - 1]
    assert got.accesses == 300 * n_layers * k
    assert got.hits == plain
    assert stacked <= got.hits <= stacked + 300 * n_layers


def test_replay_hit_rates_are_ordered_by_capacity():
    events = random_decode_trace(200, 2, 16, 2, seed=7)
    for name in ("lru", "lfu", "score", "moed"):
        rates = [replay(events, make_cache_policy(name, 2), c).hit_rate for c in (4, 8, 16, 32)]
        assert rates == sorted(rates), (name, rates)
        assert rates[-1] == pytest.approx(1 - 32 / (200 * 2 * 2), abs=0.01)  # everything fits: cold misses only
