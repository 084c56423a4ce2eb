"""Trace-driven simulator: replays a routing trace through a model's shapes on a machine. No torch.

Model of a step. Layers run in order; a layer's attention (and router) runs on the main device
(the GPU where there is one) after the previous layer is done. Then, for an MoE layer, the
policy splits the layer's experts between GPU and CPU; an expert runs on the GPU only once it
is in VRAM, on the CPU only once it is in RAM (on unified memory either pool serves both).
Missing experts are fetched over two FIFO links: flash -> RAM, RAM -> VRAM; a fetch starts when
the routing is known. The shared expert runs on the main device before its routed experts. GPU
and CPU work at the same time unless the policy says they take turns (`overlap = False`,
llama.cpp). On unified memory both budgets form one pool
that serves GPU and CPU without copies. Prefetches a policy issues go on the links after the layer's own fetches. The
layer ends when its last expert ends. A step ends with its head (its work outside the layers: embedding,
final norm, lm_head for the one position whose next token it samples: traces are of one sequence) on
the main device.

Lower bound of the same work: the heads, and per layer, attention plus the best split of the layer's experts
between GPU and CPU with every expert resident in both memories and no transfer on the
critical path (perfect overlap): min over splits of max(shared + sum GPU times, sum CPU
times), exact for up to EXACT_SPLIT experts and its fractional relaxation (still a bound)
above; layers cannot overlap each other because each needs the previous one's output.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

from profiler.shapes import ModelShape
from profiler.trace import Trace

Key = tuple[int, int]  # (layer, expert)
EXACT_SPLIT = 12
TIERS = ("vram", "ram", "flash")


class OpTimes(Protocol):
    """Seconds of every op the simulator schedules (see machine.CostTimes)."""

    has_gpu: bool
    unified: bool

    def expert(self, device: str, tokens: int) -> float:
        """One routed expert over `tokens` tokens on 'gpu' or 'cpu'."""

    def shared(self, tokens: int) -> float:
        """The shared expert(s) of a layer on the main device."""

    def dense_mlp(self, tokens: int) -> float:
        """The MLP of a layer that is not MoE."""

    def attention(self, tokens: int, context: int) -> float:
        """One attention layer and router for `tokens` new tokens after `context` positions."""

    def head(self, tokens: int) -> float:
        """A step's work outside its layers (embedding, final norm, lm_head for `tokens` positions), on the main
        device."""

    def h2d(self, nbytes: int) -> float:
        """A copy of nbytes from RAM into VRAM."""

    def read(self, nbytes: int) -> float:
        """A read of nbytes from flash."""


@dataclass(frozen=True, slots=True)
class LinearTimes:
    """Op times as a + b * size: hand-checkable machines for tests and examples."""

    gpu: tuple[float, float] | None = (1.0, 0.0)  # per expert: a + b * tokens; None: no GPU
    cpu: tuple[float, float] = (0.0, 4.0)
    attn: float = 0.5  # per layer, any tokens
    shared_s: float = 0.0
    dense_s: float = 0.0
    head_s: float = 0.0  # per step, any tokens
    copy: tuple[float, float] = (2.0, 0.0)  # RAM -> VRAM: a + b * bytes
    flash: tuple[float, float] = (3.0, 0.0)
    unified: bool = False

    @property
    def has_gpu(self) -> bool:
        """Whether there is a GPU."""
        return self.gpu is not None

    def expert(self, device: str, tokens: int) -> float:
        """a + b * tokens on the device."""
        a, b = self.gpu if device == "gpu" else self.cpu
        return a + b * tokens

    def shared(self, tokens: int) -> float:
        """The fixed shared-expert time."""
        return self.shared_s

    def dense_mlp(self, tokens: int) -> float:
        """The fixed dense-MLP time."""
        return self.dense_s

    def attention(self, tokens: int, context: int) -> float:
        """The fixed attention time."""
        return self.attn

    def head(self, tokens: int) -> float:
        """The fixed head time."""
        return self.head_s

    def h2d(self, nbytes: int) -> float:
        """a + b * bytes (0 on unified memory)."""
        return 0.0 if self.unified else self.copy[0] + self.copy[1] * nbytes

    def read(self, nbytes: int) -> float:
        """a + b * bytes."""
        return self.flash[0] + self.flash[1] * nbytes


class Residency:
    """Which experts VRAM and RAM hold, within byte budgets, and when in-flight fetches land."""

    def __init__(self, vram_bytes: int, ram_bytes: int, expert_bytes: int, total: int, unified: bool) -> None:
        self.expert_bytes, self.unified = expert_bytes, unified
        self.cap = {"vram": min(total, vram_bytes // expert_bytes) if expert_bytes else total,
                    "ram": min(total, ram_bytes // expert_bytes) if expert_bytes else total}
        self.held: dict[str, set[Key]] = {"vram": set(), "ram": set()}
        self.ready: dict[tuple[str, Key], float] = {}

    def holds(self, tier: str, key: Key) -> bool:
        """Whether the tier holds the expert (its fetch may still be in flight)."""
        return key in self.held[tier]

    def in_ram(self, key: Key) -> bool:
        """Whether the CPU can run the expert without a flash read."""
        return key in self.held["ram"] or (self.unified and key in self.held["vram"])

    def free(self, tier: str) -> int:
        """Experts the tier can still take."""
        return self.cap[tier] - len(self.held[tier])

    def add(self, tier: str, key: Key, ready: float = 0.0) -> None:
        """Hold the expert from time `ready` on; ValueError if the tier is full."""
        if key in self.held[tier]:
            return
        if self.free(tier) <= 0:
            raise ValueError(f"{tier} is full ({self.cap[tier]} experts)")
        self.held[tier].add(key)
        self.ready[(tier, key)] = ready

    def remove(self, tier: str, key: Key) -> None:
        """Stop holding the expert."""
        self.held[tier].discard(key)
        self.ready.pop((tier, key), None)

    def layer(self, tier: str, layer: int) -> list[int]:
        """Experts of one layer the tier holds, ascending."""
        return sorted(e for l, e in self.held[tier] if l == layer)


@dataclass(slots=True)
class SimContext:
    """What a policy may look at: shapes, op times, residency, the trace, the clock and the links."""

    shape: ModelShape
    times: OpTimes
    res: Residency
    trace: Trace
    expert_bytes: int
    now: float = 0.0  # when the current layer's routing became known
    link_free: dict[str, float] = field(default_factory=lambda: {"flash": 0.0, "pcie": 0.0})  # when each link frees

    @property
    def has_gpu(self) -> bool:
        """Whether the machine has a GPU."""
        return self.times.has_gpu

    @property
    def fast_tier(self) -> str:
        """The tier policies cache experts in: VRAM with a GPU, else RAM."""
        return "vram" if self.times.has_gpu else "ram"

    def fast(self, key: Key) -> bool:
        """Whether the expert is in the fast tier."""
        return self.res.holds(self.fast_tier, key)


@dataclass(frozen=True, slots=True)
class Split:
    """Where a layer's experts run, each list in execution order."""

    gpu: tuple[int, ...]
    cpu: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SimResult:
    """What a replay cost and moved."""

    policy: str
    trace: str
    steps: int
    tokens: int
    time_s: float
    lower_bound_s: float
    uses: int
    found: dict[str, int]  # tier -> uses found there first
    link_bytes: dict[str, int]
    prefetched: int
    prefetch_used: int
    budgets: dict[str, int]
    step_times: tuple[float, ...] = field(repr=False, default=())

    @property
    def per_token_s(self) -> float:
        """Simulated seconds per token."""
        return self.time_s / self.tokens if self.tokens else 0.0

    @property
    def lower_bound_per_token_s(self) -> float:
        """Lower-bound seconds per token."""
        return self.lower_bound_s / self.tokens if self.tokens else 0.0

    def hit_rate(self, tier: str) -> float:
        """Share of expert uses found in `tier` (vram, ram or flash)."""
        return self.found.get(tier, 0) / self.uses if self.uses else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready record."""
        return {"policy": self.policy, "trace": self.trace, "steps": self.steps, "tokens": self.tokens,
                "time_s": self.time_s, "per_token_s": self.per_token_s, "lower_bound_s": self.lower_bound_s,
                "lower_bound_per_token_s": self.lower_bound_per_token_s,
                "ratio_to_lower_bound": self.time_s / self.lower_bound_s if self.lower_bound_s else None,
                "uses": self.uses, "hit_rate": {t: self.hit_rate(t) for t in TIERS},
                "link_bytes": self.link_bytes, "prefetched": self.prefetched, "prefetch_used": self.prefetch_used,
                "budgets": self.budgets}


def best_split(times: OpTimes, tokens: int, counts: tuple[int, ...]) -> float:
    """Lower bound of a layer's expert phase: best GPU/CPU split, all resident, free transfers."""
    shared = times.shared(tokens)
    cpu = [times.expert("cpu", n) for n in counts]
    if not times.has_gpu:
        return shared + sum(cpu)
    gpu = [times.expert("gpu", n) for n in counts]
    if len(counts) <= EXACT_SPLIT:
        best = float("inf")
        for mask in itertools.product((0, 1), repeat=len(counts)):  # 1: CPU
            g = shared + sum(t for t, m in zip(gpu, mask) if not m)
            c = sum(t for t, m in zip(cpu, mask) if m)
            best = min(best, max(g, c))
        return best
    # fractional relaxation: move work to the CPU cheapest-first until the loads meet
    g, c = shared + sum(gpu), 0.0
    for tg, tc in sorted(zip(gpu, cpu), key=lambda p: p[1] / p[0] if p[0] else float("inf")):
        if c + tc <= g - tg:
            g, c = g - tg, c + tc
            continue
        y = (g - c) / (tg + tc) if tg + tc else 0.0
        y = min(max(y, 0.0), 1.0)
        return max(g - y * tg, c + y * tc, max(min(a, b) for a, b in zip(gpu, cpu)))
    return max(g, c)


