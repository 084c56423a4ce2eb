"""Expert placement and caching policies behind one interface, for the simulator. No torch.

A policy sees the replay through `SimContext` and answers five questions:
  start(ctx)                         initial residency (ctx.res.add)
  observe(step, routing, ctx)        a layer has routed (update recency, scores, ...)
  split(layer, demand, ctx)          which experts run on the GPU and which on the CPU, in order
  admit(tier, key, ctx, pinned)      keep an expert fetched on demand in `tier`?
  victims(tier, key, ctx, pinned)    what to evict to make room for it (never a pinned one)
  prefetch(step, layer, ctx)         experts of later layers to fetch into the fast tier now
Subclasses are found by their `name` (policy_names / make_policy); a later policy plugs in by
subclassing Policy in a module that is imported (or named as `module:Class`).
"""

from __future__ import annotations

import importlib
import random
from typing import ClassVar

from offload.cache import AHEAD_PRIOR, AHEAD_WEIGHT, Tier, make_cache_policy
from profiler.simulator import Key, SimContext, Split
from profiler.trace import LayerRouting, StepRecord


class Policy:
    """Base policy: nothing cached, every expert on the GPU if there is one, else on the CPU."""

    name: ClassVar[str] = ""
    overlap: ClassVar[bool] = True  # GPU and CPU work at once inside a layer
    manages_ram: ClassVar[bool] = False  # False: the simulator fills RAM statically in layer order

    def start(self, ctx: SimContext) -> None:
        """Set the initial residency."""

    def observe(self, step: StepRecord, routing: LayerRouting, ctx: SimContext) -> None:
        """A layer has routed."""

    def split(self, layer: int, demand: dict[int, int], ctx: SimContext) -> Split:
        """All on the GPU (resident first, heaviest first), or all on the CPU without one."""
        order = sorted(demand, key=lambda e: (not ctx.fast((layer, e)), -demand[e], e))
        return Split(tuple(order), ()) if ctx.has_gpu else Split((), tuple(order))

    def admit(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key]) -> bool:
        """Keep an expert fetched on demand? Default: no."""
        return False

    def victims(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key]) -> list[Key]:
        """Experts to evict to make room for `key`. Default: none."""
        return []

    def prefetch(self, step: StepRecord, layer: int, ctx: SimContext) -> list[Key]:
        """Experts to fetch ahead. Default: none."""
        return []


class ReadAhead(Policy):
    """Another policy with moed's engine read-ahead in place of its own prefetch: before a MoE layer routes,
    the experts the engine read ahead for it (a trace's `ahead`, recorded by tiered experts) go on the
    links in that order, each kept if the policy finds it room (offload.tiered's _prefetch_next, replayed)."""

    def __init__(self, base: Policy) -> None:
        self.base = base
        self.name = f"{base.name}+read-ahead"  # type: ignore[misc]  # an instance's, not the class's
        self.overlap, self.manages_ram = base.overlap, base.manages_ram  # type: ignore[misc]

    def start(self, ctx: SimContext) -> None:
        self.base.start(ctx)

    def observe(self, step: StepRecord, routing: LayerRouting, ctx: SimContext) -> None:
        self.base.observe(step, routing, ctx)

    def split(self, layer: int, demand: dict[int, int], ctx: SimContext) -> Split:
        return self.base.split(layer, demand, ctx)

    def admit(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key]) -> bool:
        return self.base.admit(tier, key, ctx, pinned)

    def victims(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key]) -> list[Key]:
        return self.base.victims(tier, key, ctx, pinned)

    def prefetch(self, step: StepRecord, layer: int, ctx: SimContext) -> list[Key]:
        layers = ctx.shape.moe_layers
        i = layers.index(layer)
        nxt = step.layer(layers[i + 1]) if i + 1 < len(layers) else None
        return [(nxt.layer, e) for e in nxt.ahead or ()] if nxt is not None else []


