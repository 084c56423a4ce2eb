"""Tiered experts (offload/tiered.py) on a converted tiny model: budgets, streaming, identical output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.convert import convert
from daemon.generate import Summary, generate
from daemon.loaders.build import load_model
from daemon.sampling import SamplingParams
from offload.provider import StoreExperts
from offload.routing import Routing
from offload.store import Store
from offload.schedule import LayerCosts
from profiler.trace import read_trace, record_trace
from offload.tiered import (AHEAD_PRIOR, Accelerator, Amount, Budgets, ExpertSizes, OffloadOptions, TieredExperts,
                            parse_amount, tiered_experts)
from quant.kernels import PreparedExpert, available_backends, fast_cpu_backend, get_backend
from quant.kernels.onnx import OnnxRuntime

MOED = [sys.executable, "-m", "daemon.cli"]
PROMPT = "The expert said that the cache"


@pytest.fixture(scope="module")
def store_dir(tiny_model, tmp_path_factory):
    return convert(tiny_model("qwen3_moe"), tmp_path_factory.mktemp("tiered") / "store")


def greedy(lm, n: int = 24, check=None) -> list[int]:
    if check is not None:
        lm.model.observe_routing(lambda layer, routing: check())
    prompt = lm.tokenizer.encode(PROMPT)
    s = Summary(prompt)
    for _ in generate(lm, prompt, SamplingParams(max_tokens=n), s):
        if check is not None:
            check()
    lm.model.observe_routing(None)
    return list(s.tokens)


def budget_checker(p: TieredExperts):
    """Asserts, whenever called, that no tier holds more than its budget and the books agree."""
    calls = []

    def check() -> None:
        calls.append(1)
        for name, t in p.tiers.items():
            assert t.used <= t.capacity, (name, t.used, t.capacity)
            assert p.stats[name].peak <= t.capacity
        assert p.held_bytes("ram") <= p.tiers["ram"].used

    return check, calls


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("policy", ["moed", "lru", "score"])
def test_quarter_ram_budget_streams_from_flash_and_generates_the_same_tokens(store_dir, bits, policy):
    full = load_model(store_dir, bits=bits, kernel=fast_cpu_backend())  # the tiered experts' kernel
    assert isinstance(full.experts, StoreExperts)
    want = greedy(full)
    lm = load_model(store_dir, offload=OffloadOptions(bits=bits, ram_budget="25%", policy=policy))
    p = lm.experts
    assert isinstance(p, TieredExperts) and p.bits == bits
    total = p.expert_bytes(8) * p.experts_total  # a percentage is of the experts' 8-bit bytes
    assert p.tiers["ram"].capacity == int(0.25 * total)
    check, calls = budget_checker(p)
    before, busy, t0 = p.bytes_read, p.links["flash->ram"].busy_seconds, time.perf_counter()
    got = greedy(lm, check=check)
    elapsed = time.perf_counter() - t0
    assert got == want
    assert len(calls) > 24 * 2  # checked at every layer's routing and after every token
    tier = p.tier_views()[0]
    assert tier.name == "ram" and tier.misses > 0 and 0 < tier.hit_rate < 1
    assert p.bytes_read - before > p.tiers["ram"].capacity  # it really streamed more than it can hold
    link = {(k.source, k.target): k for k in p.link_views()}[("flash", "ram")]
    assert link.bytes_moved >= p.bytes_read - before and link.transfers >= tier.misses
    assert 0 < link.busy_seconds - busy <= elapsed  # transfers side by side count once
    kinds = {k for k, _, _ in p.timings}
    assert {"read", "form"} <= kinds  # measured for the cost model (daemon/costcheck.py takes them in)
    assert all(s > 0 and x > 0 for _, x, s in p.timings)
    assert {x for k, x, _ in p.timings if k == "read"} <= {p.raw_bytes(bits)}
    assert p.stats["ram"].peak <= p.tiers["ram"].capacity
    p.close()


def test_budget_smaller_than_one_expert_is_a_clear_error(store_dir):
    with pytest.raises(Exception, match="smaller than one expert"):
        load_model(store_dir, offload=OffloadOptions(ram_budget=1000))


@pytest.mark.parametrize("spec,want", [("512MiB", Amount(512 << 20)), ("2G", Amount(2 * 10**9)),
                                       ("25%", Amount(share=0.25)), (4096, Amount(4096)), (None, Amount()),
                                       ("80%free", Amount(free=0.8)), (" 50 % free", Amount(free=0.5))])
def test_parse_amount(spec, want):
    assert parse_amount(spec) == want


@pytest.mark.parametrize("spec", ["lots", "-5", "0%", "12XB", True, "150%free", "0%free", "free"])
def test_parse_amount_rejects(spec):
    with pytest.raises(ValueError, match="expected bytes"):
        parse_amount(spec)


def routing_for(gen: torch.Generator, tokens: int, n_experts: int, k: int) -> Routing:
    logits = torch.randn(tokens, n_experts, generator=gen)
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    return Routing(idx, w / w.sum(-1, keepdim=True), logits)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_layer_output_equals_all_resident_whatever_the_placement(store_dir, data):
    """Random budgets, policies, pre-resident experts (RAM and an emulated accelerator), token counts:
    a layer's output is bit-identical to the all-resident provider's at the same bits (one backend)."""
    store = Store(store_dir)
    bits = data.draw(st.sampled_from([8, 5, 3]))
    ref = StoreExperts(store, bits)
    layers = store.layers
    backend = get_backend("reference")
    one = ExpertSizes(store).ram(backend, bits, True)  # an expert's planes and form: the least a budget holds
    ram = data.draw(st.integers(1, 2 * len(layers) * store.n_experts(layers[0]))) * one
    vram = data.draw(st.integers(0, 6)) * one
    accel = Accelerator.create("emulated", backend) if vram else None
    costs = None  # experts run where they are held; else each layer runs the scheduler's plan
    if accel is not None and data.draw(st.booleans()):
        op = st.tuples(st.floats(0, 1e-3), st.floats(0, 1e-3))
        costs = LayerCosts.linear(data.draw(op), data.draw(op), data.draw(op), data.draw(op),
                                  sum(a * b for a, b in store.layout.shapes))
    p = TieredExperts(store, bits, backend, budgets=Budgets(ram=ram, vram=vram), accelerator=accel,
                      policy=data.draw(st.sampled_from(["lru", "lfu", "score", "moed"])),
                      io_threads=data.draw(st.integers(1, 3)), prefetch=False, costs=costs)
    for key in data.draw(st.lists(st.tuples(st.sampled_from(layers), st.integers(0, 7)), max_size=12)):
        held = p._fetch(key, data.draw(st.integers(1, bits)), evict=True)
        if p._keep(key, held):
            p._to_accel(key, held)
    if accel is not None:
        accel.copy.submit(lambda: None).result()  # the copies above have landed
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    for _ in range(3):
        layer = data.draw(st.sampled_from(layers))
        x = torch.randn(data.draw(st.integers(1, 9)), store.layout.shapes[0][1], generator=gen)
        r = routing_for(gen, x.shape[0], store.n_experts(layer), 2)
        assert torch.equal(p.experts(layer)(x, r), ref.experts(layer)(x, r))
        for name, t in p.tiers.items():
            assert t.used <= t.capacity and p.stats[name].peak <= t.capacity
    assert p.plans == (3 if costs is not None else 0)
    p.close()


@pytest.mark.parametrize("gpu_fast", [True, False])
def test_the_scheduler_plan_decides_where_experts_run(store_dir, gpu_fast):
    """With an (emulated) accelerator and op times, a layer runs its plan: when the accelerator computes
    an expert far faster than the CPU and copies are cheap, experts held only in RAM are copied to it and
    run there; when it is slower, none is. The output is the all-resident one either way."""
    store = Store(store_dir)
    backend = get_backend("reference")
    layer, n = store.layers[0], store.n_experts(store.layers[0])
    one = ExpertSizes(store).ram(backend, 8, True)
    gpu, cpu = ((1e-6, 0.0), (1e-3, 1e-3)) if gpu_fast else ((1e-2, 1e-2), (1e-6, 0.0))
    costs = LayerCosts.linear(cpu, gpu, (1e-7, 0.0), (1e-3, 0.0), sum(a * b for a, b in store.layout.shapes))
    p = TieredExperts(store, 8, backend, budgets=Budgets(ram=2 * n * len(store.layers) * one, vram=n * one),
                      accelerator=Accelerator.create("emulated", backend), prefetch=False, costs=costs)
    p.preload()  # every expert in RAM, none on the accelerator
    assert not p.resident("vram") and len(p.resident("ram")) == n * len(store.layers)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, store.layout.shapes[0][1], generator=gen)
    r = routing_for(gen, 4, n, 2)
    want = StoreExperts(store, 8).experts(layer)(x, r)
    assert torch.equal(p.experts(layer)(x, r), want)
    copies = p.links["ram->vram"].transfers
    used = set(r.experts.reshape(-1).tolist())
    assert p.plans == 1
    if gpu_fast:
        assert copies == len(used) and set(e for _, e in p.resident("vram")) == used  # copied, run, kept
        assert torch.equal(p.experts(layer)(x, r), want)  # now from the accelerator tier
        assert p.links["ram->vram"].transfers == copies and p.stats["vram"].hits == len(used)
    else:
        assert copies == 0 and not p.resident("vram")
    for name, t in p.tiers.items():
        assert t.used <= t.capacity and p.stats[name].peak <= t.capacity
    p.close()


def test_copies_wait_for_their_reads_off_the_copy_stream(store_dir, monkeypatch):
    """RAM for one expert, two missed experts both planned to be copied to the accelerator, read in the
    opposite order to the copy stream's: the first read takes the room, the second waits for it, and the first
    copy is the second read's. A copy stream that waited there for its read would never reach the copy that
    frees the room (until the stall error); each copy goes on the stream once its read is done instead."""
    import dataclasses

    import offload.tiered as tiered

    monkeypatch.setattr(tiered, "STALL_SECONDS", 5.0)
    store = Store(store_dir)
    backend = get_backend("reference")
    layer, n = store.layers[0], store.n_experts(store.layers[0])
    one = ExpertSizes(store).ram(backend, 8, True)
    costs = LayerCosts.linear((1e-3, 1e-3), (1e-6, 0.0), (1e-7, 0.0), (1e-3, 0.0),
                              sum(a * b for a, b in store.layout.shapes))
    plan = tiered.LayerExperts._plan
    plans = []

    def reads_reversed(self, *args):
        plans.append(plan(self, *args))
        return dataclasses.replace(plans[-1], reads=tuple(reversed(plans[-1].copies)))

    monkeypatch.setattr(tiered.LayerExperts, "_plan", reads_reversed)
    p = TieredExperts(store, 8, backend, budgets=Budgets(ram=one, vram=2 * one), io_threads=1,
                      accelerator=Accelerator.create("emulated", backend), prefetch=False, costs=costs)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, store.layout.shapes[0][1], generator=gen)
    r = routing_for(gen, 1, n, 2)
    assert torch.equal(p.experts(layer)(x, r), StoreExperts(store, 8).experts(layer)(x, r))
    assert len(plans[0].copies) == 2 and p.links["ram->vram"].transfers == 2
    for name, t in p.tiers.items():
        assert t.used <= t.capacity and p.stats[name].peak <= t.capacity
    p.close()


def test_auto_bits_picks_the_most_that_fit(store_dir):
    store = Store(store_dir)
    p = tiered_experts(store, OffloadOptions(bits="auto", ram_budget="60%"), kernel="torch")
    fits = [b for b in (8, 6, 5, 4) if p.expert_bytes(b) * p.experts_total <= p.tiers["ram"].capacity]
    assert p.bits == fits[0] < 8 and p.tiers["ram"].capacity == int(0.6 * p.expert_bytes(8) * p.experts_total)
    p.close()
    assert tiered_experts(store, OffloadOptions(bits="auto"), kernel="torch").bits == 8
    small = tiered_experts(store, OffloadOptions(bits="auto", ram_budget="20%"), kernel="torch")
    assert small.bits == 4  # nothing of 4 bits or more fits: 4, streamed (never 3 or 2: too inaccurate)
    assert small.expert_bytes(4) * small.experts_total > small.tiers["ram"].capacity
    small.close()


def test_prefetch_reads_the_next_layer_ahead_and_a_trace_records_it(store_dir, tmp_path):
    lm = load_model(store_dir, offload=OffloadOptions(bits=8, ram_budget="50%", prefetch=True))
    rec = record_trace(lm, tmp_path / "t.jsonl")
    greedy(lm, 8)
    rec.close()
    p = lm.experts
    assert p.routers and p.link_views()[0].transfers > p.stats["ram"].misses  # misses + reads ahead
    # the share of each prediction the layer then used, measured (reads ahead may displace experts worth less)
    assert 0 < p.ahead_precision <= 1 and p.ahead_precision != AHEAD_PRIOR
    p.close()
    trace = read_trace(tmp_path / "t.jsonl")  # what the engine read ahead, for the simulator to replay
    first, *later = trace.header.model.moe_layers
    for s in trace.steps:
        assert s.layer(first).ahead is None  # nothing is read ahead of the first MoE layer
        for layer in later:
            ahead = s.layer(layer).ahead
            assert ahead and len(set(ahead)) == len(ahead) and all(0 <= e < store_dir_experts(store_dir) for e in ahead)
    hits = sum(len(set(s.layer(layer).ahead) & set(s.layer(layer).counts())) for s in trace.steps for layer in later)
    assert hits > 0  # the predictions name experts the layer then used


@pytest.mark.parametrize("policy", ["lru", "lfu", "score", "moed"])
def test_the_simulator_replays_the_engines_cache_policy_use_for_use(store_dir, tmp_path, policy):
    """profiler.policies.Engine replays the engine's cache policy: over one-token steps routed to one expert a
    layer (at most one read a layer, so no read races another's keep), the simulator finds in RAM exactly the
    expert uses the engine found there, layer after layer (the same fill, observations, reservations, keeps
    and evictions), at a budget that streams."""
    from profiler.policies import make_policy
    from profiler.shapes import ModelShape
    from profiler.simulator import LinearTimes, simulate
    from profiler.trace import TraceRecorder

    lm = load_model(store_dir, offload=OffloadOptions(bits=8, ram_budget="40%", policy=policy, prefetch=False))
    p, shape = lm.experts, ModelShape.from_config(dict(lm.args.raw))
    rec, gen, engine = TraceRecorder(tmp_path / "t.jsonl", shape), torch.Generator().manual_seed(7), []
    for _ in range(40):
        for layer in p.moe_layers:
            routing, hits = routing_for(gen, 1, shape.num_experts, 1), p.stats["ram"].hits
            p.experts(layer)(torch.randn(1, shape.hidden, generator=gen), routing)
            rec(layer, routing)
            engine.append(p.stats["ram"].hits - hits)
    rec.close()
    room = p.tiers["ram"].capacity // p.expert_bytes(8)
    p.close()
    sim, replay = make_policy(f"engine:policy={policy}"), []
    observe = sim.observe

    def seen(step, routing, ctx) -> None:  # what RAM holds of the layer's experts as it routes
        replay.append(sum(ctx.res.holds("ram", (routing.layer, e)) for e in routing.counts()))
        observe(step, routing, ctx)

    sim.observe = seen
    trace = read_trace(tmp_path / "t.jsonl")
    r = simulate(trace, LinearTimes(gpu=None), sim, 0, room * trace.header.model.expert_bytes(8), bits=8)
    assert 0 < sum(engine) < len(engine) and room < shape.num_experts * len(p.moe_layers)
    assert replay == engine and r.found["ram"] == sum(engine)


def store_dir_experts(path) -> int:
    store = Store(path)
    return store.n_experts(store.layers[0])


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*MOED, *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_ram_budget_converts_once_and_matches(tiny_model, tmp_path):
    import os
    env = {**os.environ, "MOED_HOME": str(tmp_path / "home")}
    base = ["generate", "--model", str(tiny_model("qwen3_moe")), "--prompt", PROMPT, "--max-tokens", "12", "--json"]
    a = run_cli(*base, "--bits", "8", env=env)
    b = run_cli(*base, "--ram-budget", "25%", "--policy", "lru", env=env)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]
    assert len(list((tmp_path / "home" / "stores").iterdir())) == 1  # converted once, found again
    r = run_cli(*base, "--ram-budget", "lots", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "expected bytes" in r.stderr
    r = run_cli(*base, "--bits", "9", env=env)
    assert r.returncode == 2 and "bits must be 1-8 or auto" in r.stderr


def test_status_and_watch_report_tiers_and_links(moed_server, monkeypatch, tmp_path):
    from daemon.client import Client
    from proto.moed.v1 import moed_pb2 as pb
    monkeypatch.setenv("MOED_HOME", str(tmp_path))
    server = moed_server(ram_budget="30%", policy="score")
    with Client(f"unix:{server.socket_path}") as c:
        list(c.stub.Generate(pb.GenerateRequest(text=PROMPT, max_tokens=6)))
        s = c.status()
        snap = next(iter(c.stub.Watch(pb.WatchRequest(interval_seconds=0.05))))
    (ram,) = [t for t in s.tiers if t.name == "ram"]
    p = server.engine.loaded.experts
    assert ram.budget_bytes == p.tiers["ram"].capacity and 0 < ram.used_bytes <= ram.budget_bytes
    assert ram.hits + ram.misses > 0 and ram.experts_by_bits == {8: ram.experts_resident}
    (link,) = [k for k in s.links if (k.source, k.target) == ("flash", "ram")]
    assert link.bytes_moved > 0 and link.transfers > 0
    assert [t.name for t in snap.tiers] == ["ram"] and snap.links[0].bytes_moved >= link.bytes_moved


def test_resident_experts_report_their_time_per_expert(store_dir):
    """With every expert in RAM, each layer's CPU experts report their time per expert (side by side on the
    backend's workers, so wall time / experts), for the cost model."""
    lm = load_model(store_dir, offload=OffloadOptions(bits=8))  # no budget: every expert preloaded
    p = lm.experts
    assert p.tier_views()[0].experts_resident == p.experts_total
    p.timings.clear()  # the preload's reads and forms
    greedy(lm, n=4)
    experts = [(x, s) for k, x, s in p.timings if k == "expert"]
    assert len(experts) >= 4 * len(p.moe_layers) and all(x >= 1 and s > 0 for x, s in experts)
    assert not [k for k, _, _ in p.timings if k == "read"]  # nothing was read: all resident
    # the model reports into the same inbox: each decode token's attention layers and head
    layers = len(lm.model.model.layers)
    attn = [(x, s) for k, x, s in p.timings if k == "attn"]
    heads = [(x, s) for k, x, s in p.timings if k == "head"]
    assert len(attn) == 3 * layers and len(heads) == 3 and all(s > 0 for _, s in attn + heads)
    positions = sorted({x for x, _ in attn})  # the prefill (many tokens) reports neither
    assert positions[1:] == [positions[0] + 1, positions[0] + 2] and all(x == 1 for x, _ in heads)
    lm.model.report_timings(None)
    greedy(lm, n=2)
    assert len([k for k, _, _ in p.timings if k in ("attn", "head")]) == 3 * layers + 3
    # a decode step's head also counts the time since the last forward ended (the sampling and the loop around
    # the model), unless that is longer than HEAD_GAP_S (idle time between requests)
    from daemon.models.transformer import HEAD_GAP_S
    lm.model.report_timings(p.timings)
    for pause, counted in ((0.05, True), (HEAD_GAP_S + 0.05, False)):
        p.timings.clear()
        prompt = lm.tokenizer.encode(PROMPT)
        for _ in generate(lm, prompt, SamplingParams(max_tokens=3), Summary(prompt)):
            time.sleep(pause)
        heads = [s for k, _, s in p.timings if k == "head"]
        assert len(heads) == 2 and all((s >= pause) == counted for s in heads), (pause, heads)
    p.close()


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="needs a backend that runs experts side by side")
def test_a_streamed_experts_form_is_freed_once_it_has_run(store_dir):
    """With a RAM budget of two experts and a layer that uses all of them, streamed forms are let go as
    their room is: at no time are more alive than the budget holds plus one per reading thread (a
    finished expert's future used to keep its form until the whole layer was done)."""
    store = Store(store_dir)
    backend = OnnxRuntime()
    live, most = [0], [0]
    lock = threading.Lock()

    class Token:  # lives as long as the form it is attached to
        pass

    def ended() -> None:
        with lock:
            live[0] -= 1

    def prepare_expert(views, act):
        e = OnnxRuntime.prepare_expert(backend, views, act)
        token = Token()
        weakref.finalize(token, ended)
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        return PreparedExpert(e.forms + (token,), e.act, e.bits, e.nbytes)

    backend.prepare_expert = prepare_expert
    one = ExpertSizes(store).ram(backend, 8, False)
    p = TieredExperts(store, 8, backend, budgets=Budgets(ram=2 * one), io_threads=2, prefetch=False)
    layer, n = store.layers[0], store.n_experts(store.layers[0])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, store.layout.shapes[0][1], generator=gen)
    r = routing_for(gen, 32, n, 2)
    assert len(set(r.experts.reshape(-1).tolist())) == n  # every expert, streamed through two experts' room
    got = p.experts(layer)(x, r)
    assert 2 <= most[0] <= 2 + 2, most[0]
    other = OnnxRuntime()
    assert torch.equal(got, StoreExperts(store, 8, other).experts(layer)(x, r))
    for b in (p, backend, other):
        b.close()