def lower_bound(trace: Trace, times: OpTimes) -> tuple[float, list[float]]:
    """(total, per step) seconds of the trace with perfect overlap and every expert resident."""
    memo: dict[tuple[int, tuple[int, ...]], float] = {}
    moe = set(trace.header.model.moe_layers)
    per_step = []
    for s in trace.steps:
        t = 0.0
        for layer in range(trace.header.model.num_layers):
            t += times.attention(s.tokens, s.context)
            r = s.layer(layer) if layer in moe else None
            if r is None:
                t += times.dense_mlp(s.tokens) if layer not in moe else 0.0
                continue
            key = (s.tokens, tuple(sorted(r.counts().values(), reverse=True)))
            if key not in memo:
                memo[key] = best_split(times, s.tokens, key[1])
            t += memo[key]
        per_step.append(t + times.head(1))
    return sum(per_step), per_step


class _Links:
    """The two FIFO links and the bytes each moved."""

    def __init__(self) -> None:
        self.free = {"flash": 0.0, "pcie": 0.0}
        self.bytes = {"flash->ram": 0, "ram->vram": 0}

    def fetch(self, ctx: SimContext, key: Key, at: float, to_vram: bool) -> float:
        """Bring an expert to RAM (and on to VRAM); returns when it lands."""
        nbytes, t = ctx.expert_bytes, at
        if not ctx.res.in_ram(key):
            t = max(self.free["flash"], at) + ctx.times.read(nbytes)
            self.free["flash"] = t
            self.bytes["flash->ram"] += nbytes
        elif ctx.res.holds("ram", key):
            t = max(t, ctx.res.ready.get(("ram", key), 0.0))
        if to_vram and not ctx.res.unified:
            t = max(self.free["pcie"], t) + ctx.times.h2d(nbytes)
            self.free["pcie"] = t
            self.bytes["ram->vram"] += nbytes
        return t


