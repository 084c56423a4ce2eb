"""Piecewise-linear cost model of moed's ops: fitted from probe samples, refined online. No torch.

An op is named `kind:device[:variant]...`; its size `x` is in the op's unit:

    ffn:<device>:<bits>:<backend>   x = tokens routed to one expert   meta: hidden, inter
    attn:<device>:b<batch>          x = context (KV positions)        meta: hidden, heads, kv_heads, head_dim
    h2d:<device>:pinned|pageable    x = bytes copied host -> device
    flash:read                      x = bytes read with the page cache bypassed
    unpack:<device>:<bits>          x = bytes of stored planes turned into compute form
    head:<device>                   x = positions given logits    meta: hidden, vocab (learned from the engine)

Each op keeps its raw samples, the fit (knots at the probed sizes; per size the lower quartile
of the samples, since contention from other work only ever adds time; made non-decreasing by
isotonic regression; linear between knots and beyond the ends), and an
online correction: a log-scale gain for the whole op (a moving average of observed/fitted)
plus one log-scale term per knot for what differs near particular sizes. Memory is bounded: the correction has
one number per knot and the record of recent errors is a ring of `RECENT` entries.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

FORMAT_VERSION = 1
RECENT = 64  # observed (x, predicted, seconds) kept per op for error reports
UNITS = {"ffn": "tokens", "attn": "positions", "h2d": "bytes", "flash": "bytes", "unpack": "bytes",
         "head": "positions"}
FIT_QUANTILE = 0.25  # the per-size statistic the fit goes through
MAX_LOG_CORRECTION = math.log(64.0)  # online refinement never moves a prediction more than 64x
PRIOR = 1.0  # evidence (observations) at which a knot's own average and the op-wide gain weigh the same
EVIDENCE_DECAY = 0.02  # share of every knot's evidence forgotten at each observation


@dataclass(frozen=True, slots=True)
class Sample:
    """One timing: op, its size x (in the op's unit) and the seconds it took."""

    op: str
    x: float
    seconds: float


def op_kind(op: str) -> str:
    """The kind part of an op name (`ffn`, `attn`, `h2d`, `flash`, `unpack`)."""
    return op.split(":", 1)[0]


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values, linear between order statistics (q = 0.5: the median)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Least-squares non-decreasing fit of values (pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for m, _, n in blocks:
        out.extend([m] * n)
    return out


class Curve:
    """One op's fit: knots and values, raw samples, and its online correction."""

    __slots__ = ("op", "knots", "values", "samples", "meta", "gain", "local", "evidence", "observed", "recent",
                 "rate", "gain_rate")

    def __init__(self, op: str, knots: list[float], values: list[float], samples: list[tuple[float, float]],
                 meta: dict | None = None, rate: float = 0.3, gain_rate: float = 0.15) -> None:
        if not knots or len(knots) != len(values):
            raise ValueError(f"op {op}: a fit needs knots and as many values")
        self.op, self.knots, self.values = op, list(knots), list(values)
        self.samples = list(samples)
        self.meta = dict(meta or {})
        self.rate, self.gain_rate = rate, gain_rate
        self.gain = 0.0
        self.local = [0.0] * len(knots)
        self.evidence = [0.0] * len(knots)
        self.observed = 0
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=RECENT)

    @classmethod
    def fit(cls, op: str, samples: Iterable[tuple[float, float]], meta: dict | None = None) -> "Curve":
        """Fit from (x, seconds) pairs: lower quartile per x, made non-decreasing in x."""
        pts = [(float(x), float(s)) for x, s in samples if s > 0 and math.isfinite(s)]
        if not pts:
            raise ValueError(f"op {op}: no positive finite samples to fit")
        by_x: dict[float, list[float]] = {}
        for x, s in pts:
            by_x.setdefault(x, []).append(s)
        knots = sorted(by_x)
        meds = [quantile(by_x[x], FIT_QUANTILE) for x in knots]
        values = isotonic(meds, [float(len(by_x[x])) for x in knots])
        return cls(op, knots, values, pts, meta)

    def _segment(self, x: float) -> tuple[int, float]:
        """(i, f): x lies at fraction f from knot i to knot i+1 (f may be <0 or >1 at the ends)."""
        k = self.knots
        if len(k) == 1:
            return 0, 0.0
        i = min(max(bisect.bisect_right(k, x) - 1, 0), len(k) - 2)
        return i, (x - k[i]) / (k[i + 1] - k[i])

    def base(self, x: float) -> float:
        """The fitted time at x, without the online correction."""
        if len(self.knots) == 1:
            return self.values[0]
        i, f = self._segment(x)
        v = self.values[i] + f * (self.values[i + 1] - self.values[i])
        return max(v, min(self.values) * 1e-3)

    def _knot_correction(self, j: int) -> float:
        w = self.evidence[j]
        return (w * self.local[j] + PRIOR * self.gain) / (w + PRIOR)

    def correction(self, x: float) -> float:
        """The log-scale online correction at x."""
        if len(self.knots) == 1:
            return self._knot_correction(0)
        i, f = self._segment(x)
        f = min(max(f, 0.0), 1.0)
        return (1 - f) * self._knot_correction(i) + f * self._knot_correction(i + 1)

    def predict(self, x: float) -> float:
        """Predicted seconds at x."""
        return self.base(x) * math.exp(self.correction(x))

    def observe(self, x: float, seconds: float) -> None:
        """Move the correction towards one measured timing (bounded memory).

        The op-wide gain is a moving average of log(observed / fitted) over all sizes; each knot
        keeps its own moving average of the ratios observed near it and its evidence (a decaying
        count). A knot's correction blends the two by evidence, so a machine that slows down
        everywhere is tracked at sizes never observed, a change at some sizes only is kept near
        those sizes, and a knot not observed for a while falls back to the op-wide gain.
        """
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        self.recent.append((float(x), self.predict(x), float(seconds)))
        self.observed += 1
        r = math.log(seconds / self.base(x))
        self.gain = _clamp(self.gain + self.gain_rate * (r - self.gain))
        self.evidence = [w * (1 - EVIDENCE_DECAY) for w in self.evidence]
        if len(self.knots) == 1:
            pairs = [(0, 1.0)]
        else:
            i, f = self._segment(x)
            f = min(max(f, 0.0), 1.0)
            pairs = [(i, 1 - f), (i + 1, f)]
        for j, w in pairs:
            if w > 0:
                self.evidence[j] += w
                step = max(self.rate * w, w / self.evidence[j])  # a running mean at first, then a moving average
                self.local[j] = _clamp(self.local[j] + min(step, 1.0) * (r - self.local[j]))

    def recent_error(self) -> float | None:
        """Mean absolute percentage error of predictions against the recent observed timings."""
        if not self.recent:
            return None
        return 100.0 * sum(abs(p - s) / s for _, p, s in self.recent) / len(self.recent)

    def fit_error(self) -> float:
        """Mean absolute percentage error of the fit against its own samples' medians (noise included)."""
        by_x: dict[float, list[float]] = {}
        for x, s in self.samples:
            by_x.setdefault(x, []).append(s)
        errs = [abs(self.base(x) - median(v)) / median(v) for x, v in by_x.items()]
        return 100.0 * sum(errs) / len(errs) if errs else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready record of the samples, the fit and the correction."""
        return {"unit": UNITS.get(op_kind(self.op), "x"), "meta": self.meta,
                "samples": [[x, s] for x, s in self.samples],
                "fit": {"knots": self.knots, "values": self.values, "quantile": FIT_QUANTILE,
                        "fit_mape_pct": round(self.fit_error(), 3)},
                "refine": {"rate": self.rate, "gain_rate": self.gain_rate, "gain": self.gain, "local": self.local,
                           "evidence": self.evidence, "observed": self.observed,
                           "recent": [list(r) for r in self.recent]}}

    @classmethod
    def from_dict(cls, op: str, d: dict) -> "Curve":
        """Inverse of to_dict."""
        fit, ref = d["fit"], d.get("refine", {})
        c = cls(op, fit["knots"], fit["values"], [tuple(p) for p in d.get("samples", [])], d.get("meta"),
                ref.get("rate", 0.3), ref.get("gain_rate", 0.15))
        c.gain = float(ref.get("gain", 0.0))
        local, evidence = ref.get("local"), ref.get("evidence")
        if local is not None and len(local) == len(c.knots):
            c.local = [float(v) for v in local]
        if evidence is not None and len(evidence) == len(c.knots):
            c.evidence = [float(v) for v in evidence]
        c.observed = int(ref.get("observed", 0))
        c.recent.extend(tuple(r) for r in ref.get("recent", []))
        return c


def _clamp(v: float) -> float:
    return min(max(v, -MAX_LOG_CORRECTION), MAX_LOG_CORRECTION)


class UnknownOp(KeyError):
    """The cost model has no fit that can answer for this op."""


class CostModel:
    """Fitted curves for every profiled op, answering the scheduler's questions in seconds."""

    def __init__(self, curves: dict[str, Curve] | None = None) -> None:
        self.curves: dict[str, Curve] = dict(curves or {})

    @classmethod
    def fit(cls, samples: Iterable[Sample], meta: dict[str, dict] | None = None) -> "CostModel":
        """Fit one curve per op from raw samples; `meta` gives each op's shape facts."""
        by_op: dict[str, list[tuple[float, float]]] = {}
        for s in samples:
            by_op.setdefault(s.op, []).append((s.x, s.seconds))
        meta = meta or {}
        return cls({op: Curve.fit(op, pts, meta.get(op)) for op, pts in sorted(by_op.items())})

    def ops(self) -> list[str]:
        """Names of the ops this model can predict."""
        return sorted(self.curves)

    def curve(self, op: str) -> Curve:
        """The curve of one op."""
        try:
            return self.curves[op]
        except KeyError:
            raise UnknownOp(f"no fit for op {op!r} (have: {', '.join(self.ops()) or 'none'})") from None

    def predict(self, op: str, x: float) -> float:
        """Predicted seconds of op at size x."""
        return self.curve(op).predict(x)

    def observe(self, op: str, x: float, seconds: float) -> None:
        """Refine op's prediction from a timing the engine measured."""
        self.curve(op).observe(x, seconds)

    def learn(self, op: str, x: float, seconds: float, meta: dict | None = None) -> None:
        """Refine op's prediction from a timing the engine measured; an op no probe fitted starts its fit
        from this timing (its later timings refine it like any other)."""
        if op in self.curves:
            self.observe(op, x, seconds)
        elif seconds > 0 and math.isfinite(seconds):
            self.curves[op] = Curve.fit(op, [(x, seconds)], meta)

    def ffn_op(self, device: str, bits: int | None = None, backend: str | None = None,
               tokens: float = 1.0) -> str:
        """The expert-FFN op answering for (device, bits, backend): exact, else nearest bits, fastest backend."""
        cands = [op for op in self.curves if op.startswith(f"ffn:{device}:")]
        if backend is not None:
            cands = [op for op in cands if op.split(":")[3] == backend] or cands
        if not cands:
            raise UnknownOp(f"no expert FFN fit for device {device!r} (have: {', '.join(self.ops()) or 'none'})")
        if bits is not None:
            dist = min(abs(int(op.split(":")[2]) - bits) for op in cands)
            cands = [op for op in cands if abs(int(op.split(":")[2]) - bits) == dist]
        return min(cands, key=lambda op: self.predict(op, tokens))

    def expert_ffn(self, device: str, tokens: float, bits: int | None = None, backend: str | None = None) -> float:
        """Seconds for one expert's FFN over `tokens` tokens (at the probed expert shape)."""
        return self.predict(self.ffn_op(device, bits, backend, tokens), tokens)

    def attention(self, device: str, batch: float, context: float) -> float:
        """Seconds of one attention layer for `batch` new tokens over `context` positions."""
        curves = sorted((int(op.split(":")[2][1:]), op) for op in self.curves if op.startswith(f"attn:{device}:b"))
        if not curves:
            raise UnknownOp(f"no attention fit for device {device!r}")
        if len(curves) == 1:
            b, op = curves[0]
            return self.predict(op, context) * max(batch, 1) / b
        bs = [b for b, _ in curves]
        i = min(max(bisect.bisect_right(bs, batch) - 1, 0), len(bs) - 2)
        (b0, op0), (b1, op1) = curves[i], curves[i + 1]
        t0, t1 = self.predict(op0, context), self.predict(op1, context)
        t = t0 + (batch - b0) / (b1 - b0) * (t1 - t0)
        return max(t, 0.0)

    def h2d(self, nbytes: float, pinned: bool = True, device: str = "cuda") -> float:
        """Seconds to copy nbytes from host to device memory."""
        op = f"h2d:{device}:{'pinned' if pinned else 'pageable'}"
        if op not in self.curves:
            op = f"h2d:{device}:{'pageable' if pinned else 'pinned'}"
        return self.predict(op, nbytes)

    def flash_read(self, nbytes: float) -> float:
        """Seconds to read nbytes from the model store's disk, page cache bypassed."""
        return self.predict("flash:read", nbytes)

    def unpack(self, device: str, bits: int, nbytes: float) -> float:
        """Seconds to turn nbytes of stored planes at `bits` into compute form on device."""
        cands = [op for op in self.curves if op.startswith(f"unpack:{device}:")]
        if not cands:
            raise UnknownOp(f"no unpack fit for device {device!r}")
        op = min(cands, key=lambda o: abs(int(o.split(":")[2]) - bits))
        return self.predict(op, nbytes)

    def to_dict(self) -> dict:
        """A JSON-ready record of every op."""
        return {"format": "moed-costmodel", "version": FORMAT_VERSION,
                "ops": {op: c.to_dict() for op, c in sorted(self.curves.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        """Inverse of to_dict."""
        if d.get("format") != "moed-costmodel" or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a moed cost model of version {FORMAT_VERSION}: "
                             f"format={d.get('format')!r} version={d.get('version')!r}")
        return cls({op: Curve.from_dict(op, c) for op, c in d["ops"].items()})

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostModel":
        """Read a model written by save()."""
        return cls.from_dict(json.loads(Path(path).read_text()))