def test_a_free_memory_budget_is_a_share_of_what_is_free_when_the_tier_is_made(store_dir, monkeypatch):
    import offload.tiered as tiered

    monkeypatch.setattr(tiered, "free_ram_bytes", lambda: 40 << 20)
    p = tiered_experts(Store(store_dir), OffloadOptions(bits=8, ram_budget="50%free"))
    assert p.tiers["ram"].capacity == 20 << 20
    p.close()


def test_a_free_memory_budget_gives_room_back_under_memory_pressure(store_dir, monkeypatch):
    """A budget taken from free memory is lowered by PRESSURE_GIVE (the lowest-ranked experts evicted) after
    PRESSURE_STEPS steps in a row with PRESSURE_FAULTS major page faults each, never below PRESSURE_FLOOR of what
    it started at, and never below what it holds; calm steps, or a budget not from free memory, change nothing.
    The tokens stay the full model's. The fault counter is the test's: the rest is the real provider."""
    import offload.tiered as tiered

    want = greedy(load_model(store_dir, bits=8, kernel=fast_cpu_backend()))
    st = Store(store_dir)
    all_bytes = ExpertSizes(st).ram(get_backend(fast_cpu_backend()), 8, False) * sum(map(st.n_experts, st.layers))
    monkeypatch.setattr(tiered, "free_ram_bytes", lambda: all_bytes)
    monkeypatch.setattr(tiered, "PRESSURE_GIVE", 0.2)
    for budget, yields in (("100%free", True), ("100%", False)):
        lm = load_model(store_dir, offload=OffloadOptions(bits=8, ram_budget=budget))
        p = lm.experts
        assert p.yield_to_pressure is yields
        start = p.tiers["ram"].capacity
        faults = {"n": 0, "per_step": 0}

        def major_faults() -> int:
            faults["n"] += faults["per_step"]
            return faults["n"]

        p.major_faults = major_faults
        caps = []

        def check() -> None:  # at every layer's routing
            t = p.tiers["ram"]
            assert t.used <= t.capacity and p.held_bytes("ram") <= t.used
            caps.append(t.capacity)

        assert greedy(lm, n=6, check=check) == want[:6] and set(caps) == {start}  # calm: nothing given back
        faults["per_step"] = tiered.PRESSURE_FAULTS - 1
        assert greedy(lm, n=6, check=check) == want[:6] and set(caps) == {start}  # below the threshold
        faults["per_step"] = tiered.PRESSURE_FAULTS
        caps.clear()
        assert greedy(lm, check=check) == want
        if not yields:
            assert set(caps) == {start} and p.budget_given_back == 0
            p.close()
            continue
        lowered = sorted(set(caps), reverse=True)
        floor = int(start * tiered.PRESSURE_FLOOR)
        assert lowered[0] == start and lowered[-1] == floor and len(lowered) >= 3
        for a, b in zip(lowered, lowered[1:]):  # 20% at a time while the held experts allow, down to the floor
            assert b >= max(floor, int(a * 0.8))
        assert p.budget_given_back == start - floor and p.tier_views()[0].budget == floor
        assert p.tier_views()[0].used <= floor
        p.close()


