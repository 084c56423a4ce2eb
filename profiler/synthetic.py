"""Synthetic routing traces with tunable skew and temporal locality (labelled synthetic in the header).

Per layer, expert popularity follows a Zipf law of exponent `skew` (0: uniform) over a random
permutation of the experts. Each token picks its K distinct experts one by one: with
probability `locality` it reuses an expert the layer used in the previous step (temporal
locality), otherwise it draws from the popularity law. Every `drift` steps (0: never) the
popularity permutation of each layer is partly reshuffled, so that hot sets change over time.
Router weights are a random softmax over the K picks; `scores` add K further experts with
smaller probabilities so that top-2K scores exist. Deterministic for a given seed.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass

from profiler.shapes import ModelShape
from profiler.trace import LayerRouting, StepRecord, Trace, TraceHeader

GENERATOR = "profiler.synthetic"


@dataclass(frozen=True, slots=True)
class SyntheticParams:
    """Knobs of the synthetic generator."""

    steps: int = 64  # decode steps after the prefill
    prefill: int = 0  # tokens of one prefill step before them (0: none)
    skew: float = 1.0  # Zipf exponent of expert popularity
    locality: float = 0.3  # probability of reusing an expert of the previous step
    drift: int = 0  # reshuffle a quarter of each layer's popularity order every `drift` steps (0: never)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError on out-of-range knobs."""
        if self.steps < 0 or self.prefill < 0 or self.drift < 0:
            raise ValueError("steps, prefill and drift must be >= 0")
        if self.skew < 0:
            raise ValueError("skew must be >= 0")
        if not 0.0 <= self.locality < 1.0:
            raise ValueError("locality must be in [0, 1)")


def _cdf(n: int, skew: float) -> list[float]:
    w = [1.0 / (r + 1) ** skew for r in range(n)]
    return list(itertools.accumulate(w))


def synthetic_trace(shape: ModelShape, params: SyntheticParams = SyntheticParams()) -> Trace:
    """A trace of `shape` with the given skew and locality, labelled synthetic."""
    params.validate()
    rng = random.Random(params.seed)
    e, k = shape.num_experts, shape.top_k
    if k > e:
        raise ValueError(f"top_k={k} exceeds num_experts={e}")
    cdf = _cdf(e, params.skew)
    order = {layer: rng.sample(range(e), e) for layer in shape.moe_layers}  # rank -> expert
    previous: dict[int, list[int]] = {layer: [] for layer in shape.moe_layers}
    steps: list[StepRecord] = []
    sizes = ([params.prefill] if params.prefill else []) + [1] * params.steps
    context = 0
    for s, tokens in enumerate(sizes):
        if params.drift and s and s % params.drift == 0:
            for layer in shape.moe_layers:
                _drift(order[layer], rng)
        layers = []
        for layer in shape.moe_layers:
            rows = [_pick(rng, k, cdf, order[layer], previous[layer], params.locality) for _ in range(tokens)]
            previous[layer] = sorted({x for r in rows for x in r})
            weights, scores = zip(*(_weights(rng, r, e, min(2 * k, e)) for r in rows))
            layers.append(LayerRouting(layer, tuple(rows), tuple(weights), tuple(scores)))
        steps.append(StepRecord(s, tokens, context, tuple(layers)))
        context += tokens
    header = TraceHeader(shape, GENERATOR, {"generator": GENERATOR, "params": {
        "steps": params.steps, "prefill": params.prefill, "skew": params.skew, "locality": params.locality,
        "drift": params.drift, "seed": params.seed}}, min(2 * k, e))
    return Trace(header, tuple(steps))


def _pick(rng: random.Random, k: int, cdf: list[float], order: list[int], prev: list[int],
          locality: float) -> tuple[int, ...]:
    chosen: list[int] = []
    while len(chosen) < k:
        if prev and rng.random() < locality:
            cand = rng.choice(prev)
        else:
            cand = order[bisect.bisect_left(cdf, rng.random() * cdf[-1])]
        if cand not in chosen:
            chosen.append(cand)
    return tuple(chosen)


def _weights(rng: random.Random, row: tuple[int, ...], e: int, top: int):
    logits = sorted((rng.gauss(0.0, 1.0) for _ in row), reverse=True)
    z = [math.exp(v) for v in logits]
    mass = 0.6 + 0.3 * rng.random()  # the picks' share of the router's probability
    probs = [mass * v / sum(z) for v in z]
    others = [x for x in rng.sample(range(e), min(e, top + len(row))) if x not in row][:top - len(row)]
    rest = sorted((rng.random() for _ in others), reverse=True)
    tail = [(1 - mass) * v / max(sum(rest), 1e-9) / 2 for v in rest]
    tail = [min(v, probs[-1] * 0.999) for v in tail]
    weights = tuple(p / sum(probs) for p in probs)
    scores = tuple(zip(row, probs)) + tuple(zip(others, tail))
    return weights, scores


def _drift(order: list[int], rng: random.Random) -> None:
    n = max(2, len(order) // 4)
    idx = rng.sample(range(len(order)), min(n, len(order)))
    vals = [order[i] for i in idx]
    rng.shuffle(vals)
    for i, v in zip(idx, vals):
        order[i] = v