def _admit(policy, ctx: SimContext, tier: str, key: Key, ready: float, pinned: set[Key]) -> bool:
    if ctx.res.holds(tier, key) or not policy.admit(tier, key, ctx, pinned):
        return False
    for v in policy.victims(tier, key, ctx, pinned):
        if v in pinned:
            raise ValueError(f"policy {policy.name} evicted {v}, which the current layer uses")
        ctx.res.remove(tier, v)
    if ctx.res.free(tier) <= 0:
        return False
    ctx.res.add(tier, key, ready)
    return True


def _check_split(sp: Split, demand: dict[int, int], has_gpu: bool, name: str) -> None:
    got = sorted(sp.gpu + sp.cpu)
    if got != sorted(demand):
        raise ValueError(f"policy {name} split experts {got} but the layer uses {sorted(demand)}")
    if sp.gpu and not has_gpu:
        raise ValueError(f"policy {name} put experts on a GPU this machine does not have")


def simulate(trace: Trace, times: OpTimes, policy, vram_bytes: int, ram_bytes: int, bits: int = 4) -> SimResult:
    """Replay a trace under a policy on a machine with the given expert budgets."""
    shape = trace.header.model
    eb = shape.expert_bytes(bits)
    if times.unified:  # one memory: both budgets form the pool the GPU and CPU share
        vram_bytes, ram_bytes = vram_bytes + ram_bytes, 0
    res = Residency(vram_bytes if times.has_gpu else 0, ram_bytes, eb, len(shape.moe_layers) * shape.num_experts,
                    times.unified)
    ctx = SimContext(shape, times, res, trace, eb)
    policy.start(ctx)
    if ctx.fast_tier == "vram" and not getattr(policy, "manages_ram", False):
        keys = [(l, e) for l in shape.moe_layers for e in range(shape.num_experts)]
        for k in sorted(keys, key=lambda k: res.holds("vram", k)):  # experts not in VRAM first
            if res.free("ram") <= 0:
                break
            res.add("ram", k)
    links = _Links()
    ctx.link_free = links.free
    main = "gpu" if times.has_gpu else "cpu"
    clock = {"gpu": 0.0, "cpu": 0.0}
    moe = set(shape.moe_layers)
    found = {t: 0 for t in TIERS}
    prefetched: set[Key] = set()
    n_prefetched = n_used = 0
    t = 0.0
    step_times = []
    for s in trace.steps:
        start = t
        for layer in range(shape.num_layers):
            a = max(t, clock[main])
            routed = a + times.attention(s.tokens, s.context)
            clock[main] = routed
            r = s.layer(layer) if layer in moe else None
            if r is None:
                if layer not in moe:
                    clock[main] = routed = routed + times.dense_mlp(s.tokens)
                t = routed
                continue
            demand = r.counts()
            ctx.now = routed
            policy.observe(s, r, ctx)
            sp = policy.split(layer, demand, ctx)
            _check_split(sp, demand, times.has_gpu, policy.name)
            pinned = {(layer, e) for e in demand}
            for e in demand:
                k = (layer, e)
                tier = "vram" if res.holds("vram", k) else "ram" if res.in_ram(k) else "flash"
                found[tier] += 1
                if k in prefetched:
                    prefetched.discard(k)
                    n_used += tier == ctx.fast_tier
            ready: dict[int, float] = {}
            for e in sp.gpu:
                k = (layer, e)
                if res.holds("vram", k):
                    ready[e] = max(routed, res.ready[("vram", k)])
                else:
                    ready[e] = links.fetch(ctx, k, routed, to_vram=True)
                    _admit(policy, ctx, "vram", k, ready[e], pinned)
            for e in sp.cpu:
                k = (layer, e)
                if res.in_ram(k):
                    tier = "ram" if res.holds("ram", k) else "vram"
                    ready[e] = max(routed, res.ready[(tier, k)])
                else:
                    ready[e] = links.fetch(ctx, k, routed, to_vram=False)
                    _admit(policy, ctx, "ram", k, ready[e], pinned)
            sh = times.shared(s.tokens)
            if getattr(policy, "overlap", True):
                clock[main] = max(clock[main], routed) + sh
                done = clock[main]
                for dev, order in (("gpu", sp.gpu), ("cpu", sp.cpu)):
                    for e in order:
                        clock[dev] = max(clock[dev], routed, ready[e]) + times.expert(dev, demand[e])
                        done = max(done, clock[dev])
            else:
                done = routed + sh
                for dev, order in (("gpu", sp.gpu), ("cpu", sp.cpu)):
                    for e in order:
                        done = max(done, ready[e]) + times.expert(dev, demand[e])
                clock["gpu"] = clock["cpu"] = done
            ahead = policy.prefetch(s, layer, ctx)
            for k in ahead:
                if ctx.fast(k) or not policy.admit(ctx.fast_tier, k, ctx, pinned | set(ahead)):
                    continue
                land = links.fetch(ctx, k, routed, to_vram=ctx.fast_tier == "vram")
                if _admit(policy, ctx, ctx.fast_tier, k, land, pinned | set(ahead)):
                    prefetched.add(k)
                    n_prefetched += 1
            t = done
        t = clock[main] = max(t, clock[main]) + times.head(1)
        step_times.append(t - start)
    lb, _ = lower_bound(trace, times)
    return SimResult(policy.name, trace.header.label, len(trace.steps), trace.tokens, t, lb, sum(found.values()),
                     found, dict(links.bytes), n_prefetched, n_used,
                     {"vram": vram_bytes if times.has_gpu else 0, "ram": ram_bytes, "expert_bytes": eb},
                     tuple(step_times))