def test_read_ahead_is_on_by_default_only_where_something_would_sit_idle_for_it(store_dir, monkeypatch):
    """prefetch=None: read ahead with an accelerator, or where the CPU has cores the kernels leave free; not where
    every core computes (a read ahead's form would take from the layer). True and False are as given."""
    import offload.tiered as tiered
    from offload.tiered import read_ahead_pays

    if "native" not in available_backends():
        pytest.skip("the native kernels are not built here")
    cores = len(os.sched_getaffinity(0))
    assert not read_ahead_pays(None, get_backend("native", threads=cores))
    assert read_ahead_pays(None, get_backend("native", threads=max(1, cores - 1))) == (cores > 1)
    assert read_ahead_pays(Accelerator.create("emulated", get_backend("native", threads=cores)),
                           get_backend("native", threads=cores))
    monkeypatch.setattr(tiered, "read_ahead_pays", lambda accel, backend: False)
    for option, want in ((None, False), (True, True), (False, False)):
        p = tiered_experts(Store(store_dir), OffloadOptions(bits=8, ram_budget="50%", prefetch=option), "native")
        assert p.prefetch_enabled is want
        p.close()
    monkeypatch.setattr(tiered, "read_ahead_pays", lambda accel, backend: True)
    p = tiered_experts(Store(store_dir), OffloadOptions(bits=8, ram_budget="50%"), "native")
    assert p.prefetch_enabled is True
    p.close()