class Engine(Policy):
    """A cache policy of moed's engine (offload.cache: lru, lfu, score, moed) as its tiered experts run it on a
    machine without an accelerator: RAM filled in layer order at the start (TieredExperts.preload); each
    routing observed with its router scores (the mean probability over tokens within each token's top 2k).
    A layer's missed experts are read into room that their reads make first, by evicting the least valued
    expert of any layer (TieredExperts' reservation); once the layer has run, each is kept where the policy
    finds victims for it, else its room is freed. A read ahead is kept over experts valued below the measured
    share of the engine's predictions the layers then used (the trace's `ahead`, averaged as
    TieredExperts.ahead_precision is). An expert is one unit of the tier."""

    name = "engine"
    manages_ram = True

    def __init__(self, policy: str = "moed") -> None:
        make_cache_policy(policy, 1)  # ValueError now for an unknown name
        self.policy, self.cache = policy, None
        self.name = f"engine-{policy}"  # type: ignore[misc]  # an instance's, not the class's
        self.chance, self.layer = AHEAD_PRIOR, None
        self._demand: set[Key] = set()  # the current layer's experts
        self._reads: list[Key] = []  # its missed experts, read into reserved room, to keep or let go
        self._out: list[Key] = []  # victims found by the last admit

    def start(self, ctx: SimContext) -> None:
        self.cache = make_cache_policy(self.policy, len(ctx.shape.moe_layers))
        for layer in ctx.shape.moe_layers:
            for e in range(ctx.shape.num_experts):
                if ctx.res.free(ctx.fast_tier) <= 0:
                    return
                ctx.res.add(ctx.fast_tier, (layer, e))

    def observe(self, step: StepRecord, routing: LayerRouting, ctx: SimContext) -> None:
        self._settle(ctx)
        counts = routing.counts()
        if routing.ahead:
            self.chance += AHEAD_WEIGHT * (len(set(routing.ahead) & counts.keys()) / len(routing.ahead) - self.chance)
        self.cache.observe(routing.layer, counts, routing.expert_scores(2 * len(routing.experts[0])))
        self.layer, self._demand = routing.layer, {(routing.layer, e) for e in counts}

    def admit(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key]) -> bool:
        self._out = []
        if tier != ctx.fast_tier:
            return False
        if key in self._demand:  # a miss: its read reserves room, the least valued expert of any layer evicted
            if ctx.res.free(tier) <= 0:
                cands = [k for k in ctx.res.held[tier] if k not in pinned and k not in self._reads]
                if not cands:
                    return False
                self._out = [min(cands, key=lambda k: (self.cache.rank(k), k))]
            self._reads.append(key)
            return True
        out = self._victims(tier, key, ctx, pinned, self.chance)  # a read ahead
        self._out = out or []
        return out is not None

    def victims(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key]) -> list[Key]:
        return self._out

    def _settle(self, ctx: SimContext) -> None:
        """The last layer's reads, in order: each kept if the policy finds it room, else let go."""
        tier = ctx.fast_tier
        for key in self._reads:
            if not ctx.res.holds(tier, key):
                continue
            ctx.res.remove(tier, key)
            out = self._victims(tier, key, ctx, self._demand - {key}, None)
            if out is not None:
                for v in out:
                    ctx.res.remove(tier, v)
                if ctx.res.free(tier) > 0:
                    ctx.res.add(tier, key)
        self._reads = []

    def _victims(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key], chance: float | None
                 ) -> list[Key] | None:
        held = ctx.res.held[tier]
        t = Tier(tier, ctx.res.cap[tier], dict.fromkeys(held, 1), len(held))
        return self.cache.victims(key, 1, t, pinned, chance)


def _whole_layers(ctx: SimContext) -> list[int]:
    """The MoE layers whose experts all fit in the fast tier, taken from the last layer back."""
    n = ctx.res.cap[ctx.fast_tier] // ctx.shape.num_experts if ctx.shape.num_experts else 0
    layers = list(ctx.shape.moe_layers)
    return layers[len(layers) - min(n, len(layers)):]


