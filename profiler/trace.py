"""Routing traces: the file format, a reader and writer, and the recorder `moed generate` uses.

Format (`moed-trace` version 1): UTF-8 JSON Lines, one JSON object per line.

Line 1, the header:

    {"format": "moed-trace", "version": 1,
     "model": {name, hidden, moe_inter, num_experts, top_k, num_layers, moe_layers: [int],
               heads, kv_heads, head_dim, shared_inter, dense_inter},      # profiler.shapes.ModelShape
     "synthetic": null | {"generator": str, "params": {...}},           # non-null: not a real model's routing
     "source": str,                                                      # model path or generator name
     "score_top": int}                                                   # router scores kept per token (P)

Then one line per forward step (a prefill chunk or one decode token):

    {"step": int,            # 0, 1, 2, ... in order
     "tokens": int,          # T, tokens in this step
     "context": int,         # positions already in the KV cache before this step
     "layers": [             # one entry per MoE layer, in layer order
       {"layer": int,
        "experts": [[int] * K] * T,     # the experts each token was routed to, in router order
        "weights": [[float] * K] * T,   # the router weights used to combine them
        "scores": [[[int, float]] * P] * T,     # optional: the P highest router probabilities (expert, p)
        "ahead": [int]}]}                     # optional: the experts moed's engine read ahead for this layer
                                              # (predicted from the previous MoE layer's input), in read order

Token counts per expert (the "demand" of a layer) follow from `experts`:
LayerRouting.counts(). `scores` serve score-based caches (HybriMoE's top-p with p = 2k);
where absent, consumers fall back to `weights`. Floats are rounded to 5 significant
digits. A file whose header has `synthetic` set is labelled SYNTHETIC by every tool.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from daemon.errors import FormatError
from profiler.shapes import ModelShape

FORMAT = "moed-trace"
VERSION = 1


@dataclass(frozen=True, slots=True)
class LayerRouting:
    """One MoE layer's routing in one step."""

    layer: int
    experts: tuple[tuple[int, ...], ...]  # [T][K]
    weights: tuple[tuple[float, ...], ...]  # [T][K]
    scores: tuple[tuple[tuple[int, float], ...], ...] | None = None  # [T][P] (expert, probability)
    ahead: tuple[int, ...] | None = None  # the engine's read-ahead for this layer, in order (None: not recorded)

    def counts(self) -> dict[int, int]:
        """Tokens routed to each expert that got any, ascending expert id."""
        c = Counter(e for row in self.experts for e in row)
        return dict(sorted(c.items()))

    def expert_scores(self, top: int) -> dict[int, float]:
        """Per expert, the mean over tokens of its router probability if among the token's top `top`, else 0."""
        t = len(self.experts)
        acc: dict[int, float] = {}
        if self.scores is not None:
            for row in self.scores:
                for e, p in row[:top]:
                    acc[e] = acc.get(e, 0.0) + p
        else:
            for row_e, row_w in zip(self.experts, self.weights):
                for e, w in list(zip(row_e, row_w))[:top]:
                    acc[e] = acc.get(e, 0.0) + w
        return {e: v / t for e, v in acc.items()}

    def to_dict(self) -> dict:
        """A JSON-ready record."""
        d: dict[str, Any] = {"layer": self.layer, "experts": [list(r) for r in self.experts],
                             "weights": [[_round(w) for w in r] for r in self.weights]}
        if self.scores is not None:
            d["scores"] = [[[e, _round(p)] for e, p in r] for r in self.scores]
        if self.ahead is not None:
            d["ahead"] = list(self.ahead)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRouting":
        """Inverse of to_dict."""
        scores, ahead = d.get("scores"), d.get("ahead")
        return cls(int(d["layer"]), tuple(tuple(int(e) for e in r) for r in d["experts"]),
                   tuple(tuple(float(w) for w in r) for r in d["weights"]),
                   None if scores is None else tuple(tuple((int(e), float(p)) for e, p in r) for r in scores),
                   None if ahead is None else tuple(int(e) for e in ahead))


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One forward step: its token count, context, and every MoE layer's routing."""

    step: int
    tokens: int
    context: int
    layers: tuple[LayerRouting, ...]

    def layer(self, index: int) -> LayerRouting | None:
        """The routing of MoE layer `index` in this step, if recorded."""
        for r in self.layers:
            if r.layer == index:
                return r
        return None

    def to_dict(self) -> dict:
        """A JSON-ready record."""
        return {"step": self.step, "tokens": self.tokens, "context": self.context,
                "layers": [r.to_dict() for r in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "StepRecord":
        """Inverse of to_dict."""
        return cls(int(d["step"]), int(d["tokens"]), int(d.get("context", 0)),
                   tuple(LayerRouting.from_dict(r) for r in d["layers"]))


@dataclass(frozen=True, slots=True)
class TraceHeader:
    """What a trace is of: the model's shape, where it came from, whether it is synthetic."""

    model: ModelShape
    source: str = ""
    synthetic: dict | None = None
    score_top: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """'SYNTHETIC (generator params)' or 'recorded (source)', for every report that uses the trace."""
        if self.synthetic is not None:
            params = ", ".join(f"{k}={v}" for k, v in self.synthetic.get("params", {}).items())
            return f"SYNTHETIC trace from {self.synthetic.get('generator', '?')} ({params})"
        return f"recorded trace of {self.source or self.model.name}"

    def to_dict(self) -> dict:
        """The header line's object."""
        return {"format": FORMAT, "version": VERSION, "model": self.model.to_dict(), "synthetic": self.synthetic,
                "source": self.source, "score_top": self.score_top, **self.extra}

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> "TraceHeader":
        """Inverse of to_dict; FormatError on a wrong format or version."""
        if d.get("format") != FORMAT:
            raise FormatError(f"not a moed routing trace (format={d.get('format')!r})", path)
        if d.get("version") != VERSION:
            raise FormatError(f"unsupported trace version {d.get('version')!r} (this moed reads {VERSION})", path)
        known = {"format", "version", "model", "synthetic", "source", "score_top"}
        return cls(ModelShape.from_dict(d["model"]), d.get("source", ""), d.get("synthetic"),
                   int(d.get("score_top", 0)), {k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True, slots=True)
class Trace:
    """A whole trace in memory."""

    header: TraceHeader
    steps: tuple[StepRecord, ...]

    @property
    def tokens(self) -> int:
        """Tokens over all steps."""
        return sum(s.tokens for s in self.steps)

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace in the format above."""
        with TraceWriter(path, self.header) as w:
            for s in self.steps:
                w.write(s)


def _round(v: float) -> float:
    return float(f"{v:.5g}")


class TraceWriter:
    """Writes a header and then steps, one line each, flushed as they come."""

    def __init__(self, path: str | os.PathLike, header: TraceHeader) -> None:
        self.path = Path(path)
        self._f: IO[str] | None = open(self.path, "w", encoding="utf-8")
        self._line(header.to_dict())

    def _line(self, obj: dict) -> None:
        assert self._f is not None, "trace writer is closed"
        self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._f.flush()

    def write(self, step: StepRecord) -> None:
        """Append one step."""
        self._line(step.to_dict())

    def close(self) -> None:
        """Close the file."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_trace(path: str | os.PathLike) -> tuple[TraceHeader, Iterator[StepRecord]]:
    """The header and a lazy iterator over the steps of a trace file."""
    p = Path(path)
    if not p.is_file():
        raise FormatError("no such trace file", p)
    f = open(p, encoding="utf-8")
    first = f.readline()
    try:
        header = TraceHeader.from_dict(json.loads(first), str(p))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        f.close()
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"bad trace header: {e}", p) from None

    def steps() -> Iterator[StepRecord]:
        with f:
            for n, line in enumerate(f, start=2):
                if not line.strip():
                    continue
                try:
                    yield _checked_step(StepRecord.from_dict(json.loads(line)), header.model)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise FormatError(f"line {n}: bad step record: {e}", p) from None

    return header, steps()


def read_trace(path: str | os.PathLike) -> Trace:
    """Read a whole trace file."""
    header, steps = iter_trace(path)
    return Trace(header, tuple(steps))


def _checked_step(s: StepRecord, shape: ModelShape) -> StepRecord:
    for r in s.layers:
        if len(r.experts) != s.tokens or len(r.weights) != s.tokens:
            raise ValueError(f"layer {r.layer}: {len(r.experts)} expert rows for {s.tokens} tokens")
        for row in r.experts + ((r.ahead,) if r.ahead else ()):
            if any(not 0 <= e < shape.num_experts for e in row):
                raise ValueError(f"layer {r.layer}: expert id out of range 0..{shape.num_experts - 1}")
    return s


class TraceRecorder:
    """A routing observer (CausalLM.observe_routing) that writes every step's routing to a trace file.

    A step ends when the last MoE layer has routed; it is written then, so the file is whole
    after every step even if the process is killed. `context` counts the tokens of earlier steps
    (right for one sequence at a time, as `moed generate` runs).
    """

    def __init__(self, path: str | os.PathLike, shape: ModelShape, source: str = "", score_top: int | None = None):
        self.shape = shape
        self.score_top = 2 * shape.top_k if score_top is None else score_top
        self.writer = TraceWriter(path, TraceHeader(shape, source, None, self.score_top))
        self._last_layer = shape.moe_layers[-1] if shape.moe_layers else -1
        self._layers: list[LayerRouting] = []
        self._tokens = 0
        self._step = 0
        self._context = 0
        self._ahead: dict[int, tuple[int, ...]] = {}

    def read_ahead(self, layer: int, experts: list[int]) -> None:
        """The engine reads these experts of `layer` ahead (before it routes), in this order."""
        self._ahead[layer] = tuple(experts)

    def __call__(self, layer: int, routing: Any) -> None:
        """Record one MoE layer's routing (a daemon.models.moe.Routing)."""
        experts = routing.experts.tolist()  # [T, K]
        weights = routing.weights.float().tolist()
        scores = None
        if self.score_top:
            p, idx = routing.logits.float().softmax(dim=-1).topk(min(self.score_top, routing.logits.shape[-1]), dim=-1)
            scores = tuple(tuple(zip(ir, pr)) for ir, pr in zip(idx.tolist(), p.tolist()))
        self._tokens = len(experts)
        self._layers.append(LayerRouting(layer, tuple(map(tuple, experts)), tuple(map(tuple, weights)), scores,
                                         self._ahead.pop(layer, None)))
        if layer == self._last_layer:
            self.writer.write(StepRecord(self._step, self._tokens, self._context, tuple(self._layers)))
            self._step += 1
            self._context += self._tokens
            self._layers = []

    def close(self) -> None:
        """Write a partial last step (if any) and close the file."""
        if self._layers:
            self.writer.write(StepRecord(self._step, self._tokens, self._context, tuple(self._layers)))
            self._layers = []
        self.writer.close()


def record_trace(lm: Any, path: str | os.PathLike) -> TraceRecorder:
    """Start recording a loaded model's routing (daemon.loaders.build.LoadedModel) into `path`."""
    cfg = dict(lm.args.raw) or {}
    shape = ModelShape.from_config(cfg, name=Path(lm.source).name)
    moe = tuple(lm.model.moe_layers)
    if moe != shape.moe_layers:
        shape = replace(shape, moe_layers=moe)
    rec = TraceRecorder(path, shape, source=str(lm.source))
    lm.model.observe_routing(rec)
    if hasattr(lm.experts, "on_read_ahead"):  # tiered experts: what they read ahead, too
        lm.experts.on_read_ahead = rec.read_ahead
    return rec
