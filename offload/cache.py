"""Expert cache policies behind one interface, for the runtime and for trace replays. No torch.

A policy ranks cached experts and answers two questions for a tier of fixed byte capacity:
  observe(layer, counts, scores)   a layer has routed: counts[e] tokens went to expert e, scores[e]
                                   is its mean router probability when among the top 2k (else absent)
  victims(key, need, tier, pinned) which held experts to evict so that `need` more bytes fit for
                                   `key` (None: do not admit `key` at all, stream it instead)

Budgets are per layer (capacity / MoE layers, the rule of LRU/LFU/HybriMoE caches) or shared by
all layers (`shared = True`, moed's own), and in bytes, so experts held at different bit-widths
compete by what they cost. Keys are (layer, expert).

Policies:
- lru: least recently used first (mixtral-offloading).
- lfu: fewest uses first, ties by recency.
- score: HybriMoE's score, S <- a * s + (1 - a) * S after every routing of the layer (a = 0.5).
- moed: one pool for all layers; an expert's worth is its measured chance of use at its layer's
  next routing (the layer's repeat rate if it was just used, else its long-run frequency); a
  missed expert is admitted only if it is worth at least what it would evict (otherwise it is
  computed and dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

Key = tuple[int, int]


@dataclass(slots=True)
class Tier:
    """What one memory tier holds: bytes per key within a capacity."""

    name: str
    capacity: int
    held: dict[Key, int] = field(default_factory=dict)
    used: int = 0

    def free(self) -> int:
        """Bytes still free."""
        return self.capacity - self.used

    def add(self, key: Key, nbytes: int) -> None:
        """Account for `key` holding nbytes (replacing what it held before)."""
        self.used += nbytes - self.held.get(key, 0)
        self.held[key] = nbytes

    def remove(self, key: Key) -> int:
        """Forget `key`; the bytes it held."""
        n = self.held.pop(key, 0)
        self.used -= n
        return n

    def layer_used(self, layer: int) -> int:
        """Bytes held by one layer's experts."""
        return sum(n for (lay, _), n in self.held.items() if lay == layer)


class LayerValues:
    """A running average per expert, one array per layer: blend(layer, a, values) sets v <- a * values[e] + (1 - a)
    * v for every expert of the layer at once (absent from values: 0), as a loop over the layer's experts would,
    number for number; an expert never given a value reads 0."""

    def __init__(self) -> None:
        self._layers: dict[int, np.ndarray] = {}

    def blend(self, layer: int, a: float, values: Mapping[int, float]) -> None:
        v = self._layers.get(layer)
        top = max(values, default=-1) + 1
        if v is None or len(v) < top:
            grown = np.zeros(top)
            if v is not None:
                grown[:len(v)] = v
            v = self._layers[layer] = grown
        v *= 1 - a  # then + a * value where there is one: the same sum, in the other order (exact)
        if values:
            v[list(values)] += a * np.fromiter(values.values(), float, len(values))

    def get(self, key: Key) -> float:
        v = self._layers.get(key[0])
        return float(v[key[1]]) if v is not None and 0 <= key[1] < len(v) else 0.0


# a read ahead evicts what the policy values below the measured chance that a predicted expert is used: the
# share of each prediction the layer then used, averaged with this weight from this prior (offload.tiered)
AHEAD_WEIGHT, AHEAD_PRIOR = 0.1, 0.5