class LlamaCpp(Policy):
    """llama.cpp --n-cpu-moe N: the first N layers' experts on the CPU, the rest in VRAM; no overlap."""

    name = "llamacpp"
    overlap = False

    def start(self, ctx: SimContext) -> None:
        """Whole layers in VRAM from the last layer back; on a CPU-only machine, RAM in file order."""
        if ctx.fast_tier == "vram":
            for layer in _whole_layers(ctx):
                for e in range(ctx.shape.num_experts):
                    ctx.res.add("vram", (layer, e))
        else:  # CPU only: experts held in RAM in file order while they fit (the rest read from flash)
            for layer in ctx.shape.moe_layers:
                for e in range(ctx.shape.num_experts):
                    if ctx.res.free("ram") > 0:
                        ctx.res.add("ram", (layer, e))

    def split(self, layer: int, demand: dict[int, int], ctx: SimContext) -> Split:
        """Experts held in VRAM on the GPU, the others on the CPU."""
        gpu = [e for e in sorted(demand) if ctx.res.holds("vram", (layer, e))]
        cpu = [e for e in sorted(demand) if not ctx.res.holds("vram", (layer, e))]
        return Split(tuple(gpu), tuple(cpu))


class KTransformers(LlamaCpp):
    """kTransformers: routed experts on the CPU while attention and shared experts run on the GPU.

    Whole layers' experts go to VRAM as far as the budget allows (its injection rules can place
    layers' experts on the GPU; `use_vram=0` keeps its default of all routed experts on the CPU);
    unlike llama.cpp, GPU and CPU work overlap inside a layer, so the shared expert (GPU) runs
    while the routed ones (CPU) do. Without shared experts the two static policies time alike
    here: their real difference, CPU kernel speed, is one cost model for both.
    """

    name = "ktransformers"
    overlap = True

    def __init__(self, use_vram: bool = True) -> None:
        self.use_vram = use_vram  # False: every routed expert on the CPU whatever the budget

    def start(self, ctx: SimContext) -> None:
        """As llama.cpp, or nothing in VRAM with use_vram=0."""
        if self.use_vram or ctx.fast_tier != "vram":
            super().start(ctx)


class _PerLayerCache(Policy):
    """A fast-tier cache split evenly over the MoE layers, first experts resident at the start."""

    def share(self, ctx: SimContext) -> int:
        """Experts each layer may keep in the fast tier."""
        return ctx.res.cap[ctx.fast_tier] // max(len(ctx.shape.moe_layers), 1)

    def start(self, ctx: SimContext) -> None:
        """The first `share` experts of every layer resident."""
        n = min(self.share(ctx), ctx.shape.num_experts)
        for layer in ctx.shape.moe_layers:
            for e in range(n):
                ctx.res.add(ctx.fast_tier, (layer, e))
                self.touch(layer, e, -1.0)

    def touch(self, layer: int, e: int, when: float) -> None:
        """Record a use (for recency-based subclasses)."""

    def rank(self, key: Key) -> float:
        """Lower: evicted first."""
        raise NotImplementedError

    def admit(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key]) -> bool:
        """Keep what was fetched into the fast tier while the layer's share has room or an evictable expert."""
        if tier != ctx.fast_tier or self.share(ctx) == 0:
            return False
        held = ctx.res.layer(tier, key[0])
        return len(held) < self.share(ctx) or any((key[0], e) not in pinned for e in held)

    def victims(self, tier: str, key: Key, ctx: SimContext, pinned: set[Key]) -> list[Key]:
        """The layer's lowest-ranked unpinned expert once its share is full."""
        held = [(key[0], e) for e in ctx.res.layer(tier, key[0])]
        if len(held) < self.share(ctx) and ctx.res.free(tier) > 0:
            return []
        cands = [k for k in held if k not in pinned]
        return [min(cands, key=lambda k: (self.rank(k), k[1]))] if cands else []


class LRU(_PerLayerCache):
    """mixtral-offloading: per-layer LRU expert cache in the fast tier, misses copied on demand."""

    name = "lru"

    def __init__(self) -> None:
        self.last: dict[Key, float] = {}
        self.clock = 0

    def touch(self, layer: int, e: int, when: float) -> None:
        """Record a use at time `when`."""
        self.last[(layer, e)] = when

    def rank(self, key: Key) -> float:
        """Least recently used first."""
        return self.last.get(key, -2.0)

    def observe(self, step: StepRecord, routing: LayerRouting, ctx: SimContext) -> None:
        """Every expert the layer used is the most recent, in ascending id."""
        for e in routing.counts():  # ascending id: the order trace stats use
            self.clock += 1
            self.touch(routing.layer, e, self.clock)


