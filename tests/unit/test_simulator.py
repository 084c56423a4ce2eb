"""Simulator and policies on a hand-made trace and machine, with every expected number worked by hand."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from profiler.machine import load_machine, machine_names
from profiler.policies import HybriMoE, Policy, ReadAhead, make_policy, policy_names
from profiler.shapes import ModelShape
from profiler.simulator import LinearTimes, Split, best_split, lower_bound, simulate
from profiler.synthetic import SyntheticParams, synthetic_trace
from profiler.trace import LayerRouting, StepRecord, Trace, TraceHeader

# 2 MoE layers of 4 experts, one expert per token, one token per step.
HAND = ModelShape("hand", 8, 8, 4, 1, 2, (0, 1), 1, 1, 8)
EB = HAND.expert_bytes(16)  # 384 bytes
POLICIES = ["llamacpp", "ktransformers", "lru", "hybrimoe"]

# (selected expert, runner-up expert) per step: router probabilities 0.6 and 0.3
LAYER0 = [(1, 2), (1, 2), (3, 0), (1, 3), (2, 1), (3, 2)]
LAYER1 = [(1, 3), (1, 3), (2, 1), (3, 1), (1, 2), (2, 3)]


def hand_trace() -> Trace:
    steps = []
    for s, ((a, ra), (b, rb)) in enumerate(zip(LAYER0, LAYER1)):
        layers = tuple(LayerRouting(layer, ((e,),), ((1.0,),), (((e, 0.6), (r, 0.3)),))
                       for layer, (e, r) in ((0, (a, ra)), (1, (b, rb))))
        steps.append(StepRecord(s, 1, s, layers))
    return Trace(TraceHeader(HAND, "hand-made", None, 2), tuple(steps))


# GPU expert 1 s, CPU expert 4 s per token, attention 0.5 s, copy 2 s, flash read 3 s.
GPU = LinearTimes()
CPU_ONLY = LinearTimes(gpu=None)
ALL = 1 << 40


def run(policy: str, times=GPU, vram: int = ALL, ram: int = ALL, trace: Trace | None = None):
    return simulate(trace or hand_trace(), times, make_policy(policy), vram, ram, bits=16)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("times,per_layer", [(GPU, 0.5 + 1.0), (CPU_ONLY, 0.5 + 4.0)])
def test_unlimited_budget_reaches_the_lower_bound(policy, times, per_layer):
    r = run(policy, times)
    assert r.lower_bound_s == pytest.approx(12 * per_layer)  # 6 steps x 2 layers
    assert r.time_s == pytest.approx(r.lower_bound_s, rel=1e-12)
    assert r.hit_rate("vram" if times.has_gpu else "ram") == 1.0
    assert r.link_bytes == {"flash->ram": 0, "ram->vram": 0}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("spec", machine_names())
def test_unlimited_budget_on_shipped_machines_moves_nothing_and_respects_the_bound(policy, spec):
    """On real machine parameters with everything resident no policy moves a byte or beats the bound."""
    shape = ModelShape("m", 256, 128, 16, 4, 6, tuple(range(6)), 4, 2, 64, shared_inter=256)
    tr = synthetic_trace(shape, SyntheticParams(steps=12, prefill=6, seed=2))
    m = load_machine(spec)
    r = simulate(tr, m.times(shape, 4), make_policy(policy), ALL, ALL, bits=4)
    assert r.link_bytes == {"flash->ram": 0, "ram->vram": 0}
    assert r.time_s >= r.lower_bound_s * (1 - 1e-9)
    if policy == "hybrimoe":  # its split is the only one that may use the CPU next to the GPU
        assert r.time_s <= min(run_all(tr, m, shape)) + 1e-12


def run_all(tr, m, shape):
    return [simulate(tr, m.times(shape, 4), make_policy(p), ALL, ALL, bits=4).time_s for p in POLICIES]


def test_zero_budget_static_policies_equal_hand_sums():
    # No VRAM: every routed expert runs on the CPU from RAM. Per layer:
    # llama.cpp takes turns: attention 0.5 + shared 1 + CPU expert 4 = 5.5;
    # kTransformers overlaps the shared expert (GPU) with the routed one (CPU): 0.5 + max(1, 4) = 4.5.
    times = LinearTimes(shared_s=1.0)
    assert run("llamacpp", times, vram=0).time_s == pytest.approx(12 * 5.5)
    assert run("ktransformers", times, vram=0).time_s == pytest.approx(12 * 4.5)
    # No VRAM and no RAM: every use reads its expert from flash first (3 s) on the one FIFO link.
    assert run("llamacpp", GPU, vram=0, ram=0).time_s == pytest.approx(12 * (0.5 + 3 + 4))
    assert run("ktransformers", GPU, vram=0, ram=0).time_s == pytest.approx(12 * (0.5 + 3 + 4))
    # CPU-only machine, no RAM for experts: the same sum.
    assert run("llamacpp", CPU_ONLY, ram=0).time_s == pytest.approx(12 * (0.5 + 3 + 4))
    r = run("llamacpp", GPU, vram=0, ram=0)
    assert r.hit_rate("flash") == 1.0 and r.link_bytes == {"flash->ram": 12 * EB, "ram->vram": 0}
    # Two experts per layer, flash 5 s: reads queue on the link, the CPU takes turns with itself:
    # read 0.5..5.5, 5.5..10.5; CPU 5.5..9.5, 10.5..14.5 -> 14.5 per layer.
    two = Trace(TraceHeader(HAND), tuple(StepRecord(s, 1, s, tuple(LayerRouting(layer, ((0, 1),), ((0.5, 0.5),))
                                                                   for layer in (0, 1))) for s in range(3)))
    slow_flash = LinearTimes(flash=(5.0, 0.0))
    for p in ("llamacpp", "ktransformers"):
        assert run(p, slow_flash, vram=0, ram=0, trace=two).time_s == pytest.approx(6 * 14.5)


def test_static_policies_place_whole_layers_from_the_last():
    # VRAM for 4 experts = one whole layer: layer 1 on the GPU, layer 0 on the CPU.
    for p in ("llamacpp", "ktransformers"):
        r = run(p, vram=4 * EB)
        assert r.hit_rate("vram") == pytest.approx(6 / 12)
        assert r.hit_rate("ram") == pytest.approx(6 / 12)
        assert r.time_s == pytest.approx(6 * ((0.5 + 4) + (0.5 + 1)))
    assert run("llamacpp", vram=3 * EB).hit_rate("vram") == 0.0  # no whole layer fits
    assert run("ktransformers:use_vram=0", vram=ALL).hit_rate("vram") == 0.0


def test_lru_hit_rate_equals_hand_count():
    # 2 experts per layer; 0 and 1 resident at the start.
    # layer 0: 1 h, 1 h, 3 m (evict 0), 1 h, 2 m (evict 3), 3 m (evict 1)            -> 3 hits
    # layer 1: 1 h, 1 h, 2 m (evict 0), 3 m (evict 1), 1 m (evict 2), 2 m (evict 3) -> 2 hits
    r = run("lru", vram=4 * EB)
    assert r.hit_rate("vram") == pytest.approx(5 / 12)
    assert r.link_bytes["ram->vram"] == 7 * EB
    # every miss is copied (2 s) and run on the GPU (1 s): 0.5 + 3 per missed layer, 0.5 + 1 per hit
    assert r.time_s == pytest.approx(7 * (0.5 + 3) + 5 * (0.5 + 1))


def test_hybrimoe_hit_rate_equals_hand_count():
    # Scores S <- 0.5 s + 0.5 S, with s = 0.6 for the chosen expert and 0.3 for the runner-up.
    # layer 0: step 2 evicts 0 (S0 = .15 < S1 = .225), step 4 evicts 3 (.15 < S1 = .356),
    #          step 5 evicts 1 (.178 < S2 = .314): hits at steps 0, 1, 3                    -> 3 hits
    #          (with alpha = 0.9 step 2 would evict 1 instead: S1 = .045 < S0 = .27, 2 hits)
    # layer 1: step 2 evicts 0 (S0 = 0), step 3 evicts 2 (S2 = .15 < S1 = .3375), so step 4 (expert 1)
    #          hits where LRU missed; step 5 evicts 1 (.234 < .239)                          -> 3 hits
    # A miss costs GPU 2 + 1 = 3 < CPU 4, so the greedy split copies every miss.
    r = run("hybrimoe:prefetch=0", vram=4 * EB)
    assert r.hit_rate("vram") == pytest.approx(6 / 12)
    assert run("hybrimoe:prefetch=0,alpha=0.9", vram=4 * EB).hit_rate("vram") == pytest.approx(5 / 12)
    # With prefetch (accuracy 1) layer 1's expert is copied while layer 0 computes: all of layer 1 hits.
    r = run("hybrimoe", vram=4 * EB)
    assert r.hit_rate("vram") == pytest.approx(9 / 12)
    assert r.prefetch_used == r.prefetched > 0


def test_cpu_only_lru_caches_in_ram():
    # RAM for 4 experts on a CPU-only machine: the same reference string as on the GPU.
    r = run("lru", CPU_ONLY, ram=4 * EB)
    assert r.hit_rate("ram") == pytest.approx(5 / 12)
    assert r.link_bytes["flash->ram"] == 7 * EB


def test_prefetch_accuracy_knob_lowers_hits():
    shape = ModelShape("m", 64, 32, 16, 2, 8, tuple(range(8)), 4, 2, 16)
    tr = synthetic_trace(shape, SyntheticParams(steps=40, skew=0.5, seed=5))
    hits = [simulate(tr, GPU, HybriMoE(accuracy=a), 16 * 4 * shape.expert_bytes(4), ALL).hit_rate("vram")
            for a in (1.0, 0.5, 0.0)]
    assert hits[0] > hits[1] > hits[2]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_step_ends_with_its_head(policy):
    """The head (final norm, lm_head) runs once per step on the main device after the last layer: it adds
    exactly its time to every step and to the lower bound, whatever the policy and budgets."""
    for times in (GPU, CPU_ONLY):
        for vram, ram in ((ALL, ALL), (0, 0), (EB, 2 * EB)):
            base = run(policy, times, vram, ram)
            head = run(policy, replace(times, head_s=0.25), vram, ram)
            assert head.step_times == pytest.approx([t + 0.25 for t in base.step_times])
            assert head.lower_bound_s == pytest.approx(base.lower_bound_s + 6 * 0.25)


def test_best_split_exact_and_fractional_bounds():
    t = LinearTimes(gpu=(1.0, 0.0), cpu=(0.0, 1.5))
    assert best_split(t, 1, (1, 1)) == 1.5  # one on each device
    assert best_split(t, 1, (1,)) == 1.0
    assert best_split(CPU_ONLY, 1, (1, 2)) == pytest.approx(12.0)
    rng = random.Random(3)
    for _ in range(5):  # the relaxation used above 12 experts never exceeds the exact optimum
        counts = tuple(rng.randint(1, 9) for _ in range(13))
        tt = LinearTimes(gpu=(rng.uniform(0.1, 1), rng.uniform(0, 0.2)), cpu=(0.0, rng.uniform(0.1, 2)))
        import itertools
        exact = min(max(sum(tt.expert("gpu", n) for n, m in zip(counts, mask) if not m),
                        sum(tt.expert("cpu", n) for n, m in zip(counts, mask) if m))
                    for mask in itertools.product((0, 1), repeat=13))
        assert best_split(tt, 1, counts) <= exact + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_no_policy_beats_the_lower_bound(seed):
    rng = random.Random(seed)
    shape = ModelShape("m", 64, 32, 8, 2, 5, (1, 2, 3, 4), 4, 2, 16, shared_inter=32, dense_inter=64)
    tr = synthetic_trace(shape, SyntheticParams(steps=15, prefill=rng.randint(0, 9), skew=1.0, locality=0.3,
                                                seed=seed))
    times = LinearTimes(gpu=(rng.uniform(0.1, 1), rng.uniform(0, 0.1)), cpu=(rng.uniform(0, 0.5), rng.uniform(0.2, 3)),
                        shared_s=rng.uniform(0, 1), dense_s=0.3, copy=(rng.uniform(0.1, 3), 0.0),
                        flash=(rng.uniform(0.5, 5), 0.0))
    eb = shape.expert_bytes(4)
    lb, per_step = lower_bound(tr, times)
    assert lb == pytest.approx(sum(per_step))
    for p in POLICIES + ["hybrimoe:accuracy=0.5"]:
        for vram, ram in ((0, ALL), (rng.randint(0, 32) * eb, ALL), (rng.randint(0, 32) * eb, rng.randint(0, 32) * eb)):
            r = simulate(tr, times, make_policy(p), vram, ram, bits=4)
            assert r.time_s >= lb * (1 - 1e-9), (p, vram, ram)
            assert sum(r.found.values()) == r.uses


def test_budgets_are_never_exceeded():
    shape = ModelShape("m", 64, 32, 8, 2, 4, (0, 1, 2, 3), 4, 2, 16)
    tr = synthetic_trace(shape, SyntheticParams(steps=20, seed=1))
    eb = shape.expert_bytes(4)
    for p in POLICIES:
        pol = make_policy(p)
        split, checked = pol.split, []

        def checking(layer, demand, ctx, split=split):
            for tier in ("vram", "ram"):
                assert len(ctx.res.held[tier]) <= ctx.res.cap[tier]
            assert ctx.res.cap["vram"] == 5 and ctx.res.cap["ram"] == 9
            checked.append(layer)
            return split(layer, demand, ctx)

        pol.split = checking  # check the budgets before every split
        simulate(tr, GPU, pol, 5 * eb, 9 * eb)
        assert len(checked) == 20 * 4


def test_policy_registry_and_options():
    assert set(POLICIES) <= set(policy_names())
    hp = make_policy("hybrimoe:alpha=0.25,prefetch=false,accuracy=0.7")
    assert (hp.alpha, hp.do_prefetch, hp.accuracy) == (0.25, False, 0.7)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")
    with pytest.raises(ValueError, match="bad options"):
        make_policy("lru:size=3")
    custom = make_policy("profiler.policies:LRU")
    assert custom.name == "lru"


def test_a_bad_split_is_refused():
    class Bad(Policy):
        name = ""

        def split(self, layer, demand, ctx):
            return Split((), ())

    with pytest.raises(ValueError, match="split experts"):
        simulate(hand_trace(), GPU, Bad(), ALL, ALL)


def with_ahead(trace: Trace, pick) -> Trace:
    """The trace with layer 1's `ahead` set to pick(step, layer 1's expert) (the engine's read-ahead)."""
    steps = []
    for s in trace.steps:
        l0, l1 = s.layers
        steps.append(replace(s, layers=(l0, replace(l1, ahead=pick(s.step, l1.experts[0][0])))))
    return replace(trace, steps=tuple(steps))


def test_read_ahead_replays_the_engines_reads_in_place_of_the_policys_prefetch():
    """ReadAhead(lru): before layer 1 routes, the experts the trace says the engine read ahead go on the
    link; without recorded reads it is plain LRU."""
    plain = run("lru", vram=4 * EB)
    same = simulate(hand_trace(), GPU, ReadAhead(make_policy("lru")), 4 * EB, ALL, bits=16)
    assert (same.time_s, same.found, same.prefetched) == (plain.time_s, plain.found, 0)
    assert same.policy == "lru+read-ahead"
    right = simulate(with_ahead(hand_trace(), lambda s, e: (e,)), GPU, ReadAhead(make_policy("lru")),
                     4 * EB, ALL, bits=16)
    assert right.prefetched > 0 and right.prefetch_used == right.prefetched  # every read ahead was used
    assert right.hit_rate("vram") > plain.hit_rate("vram") and right.time_s < plain.time_s
    wrong = simulate(with_ahead(hand_trace(), lambda s, e: ((e + 1) % 4,)), GPU, ReadAhead(make_policy("lru")),
                     4 * EB, ALL, bits=16)
    assert wrong.prefetch_used == 0 and wrong.link_bytes["ram->vram"] > plain.link_bytes["ram->vram"]
