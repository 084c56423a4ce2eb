"""The intra-layer scheduler: against exact search, on hand-checked layers, and on bad input (no torch)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.schedule import MAX_EXACT, LayerCosts, Plan, Task, optimal_plan, schedule, simulate

PLANES = 8000  # bytes of one expert's 8 bit-planes in the hand-made layers (1000 per plane)
NONE = (0.0, 0.0)


def size(bits: int, costs: LayerCosts) -> int:
    """Bytes of an expert at `bits`, worked out here rather than asked of the module."""
    return 0 if bits == 0 else math.ceil(bits * costs.plane_bytes / 8) + costs.overhead_bytes


def expected_moves(device: str, bits: int, held: dict[str, int], costs: LayerCosts) -> tuple[int, int]:
    """(read, copy) bytes an expert needs before it runs on `device`: only the planes missing."""
    v, r = held.get("vram", 0), held.get("ram", 0)
    if costs.unified:
        have = max(v, r)
        return (size(bits, costs) - size(have, costs) if have < bits else 0), 0
    if device == "cpu":
        return (size(bits, costs) - size(r, costs) if r < bits else 0), 0
    if v >= bits:
        return 0, 0
    return (0 if r >= bits else size(bits, costs) - size(max(r, v), costs)), size(bits, costs) - size(v, costs)


def timeline(plan: Plan, costs: LayerCosts, free_at: dict | None) -> tuple[float, dict]:
    """An independent replay: (finish, expert -> [(op, start, end)]), each queue one op at a time."""
    free = {r: (free_at or {}).get(r, 0.0) for r in ("flash", "copy", "gpu", "cpu")}
    ops: dict[int, list] = {e: [] for e in plan.tasks}
    ready = {e: 0.0 for e in plan.tasks}
    for e in plan.reads:
        start = free["flash"]
        free["flash"] = ready[e] = start + costs.read(plan.tasks[e].read_bytes)
        ops[e].append(("read", start, ready[e]))
    for e in plan.copies:
        start = max(free["copy"], ready[e])
        free["copy"] = ready[e] = start + costs.h2d(plan.tasks[e].copy_bytes)
        ops[e].append(("copy", start, ready[e]))
    for dev, queue in (("gpu", plan.gpu), ("cpu", plan.cpu)):
        for e in queue:
            t = plan.tasks[e]
            start = max(free[dev], ready[e])
            free[dev] = start + (costs.gpu if dev == "gpu" else costs.cpu)(t.tokens, t.bits)
            ops[e].append((dev, start, free[dev]))
    return max(free["gpu"], free["cpu"]), ops


def check_plan(plan: Plan, demand: dict, residency: dict, bits, costs: LayerCosts, free_at: dict | None) -> None:
    """Every demanded expert once, at its bits, moving exactly the bytes it lacks, each move before its use."""
    assert sorted(plan.tasks) == sorted(demand)
    assert sorted(plan.gpu + plan.cpu) == sorted(demand)
    assert sorted(plan.reads) == sorted(e for e, t in plan.tasks.items() if t.read_bytes)
    assert sorted(plan.copies) == sorted(e for e, t in plan.tasks.items() if t.copy_bytes)
    for e, t in plan.tasks.items():
        assert t.expert == e and t.tokens == demand[e]
        assert t.bits == (bits if isinstance(bits, int) else bits[e])
        assert (e in plan.gpu) == (t.device == "gpu") and (e in plan.cpu) == (t.device == "cpu")
        assert t.device == "cpu" or costs.has_gpu
        assert (t.read_bytes, t.copy_bytes) == expected_moves(t.device, t.bits, residency.get(e, {}), costs)
        assert [k for k, _ in t.transfers] == [k for k, n in (("read", t.read_bytes), ("copy", t.copy_bytes)) if n]
    finish, ops = timeline(plan, costs, free_at)
    for e, seq in ops.items():
        assert [op for op, _, _ in seq] == [k for k, _ in plan.tasks[e].transfers] + [plan.tasks[e].device]
        assert all(a[2] <= b[1] for a, b in zip(seq, seq[1:]))  # read, then copy, then compute
    assert finish == pytest.approx(plan.finish_time, rel=0, abs=1e-9)
    assert simulate(plan, costs, free_at) == pytest.approx(plan.finish_time, rel=0, abs=1e-9)
    assert plan.busy["gpu"] == pytest.approx(sum(costs.gpu(plan.tasks[e].tokens, plan.tasks[e].bits)
                                                 for e in plan.gpu))


def linear_costs(draw, has_gpu: bool) -> LayerCosts:
    """A random linear machine: compute a + b * tokens, links a + b * bytes, sometimes unified memory."""
    def pos(lo: float, hi: float) -> float:
        return draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))

    gpu_scale = 10 ** pos(-1.5, 1.5)  # from a GPU 30x faster than the CPU to one 30x slower
    return LayerCosts.linear(
        cpu=(pos(0.0, 1.0), pos(0.01, 2.0)),
        gpu=(pos(0.0, 1.0) * gpu_scale, pos(0.0, 0.5) * gpu_scale) if has_gpu else None,
        h2d=(pos(0.0, 0.3), 10 ** pos(-1.5, 1.0) / PLANES), read=(pos(0.0, 0.5), 10 ** pos(-1.0, 1.3) / PLANES),
        plane_bytes=PLANES, overhead_bytes=draw(st.integers(0, PLANES // 16)),
        unified=has_gpu and draw(st.integers(0, 9)) == 0, bits_scale=draw(st.booleans()))


@st.composite
def layers(draw, max_experts: int = MAX_EXACT):
    """(demand, residency, bits, costs, free_at) of a random small layer on a random linear machine."""
    has_gpu = draw(st.integers(0, 3)) > 0
    costs = linear_costs(draw, has_gpu)
    ids = draw(st.lists(st.integers(0, 127), min_size=1, max_size=max_experts, unique=True))
    demand = {e: draw(st.sampled_from([1, 1, 2, 3, 8]) | st.integers(0, 64)) for e in ids}
    tiers = st.fixed_dictionaries({}, optional={"vram": st.integers(0, 8) if has_gpu else st.just(0),
                                                "ram": st.integers(0, 8), "flash": st.just(8)})
    residency = {e: draw(tiers) for e in ids}
    bits = draw(st.integers(1, 8) | st.fixed_dictionaries({e: st.integers(1, 8) for e in ids}))
    free_at = draw(st.none() | st.dictionaries(st.sampled_from(["flash", "copy", "gpu", "cpu"]),
                                               st.floats(0.0, 2.0, allow_nan=False)))
    return demand, residency, bits, costs, free_at


@settings(max_examples=150, deadline=None)
@given(layers())
def test_schedule_is_valid_and_within_five_percent_of_the_optimum(layer):
    fast, best = schedule(*layer), optimal_plan(*layer)
    check_plan(fast, *layer)
    check_plan(best, *layer)
    assert best.finish_time <= fast.finish_time * (1 + 1e-9)
    assert fast.finish_time <= best.finish_time * 1.05


def brute_force(demand, residency, bits, costs, free_at) -> float:
    """The least finish over every split and every order of all four queues (tiny layers only)."""
    ids, best = sorted(demand), math.inf
    for devs in itertools.product(["cpu", "gpu"] if costs.has_gpu else ["cpu"], repeat=len(ids)):
        tasks = {}
        for e, dev in zip(ids, devs):
            b = bits if isinstance(bits, int) else bits[e]
            tasks[e] = Task(e, dev, b, demand[e], *expected_moves(dev, b, residency.get(e, {}), costs))
        queues = [[e for e in ids if tasks[e].read_bytes], [e for e in ids if tasks[e].copy_bytes],
                  [e for e in ids if tasks[e].device == "gpu"], [e for e in ids if tasks[e].device == "cpu"]]
        for r, c, g, p in itertools.product(*(itertools.permutations(q) for q in queues)):
            best = min(best, timeline(Plan(tasks, g, p, c, r, 0.0, {}, {}), costs, free_at)[0])
    return best


@settings(max_examples=40, deadline=None)
@given(layers(max_experts=3))
def test_optimal_plan_matches_brute_force_over_every_order(layer):
    assert optimal_plan(*layer).finish_time == pytest.approx(brute_force(*layer), rel=1e-9, abs=1e-12)


# Hand-checked layers: GPU 1 s per expert, CPU 4 s per token, experts of 8 planes of 1000 bytes.
def machine(gpu=(1.0, 0.0), cpu=(0.0, 4.0), h2d=(2.0, 0.0), read=(3.0, 0.0), unified=False) -> LayerCosts:
    """A hand-checkable machine: (a, b) per op as in LayerCosts.linear."""
    return LayerCosts.linear(cpu, gpu, h2d, read, PLANES, unified=unified)


def test_experts_resident_in_vram_all_run_on_the_gpu():
    demand = {3: 1, 5: 1, 9: 1}
    plan = schedule(demand, {e: {"vram": 8} for e in demand}, 8, machine())
    assert sorted(plan.gpu) == [3, 5, 9] and plan.cpu == () and plan.reads == () and plan.copies == ()
    assert plan.finish_time == 3.0  # the CPU taking one would need 4 s


def test_without_a_gpu_resident_experts_run_first_then_reads_hottest_first():
    costs = machine(gpu=None, cpu=(0.0, 1.0), read=(2.0, 0.0))
    demand = {1: 1, 2: 3, 3: 1, 4: 5}  # expert 1 in RAM, the others on flash only
    plan = schedule(demand, {1: {"ram": 8}}, 8, costs)
    assert plan.cpu == (1, 4, 2, 3) and plan.reads == (4, 2, 3) and plan.gpu == plan.copies == ()
    # CPU: 1 [0, 1], reads 4 [0, 2], 2 [2, 4], 3 [4, 6]; CPU 4 [2, 7], 2 [7, 10], 3 [10, 11]
    assert plan.finish_time == 11.0 == optimal_plan(demand, {1: {"ram": 8}}, 8, costs).finish_time
    assert plan.busy == {"flash": 6.0, "copy": 0.0, "gpu": 0.0, "cpu": 10.0}


@pytest.mark.parametrize("copy_s,heavy_on", [(10.0, "cpu"), (1.0, "gpu")])
def test_a_slow_link_makes_the_cpu_take_the_uncached_heavy_expert(copy_s, heavy_on):
    costs = machine(gpu=(0.1, 0.0), cpu=(0.0, 1.0), h2d=(copy_s, 0.0))
    plan = schedule({7: 1, 8: 4}, {7: {"vram": 4}, 8: {"ram": 4}}, 4, costs)
    assert plan.tasks[7].device == "gpu" and plan.tasks[8].device == heavy_on
    assert plan.finish_time == pytest.approx(4.0 if heavy_on == "cpu" else copy_s + 0.1)
    assert plan.copies == (() if heavy_on == "cpu" else (8,))


def test_only_missing_bit_planes_are_read_or_copied():
    costs = machine(gpu=None, cpu=(0.0, 1.0), read=(0.0, 1e-3))
    plan = schedule({1: 1, 2: 1}, {1: {"ram": 2}, 2: {"ram": 8}}, 4, costs)
    assert plan.tasks[1].read_bytes == 2000 and plan.tasks[2].read_bytes == 0  # planes 3-4; 8 held cover 4
    assert plan.reads == (1,) and plan.ends["flash"] == pytest.approx(2.0)
    gpu = machine(h2d=(0.0, 1e-4), read=(0.0, 1e-4))  # the GPU path is the faster one here
    assert schedule({1: 1}, {1: {"vram": 3, "ram": 6}}, 6, gpu).tasks[1].transfers == (("copy", 3000),)
    assert schedule({1: 1}, {1: {"vram": 2}}, 4, gpu).tasks[1].transfers == (("read", 2000), ("copy", 2000))
    assert schedule({1: 1}, {1: {"vram": 8}}, 4, gpu).tasks[1].transfers == ()


def test_unified_memory_never_copies():
    costs = machine(h2d=(5.0, 0.0), unified=True)
    plan = schedule({1: 1, 2: 1}, {1: {"ram": 8}, 2: {"vram": 8}}, 8, costs)
    assert plan.copies == () and plan.gpu == (1, 2) and plan.finish_time == 2.0


def test_a_busy_gpu_pushes_work_to_the_cpu():
    costs = machine(cpu=(0.0, 1.5))
    demand, residency = {1: 1, 2: 1}, {1: {"vram": 8, "ram": 8}, 2: {"vram": 8, "ram": 8}}
    assert schedule(demand, residency, 8, costs).finish_time == 1.5  # one each
    plan = schedule(demand, residency, 8, costs, free_at={"gpu": 5.0})
    assert plan.gpu == () and plan.cpu == (1, 2) and plan.finish_time == 5.0  # the GPU ends its earlier work


def test_deterministic_and_blind_to_dict_order():
    costs = machine()
    residency = {1: {"ram": 4}, 2: {"vram": 2}, 3: {}}
    a = schedule({1: 2, 2: 1, 3: 5}, residency, 4, costs)
    b = schedule({3: 5, 1: 2, 2: 1}, dict(reversed(residency.items())), 4, costs)
    assert a == b


def test_empty_layer_and_a_large_one():
    assert schedule({}, {}, 4, machine()).finish_time == 0.0
    costs = machine(cpu=(0.0, 0.05), h2d=(0.3, 0.0), read=(0.5, 0.0))
    demand = {e: 1 + e % 7 for e in range(128)}
    residency = {e: {"vram": 4} if e % 4 == 0 else {"ram": 4} if e % 4 == 1 else {} for e in range(128)}
    plan = schedule(demand, residency, 4, costs)
    check_plan(plan, demand, residency, 4, costs, None)


@pytest.mark.parametrize("demand,residency,bits,costs,match", [
    ({1: -1}, {}, 4, machine(), "tokens must be an int >= 0"),
    ({1: 1.5}, {}, 4, machine(), "tokens must be an int >= 0"),
    ({1: 1}, {}, 0, machine(), "bits must be an int in 1..8"),
    ({1: 1}, {}, 9, machine(), "bits must be an int in 1..8"),
    ({1: 1}, {}, {2: 4}, machine(), "expert 1: bits must be an int in 1..8"),
    ({1: 1}, {1: {"disk": 8}}, 4, machine(), "unknown tier 'disk'"),
    ({1: 1}, {1: {"ram": 9}}, 4, machine(), "ram must hold 0..8 bits"),
    ({1: 1}, {1: {"flash": 4}}, 4, machine(), "flash holds every expert at 8 bits"),
    ({1: 1}, {1: {"vram": 8}}, 4, machine(gpu=None), "VRAM on a machine without a GPU"),
])
def test_bad_input_is_a_value_error_that_names_the_problem(demand, residency, bits, costs, match):
    for fn in (schedule, optimal_plan):
        with pytest.raises(ValueError, match=match):
            fn(demand, residency, bits, costs)


def test_bad_free_at_and_too_many_experts_for_the_exact_search():
    with pytest.raises(ValueError, match="unknown resource 'disk'"):
        schedule({1: 1}, {}, 4, machine(), free_at={"disk": 1.0})
    with pytest.raises(ValueError, match="must be finite seconds >= 0"):
        schedule({1: 1}, {}, 4, machine(), free_at={"gpu": -1.0})
    with pytest.raises(ValueError, match="at most 8 experts"):
        optimal_plan({e: 1 for e in range(9)}, {}, 4, machine())
    with pytest.raises(ValueError, match="does not match its tasks"):
        plan = schedule({1: 1}, {1: {"ram": 8}}, 8, machine())
        simulate(Plan(plan.tasks, plan.gpu, plan.cpu, plan.copies, (1,), 0.0, {}, {}), machine())