class HybriMoE(_PerLayerCache):
    """HybriMoE: two-ended greedy GPU/CPU split, score-based cache, next-layer prefetch.

    Scores: S <- alpha * s + (1 - alpha) * S per routing of the layer, s = router probability if
    among the token's top p = 2k (mean over the step's tokens). Prefetch predicts the next MoE
    layer's experts as the trace's actual ones, each kept with probability `accuracy` (else
    replaced by a random other expert), and copies the candidates that save most time while the
    current layer computes.
    """

    name = "hybrimoe"

    def __init__(self, alpha: float = 0.5, prefetch: bool = True, accuracy: float = 1.0, seed: int = 0) -> None:
        self.alpha, self.do_prefetch, self.accuracy = float(alpha), bool(prefetch), float(accuracy)
        self.rng = random.Random(seed)
        self.score: dict[Key, float] = {}

    def rank(self, key: Key) -> float:
        """Lowest score first."""
        return self.score.get(key, 0.0)

    def observe(self, step: StepRecord, routing: LayerRouting, ctx: SimContext) -> None:
        """Update every expert's score of the layer."""
        s = routing.expert_scores(2 * ctx.shape.top_k)
        layer = routing.layer
        for e in range(ctx.shape.num_experts):
            k = (layer, e)
            old = self.score.get(k, 0.0)
            self.score[k] = self.alpha * s.get(e, 0.0) + (1 - self.alpha) * old

    def estimate(self, layer: int, demand: dict[int, int], ctx: SimContext, at: float = 0.0,
                 extra: dict[int, float] | None = None,
                 busy: dict[str, float] | None = None) -> tuple[Split, float]:
        """The two-ended greedy split of a layer routing `at` s after ctx.now, and its finish after routing.

        `extra`: experts assumed in the fast tier, landing so many seconds after ctx.now; `busy`:
        when each link frees, seconds after ctx.now (default: as the simulator says).
        """
        tm, now, extra = ctx.times, ctx.now, extra or {}
        busy = busy or {k: max(0.0, v - now) for k, v in ctx.link_free.items()}
        rd, cp = tm.read(ctx.expert_bytes), tm.h2d(ctx.expert_bytes)
        tokens = max(sum(demand.values()) // max(ctx.shape.top_k, 1), 1)

        def ready(tier: str, e: int) -> float | None:  # None: not held; else seconds after routing
            if e in extra and tier == ctx.fast_tier:
                return max(0.0, extra[e] - at)
            k = (layer, e)
            held = tier if ctx.res.holds(tier, k) else ("vram" if tier == "ram" and ctx.res.in_ram(k) else None)
            return None if held is None else max(0.0, ctx.res.ready.get((held, k), 0.0) - now - at)

        in_ram = {e: ready("ram", e) for e in demand}
        p, f = max(0.0, busy["pcie"] - at), max(0.0, busy["flash"] - at)
        if not ctx.has_gpu:
            order = sorted(demand, key=lambda e: (demand[e], e))
            c = 0.0
            for e in order:
                r = in_ram[e]
                if r is None:
                    f = r = f + rd
                c = max(c, r) + tm.expert("cpu", demand[e])
            return Split((), tuple(order)), tm.shared(tokens) + c
        in_vram = {e: ready("vram", e) for e in demand}
        items = sorted(demand, key=lambda e: (-demand[e], e))
        g, c = tm.shared(tokens), 0.0
        lo, hi = 0, len(items) - 1
        gpu: list[int] = []
        cpu: list[int] = []
        while lo <= hi:
            h, light = items[lo], items[hi]
            np_, nf = p, f
            rdy = in_vram[h]
            if rdy is None:
                r = in_ram[h]
                if r is None:
                    nf = r = f + rd
                rdy = np_ = max(p, r) + cp
            g_fin = max(g, rdy) + tm.expert("gpu", demand[h])
            lf, r = f, in_ram[light]
            if r is None:
                lf = r = f + rd
            c_fin = max(c, r) + tm.expert("cpu", demand[light])
            if g_fin <= c_fin:
                gpu.append(h)
                lo += 1
                g, p, f = g_fin, np_, nf
            else:
                cpu.append(light)
                hi -= 1
                c, f = c_fin, lf
        gpu.sort(key=lambda e: in_vram[e] is None)  # stable: resident first, then in copy order
        return Split(tuple(gpu), tuple(cpu)), max(g, c)

    def split(self, layer: int, demand: dict[int, int], ctx: SimContext) -> Split:
        """The two-ended greedy split."""
        return self.estimate(layer, demand, ctx)[0]

    def prefetch(self, step: StepRecord, layer: int, ctx: SimContext) -> list[Key]:
        """The predicted next-layer experts whose fetch, started now, saves the most time there."""
        if not self.do_prefetch or self.share(ctx) == 0:
            return []
        layers = ctx.shape.moe_layers
        i = layers.index(layer)
        nxt = step.layer(layers[i + 1]) if i + 1 < len(layers) else None
        cur = step.layer(layer)
        if nxt is None or cur is None:
            return []
        demand = self.predict(nxt.counts(), ctx.shape.num_experts)
        nl, tm, eb = nxt.layer, ctx.times, ctx.expert_bytes
        at = self.estimate(layer, cur.counts(), ctx)[1] + tm.attention(step.tokens, step.context)  # next routing
        busy = {k: max(0.0, v - ctx.now) for k, v in ctx.link_free.items()}
        # candidates: the heaviest predicted experts not in the fast tier (at most p = 2k)
        cands = sorted((e for e in demand if not ctx.fast((nl, e))), key=lambda e: (-demand[e], e))
        cands = cands[:2 * ctx.shape.top_k]
        chosen: dict[int, float] = {}
        base = self.estimate(nl, demand, ctx, at, chosen, busy)[1]
        while cands and len(chosen) < self.share(ctx):
            best = None
            for e in cands:
                b = dict(busy)
                land = 0.0
                if not ctx.res.in_ram((nl, e)):
                    b["flash"] = land = b["flash"] + tm.read(eb)
                if ctx.fast_tier == "vram":
                    b["pcie"] = land = max(b["pcie"], land) + tm.h2d(eb)
                t = self.estimate(nl, demand, ctx, at, {**chosen, e: land}, b)[1]
                if best is None or (base - t, demand[e], -e) > (best[0], demand[best[1]], -best[1]):
                    best = (base - t, e, land, b, t)
            gain, e, land, b, t = best
            if gain <= 0:
                break
            chosen[e], busy, base = land, b, t
            cands.remove(e)
        return [(nl, e) for e in sorted(chosen)]

    def predict(self, counts: dict[int, int], num_experts: int) -> dict[int, int]:
        """The true next-layer demand with each expert kept with probability `accuracy`."""
        if self.accuracy >= 1.0:
            return dict(counts)
        out: dict[int, int] = {}
        for e, n in counts.items():
            if self.rng.random() < self.accuracy:
                out[e] = out.get(e, 0) + n
            else:
                others = [x for x in range(num_experts) if x not in counts and x not in out]
                x = self.rng.choice(others) if others else e
                out[x] = out.get(x, 0) + n
        return out


def _all_policies(cls: type = Policy) -> dict[str, type]:
    out: dict[str, type] = {}
    for sub in cls.__subclasses__():
        if sub.name:
            out[sub.name] = sub
        out.update(_all_policies(sub))
    return out


def policy_names() -> list[str]:
    """Names of every known policy."""
    return sorted(_all_policies())


def make_policy(spec: str) -> Policy:
    """A policy from 'name' or 'name:key=value,...' (or 'module:Class[:key=value,...]')."""
    name, _, opts = spec.partition(":")
    kw: dict[str, object] = {}
    known = _all_policies()
    if name not in known and "." in name:  # module:Class[:opts]
        cls_name, _, opts = opts.partition(":")
        cls = getattr(importlib.import_module(name), cls_name)
    elif name in known:
        cls = known[name]
    else:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(policy_names())})")
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        kw[k.strip()] = _value(v.strip())
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"bad options for policy {name!r}: {e}") from None


def _value(v: str) -> object:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)