def test_free_ram_is_what_the_system_has_or_a_cgroup_limit_leaves(tmp_path):
    import psutil

    from offload.tiered import free_ram_bytes
    free = free_ram_bytes()
    assert 0 < free <= psutil.virtual_memory().total
    group = Path("/sys/fs/cgroup/memory") / f"moed-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(600 << 20))
    except OSError:
        pytest.skip("no writable cgroup v1 memory controller here")
    try:
        code = "from offload.tiered import free_ram_bytes; print(free_ram_bytes())"
        r = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"', sys.executable, code],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        inside = int(r.stdout.strip())
        assert 0 < inside < 600 << 20  # the limit, less what the process already holds
        # a file's pages in the group's cache can be dropped; once the process maps them, they are in use
        data = tmp_path / "data.bin"
        with open(data, "wb") as f:
            f.write(os.urandom(64 << 20))
            os.fsync(f.fileno())
        code = ("import mmap, os, sys\nfrom offload.tiered import free_ram_bytes\n"
                "fd = os.open(sys.argv[1], os.O_RDONLY)\nos.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)\n"
                "while os.read(fd, 1 << 20): pass\ncached = free_ram_bytes()\n"
                "m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)\nsum(m[i] for i in range(0, len(m), 4096))\n"
                "print(cached, free_ram_bytes())")
        r = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1" "$2"', sys.executable,
                            code, str(data)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        cached, mapped = map(int, r.stdout.split())
        assert cached - mapped > 48 << 20, (cached >> 20, mapped >> 20)
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_a_failed_planned_copy_frees_its_room_and_the_next_call_serves(store_dir):
    store = Store(store_dir)
    backend = get_backend("reference")
    layer, n = store.layers[0], store.n_experts(store.layers[0])
    one = ExpertSizes(store).ram(backend, 8, True)
    costs = LayerCosts.linear((1e-3, 1e-3), (1e-6, 0.0), (1e-7, 0.0), (1e-3, 0.0), sum(a * b for a, b in store.layout.shapes))
    accel = Accelerator.create("emulated", backend)
    p = TieredExperts(store, 8, backend, budgets=Budgets(ram=2 * n * len(store.layers) * one, vram=n * one),
                      accelerator=accel, prefetch=False, costs=costs)
    p.preload()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, store.layout.shapes[0][1], generator=gen)
    r = routing_for(gen, 4, n, 2)
    real = accel.backend.prepare_expert

    def broken(views, act):
        raise RuntimeError("device lost")

    accel.backend.prepare_expert = broken
    with pytest.raises(RuntimeError, match="device lost"):
        p.experts(layer)(x, r)
    assert p.tiers["vram"].used == 0 and not p._pinned and not p.resident("vram")
    accel.backend.prepare_expert = real
    assert torch.equal(p.experts(layer)(x, r), StoreExperts(store, 8).experts(layer)(x, r))
    assert p.resident("vram") and not p._pinned
    p.close()