class CachePolicy:
    """Base policy: rank by `rank` (lower evicted first), per-layer shares, always admit."""

    name: ClassVar[str] = ""
    shared: ClassVar[bool] = False

    def __init__(self, n_layers: int = 1) -> None:
        self.n_layers = max(1, n_layers)
        self.clock = 0

    def observe(self, layer: int, counts: Mapping[int, int], scores: Mapping[int, float] | None = None) -> None:
        """A layer has routed (counts: tokens per expert used)."""
        for e in sorted(counts):
            self.clock += 1
            self.touch((layer, e), counts[e], (scores or {}).get(e, 0.0))

    def touch(self, key: Key, tokens: int, score: float) -> None:
        """One use of an expert."""

    def rank(self, key: Key) -> float:
        """Worth keeping: lower is evicted first."""
        raise NotImplementedError

    def budget(self, tier: Tier, layer: int) -> int:
        """Bytes the layer may hold in the tier."""
        return tier.capacity if self.shared else tier.capacity // self.n_layers

    def victims(self, key: Key, need: int, tier: Tier, pinned: Iterable[Key] = (),
                chance: float | None = None) -> list[Key] | None:
        """Held experts to evict so that `need` bytes for `key` fit; None if `key` should not be kept. `chance`:
        the caller's estimate that `key` is used at its layer's next routing (a read ahead's measured
        precision), which a policy that weighs what it admits against what it evicts may use."""
        pinned = set(pinned)
        layer = key[0]
        if need > self.budget(tier, layer):
            return None
        if self.shared:
            cands = [k for k in tier.held if k not in pinned and k != key]
            short = need - tier.free()
        else:
            cands = [k for k in tier.held if k[0] == layer and k not in pinned and k != key]
            short = max(tier.layer_used(layer) + need - self.budget(tier, layer), need - tier.free())
        out: list[Key] = []
        if short <= 0:
            return out
        for k in sorted(cands, key=lambda k: (self.rank(k), k)):
            if not self.admits(key, k, chance):
                return None
            out.append(k)
            short -= tier.held[k]
            if short <= 0:
                return out
        return None

    def admits(self, key: Key, victim: Key, chance: float | None = None) -> bool:
        """Whether `key` may displace `victim` (demand caches: always)."""
        return True


class LRU(CachePolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self, n_layers: int = 1) -> None:
        super().__init__(n_layers)
        self.last: dict[Key, int] = {}

    def touch(self, key: Key, tokens: int, score: float) -> None:
        self.last[key] = self.clock

    def rank(self, key: Key) -> float:
        return self.last.get(key, -1)


class LFU(CachePolicy):
    """Fewest uses first (uses = steps the expert was routed in), ties by recency."""

    name = "lfu"

    def __init__(self, n_layers: int = 1) -> None:
        super().__init__(n_layers)
        self.uses: dict[Key, int] = {}
        self.last: dict[Key, int] = {}

    def touch(self, key: Key, tokens: int, score: float) -> None:
        self.uses[key] = self.uses.get(key, 0) + 1
        self.last[key] = self.clock

    def rank(self, key: Key) -> float:
        return self.uses.get(key, 0) + self.last.get(key, 0) / (self.clock + 1)


class Score(CachePolicy):
    """HybriMoE: S <- alpha * s + (1 - alpha) * S for every expert of the layer at each routing."""

    name = "score"

    def __init__(self, n_layers: int = 1, alpha: float = 0.5, num_experts: int | None = None) -> None:
        super().__init__(n_layers)
        self.alpha = float(alpha)
        self.score = LayerValues()

    def observe(self, layer: int, counts: Mapping[int, int], scores: Mapping[int, float] | None = None) -> None:
        scores = scores if scores is not None else _count_scores(counts)
        self.score.blend(layer, self.alpha, scores)  # every expert of the layer decays, the scored ones gain
        super().observe(layer, counts, scores)

    def rank(self, key: Key) -> float:
        return self.score.get(key)


