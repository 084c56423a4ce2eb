"""Trace statistics against brute force: skew, reuse distance, LRU and Belady-MIN hit counts."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiler.shapes import ModelShape
from profiler.synthetic import SyntheticParams, synthetic_trace
from profiler.tracestats import fewest_misses, format_stats, lru_hits, opt_hits, stack_distances, trace_stats

from cache_bruteforce import (bf_belady, bf_fewest_misses, bf_lru, bf_optimal, bf_reuse,
                             check_against_brute_force)

SMALL = ModelShape("small", 64, 32, 14, 2, 3, (0, 1, 2), 4, 2, 16)  # top 10%: ceil(1.4) = 2 experts


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40))
def test_reuse_distance_and_hit_counts_match_brute_force(seq):
    assert stack_distances(seq) == bf_reuse(seq)
    lru, opt = lru_hits(stack_distances(seq), 6), opt_hits(seq, 6)
    for c in range(1, 7):
        assert lru[c - 1] == bf_lru(seq, c)
        assert opt[c - 1] == bf_belady(seq, c)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=14), st.integers(1, 3))
def test_belady_is_optimal_by_exhaustive_search(seq, cap):
    assert opt_hits(seq, cap)[cap - 1] == bf_optimal(seq, cap)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=12), st.integers(0, 3), st.booleans())
def test_fewest_misses_is_the_optimum_with_any_preload_and_leaving_out(seq, cap, preload):
    assert fewest_misses(seq, cap, preload) == bf_fewest_misses(seq, cap, preload)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 7), max_size=60), st.integers(1, 8))
def test_fewest_misses_bounds_belady_and_lru_from_empty(seq, cap):
    # the bound's freedoms (a free preload, leaving out) only remove misses: at most Belady's from an empty cache
    cold = len(seq) - opt_hits(seq, cap)[cap - 1]
    best = fewest_misses(seq, cap)
    assert best <= fewest_misses(seq, cap, preload=False) <= cold <= len(seq) - bf_lru(seq, cap)
    assert fewest_misses(seq, len(set(seq))) == 0


@pytest.mark.parametrize("seed,skew,locality,prefill", [(0, 0.0, 0.0, 0), (1, 1.2, 0.5, 6), (2, 2.0, 0.2, 0)])
def test_trace_stats_equal_brute_force(seed, skew, locality, prefill):
    tr = synthetic_trace(SMALL, SyntheticParams(steps=40, prefill=prefill, skew=skew, locality=locality, seed=seed))
    st_ = trace_stats(tr)
    assert st_.label.startswith("SYNTHETIC")
    check_against_brute_force(tr, st_.to_dict())


def test_format_stats_mentions_label_and_curve():
    tr = synthetic_trace(SMALL, SyntheticParams(steps=10, seed=4))
    text = format_stats(trace_stats(tr))
    assert text.splitlines()[0].startswith("SYNTHETIC trace")
    assert "LRU@1" in text and "ideal" in text
    assert len([ln for ln in text.splitlines() if ln.strip().startswith(tuple("0123456789"))]) >= 3 + 10


def test_random_traces_brute_force_fuzz():
    rng = random.Random(7)
    for _ in range(5):
        tr = synthetic_trace(SMALL, SyntheticParams(steps=rng.randint(1, 25), skew=rng.uniform(0, 2),
                                                    locality=rng.uniform(0, 0.9), seed=rng.randint(0, 999)))
        check_against_brute_force(tr, trace_stats(tr).to_dict())


def test_skew_of_extreme_traces():
    from profiler.tracestats import skew
    assert skew(Counter({0: 10}), 10) == 1.0
    assert skew(Counter({i: 1 for i in range(10)}), 10) == pytest.approx(0.1)
    assert skew(Counter(), 10) == 0.0
    assert list(itertools.islice(iter(stack_distances([1, 1, 2, 1])), 4)) == [None, 0, None, 1]