class Moed(CachePolicy):
    """One pool for all layers, ranked by the estimated chance of use at the layer's next routing.

    That chance is measured, not assumed: for an expert the layer used at its last routing it is
    the layer's observed repeat rate (the share of one routing's experts used again at the next,
    averaged with weight `beta`); for any expert it is at least its long-run use frequency (an
    average with weight `slow`); a small share `eps` of HybriMoE's router score breaks ties toward
    recently preferred experts. A missed expert is admitted only if it is worth at least what it
    would evict. (slow, beta, eps) were chosen on the default model's traces, bench/cache_hits.py.
    """

    name = "moed"
    shared = True

    def __init__(self, n_layers: int = 1, slow: float = 0.01, beta: float = 0.05, eps: float = 0.1,
                 fast: float = 0.5) -> None:
        super().__init__(n_layers)
        self.slow, self.beta, self.eps, self.fast = float(slow), float(beta), float(eps), float(fast)
        self.freq = LayerValues()  # average of "used at this routing" over the layer's routings
        self.recent = LayerValues()  # HybriMoE's score
        self.last: dict[int, frozenset[int]] = {}  # each layer's experts at its last routing
        self.repeat: dict[int, float] = {}  # each layer's observed repeat rate

    def observe(self, layer: int, counts: Mapping[int, int], scores: Mapping[int, float] | None = None) -> None:
        scores = scores if scores is not None else _count_scores(counts)
        used = frozenset(counts)
        prev = self.last.get(layer)
        if prev:
            again = len(prev & used) / len(prev)
            self.repeat[layer] = (1 - self.beta) * self.repeat.get(layer, again) + self.beta * again
        self.last[layer] = used
        self.freq.blend(layer, self.slow, dict.fromkeys(used, 1.0))
        self.recent.blend(layer, self.fast, scores)
        super().observe(layer, counts, scores)

    def worth(self, key: Key) -> float:
        """Estimated chance that the expert is used at its layer's next routing (plus the tie-break)."""
        again = self.repeat.get(key[0], 0.0) if key[1] in self.last.get(key[0], ()) else 0.0
        return max(self.freq.get(key), again) + self.eps * self.recent.get(key)

    def rank(self, key: Key) -> float:
        return self.worth(key)

    def admits(self, key: Key, victim: Key, chance: float | None = None) -> bool:
        """Worth at least the victim's; an expert read ahead is worth at least the chance that it is used."""
        worth = self.worth(key) if chance is None else max(chance, self.worth(key))
        return worth >= self.worth(victim)


def _count_scores(counts: Mapping[int, int]) -> dict[int, float]:
    """Router-probability stand-in when only counts are known: each expert's share of the uses."""
    total = sum(counts.values()) or 1
    return {e: n / total for e, n in counts.items()}


POLICIES: dict[str, type[CachePolicy]] = {p.name: p for p in (LRU, LFU, Score, Moed)}


def make_cache_policy(name: str, n_layers: int) -> CachePolicy:
    """A policy by name; ValueError if unknown."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown cache policy {name!r} (known: {', '.join(POLICIES)})")
    return cls(n_layers)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """Hits and accesses of a cache replay (an access: one distinct expert of a layer in a step)."""

    hits: int
    accesses: int

    @property
    def hit_rate(self) -> float:
        """hits / accesses (0 with no accesses)."""
        return self.hits / self.accesses if self.accesses else 0.0


def replay(events: Iterable[tuple[int, Mapping[int, int], Mapping[int, float] | None]], policy: CachePolicy,
           capacity: int, size: Callable[[Key], int] = lambda k: 1) -> ReplayResult:
    """Replay routings (layer, counts, scores) through a demand-fetched cache of `capacity` bytes.

    Per routing: the layer's experts are looked up (hits counted), the policy observes, then each
    missed expert is admitted if the policy finds room for it (the layer's experts are pinned).
    """
    tier = Tier("cache", capacity)
    hits = accesses = 0
    for layer, counts, scores in events:
        keys = [(layer, e) for e in sorted(counts)]
        accesses += len(keys)
        missed = [k for k in keys if k not in tier.held]
        hits += len(keys) - len(missed)
        policy.observe(layer, counts, scores)
        for k in missed:
            out = policy.victims(k, size(k), tier, pinned=keys)
            if out is None:
                continue
            for v in out:
                tier.remove(v)
            tier.add(k, size(k))
    return ReplayResult(hits, accesses)
