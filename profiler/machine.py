"""Machine profiles for the simulator: a measured `moed profile`, or a spec-sheet parameter file. No torch.

A spec-sheet file (`profiler/machines/*.json`, format `moed-machine` version 1) gives each
device's memory bandwidth and peak FLOP rate from public data sheets, with the efficiency we
assume is reachable; op times follow a roofline: launch overhead + max(bytes / (bandwidth *
efficiency), flops / (peak * efficiency)), copies: latency + bytes / bandwidth. They are
sampled into the same piecewise-linear CostModel a measured profile holds, at the simulated
model's shapes, so the simulator asks both kinds the same questions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from daemon.errors import MoedError
from profiler.costmodel import CostModel, Sample, UnknownOp
from profiler.shapes import ModelShape

MACHINES_DIR = Path(__file__).resolve().parent / "machines"
TOKEN_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CONTEXT_GRID = (0, 256, 1024, 4096, 16384, 65536, 131072)
BYTES_GRID = tuple(4096 << i for i in range(0, 19, 2))  # 4 KiB .. 1 GiB
HEAD_BITS = 8  # the output projection's precision for its estimate (moed's dense weights with --dense-bits 8)
DEFAULT_SHARE = 0.8  # share of a tier's memory given to experts when no budget is named


@dataclass(frozen=True, slots=True)
class Machine:
    """A machine the simulator can run on: memory sizes and a way to time every op."""

    name: str
    description: str
    kind: str  # "measured" or "spec-sheet"
    has_gpu: bool
    unified: bool
    vram_bytes: int
    ram_bytes: int
    sources: tuple[str, ...] = ()
    cost: CostModel | None = None  # measured profiles
    spec: dict = field(default_factory=dict)  # spec-sheet parameters

    def times(self, shape: ModelShape, bits: int) -> "CostTimes":
        """Op times for a model of `shape` with experts held at `bits`."""
        if self.kind == "measured":
            return CostTimes(self.cost, shape, bits, self.has_gpu, self.unified)
        return CostTimes(roofline_costmodel(self.spec, shape, bits), shape, bits, self.has_gpu, self.unified)

    def default_budgets(self) -> tuple[int, int]:
        """(vram, ram) expert budgets when none are named: a share of each tier's memory."""
        if self.unified:
            return int(self.ram_bytes * DEFAULT_SHARE), 0
        return (int(self.vram_bytes * DEFAULT_SHARE) if self.has_gpu else 0), int(self.ram_bytes * DEFAULT_SHARE)


class CostTimes:
    """The simulator's op times from a CostModel, scaled from the probed shapes to the model's."""

    def __init__(self, cost: CostModel, shape: ModelShape, bits: int, has_gpu: bool, unified: bool) -> None:
        self.cost, self.shape, self.bits = cost, shape, bits
        self.has_gpu, self.unified = has_gpu, unified
        self.main = "gpu" if has_gpu else "cpu"
        self._memo: dict[tuple, float] = {}
        self.notes: list[str] = []
        for dev in (("cuda", "cpu") if has_gpu else ("cpu",)):
            op = cost.ffn_op(dev, bits)
            if int(op.split(":")[2]) != bits:
                self.notes.append(f"{dev} experts at {bits} bits timed with {op} (no {bits}-bit kernel probed)")
        if shape.vocab and self._head_op() not in cost.curves:
            self.notes.append("a step's head (embedding, final norm, lm_head) estimated from the CPU experts' "
                              f"kernel's time per weight at {HEAD_BITS} bits until the engine times it")

    @staticmethod
    def _dev(device: str) -> str:
        return "cuda" if device == "gpu" else "cpu"

    def _ffn(self, device: str, tokens: int, params: int, bits: int) -> float:
        key = ("ffn", device, tokens, params, bits)
        if key not in self._memo:
            op = self.cost.ffn_op(self._dev(device), bits, tokens=tokens)
            self._memo[key] = self.cost.predict(op, tokens) * params / self._probed_params(op, params)
        return self._memo[key]

    def _probed_params(self, op: str, params: int) -> int:
        """Weights of the expert FFN op's timings were probed on (`params` when the fit does not say)."""
        meta = self.cost.curve(op).meta
        return 3 * meta["hidden"] * meta["inter"] if meta.get("hidden") else params

    def expert(self, device: str, tokens: int) -> float:
        """Seconds for one routed expert over `tokens` tokens on 'gpu' or 'cpu'."""
        return self._ffn(device, tokens, self.shape.expert_params, self.bits)

    def observe(self, kind: str, x: float, seconds: float) -> bool:
        """Refine the cost model with a timing the engine measured on this model; False if no op answers.

        kind: "expert" (x = tokens; seconds of one routed expert on the CPU at these bits), "attn" (x =
        positions attended; seconds of one decode token's layer but its routed experts, on the main device),
        "head" (x = positions given logits; seconds of a decode step outside its layers), "read" (x = bytes
        read from flash) or "form" (x = bytes of stored planes made into a compute form).
        """
        try:
            if kind == "expert":
                op = self.cost.ffn_op("cpu", self.bits, tokens=x)
                params = self.shape.expert_params
                self.cost.observe(op, x, seconds * self._probed_params(op, params) / params)  # at the probed shape
            elif kind == "attn":  # x = positions attended after the step; one token's layer
                op = self._attn_ops()[0]
                self.cost.observe(op, x, seconds * self._attn_ref() / self.shape.attn_params)
            elif kind == "head":  # x = positions given logits
                if not self.shape.vocab:
                    return False
                meta = self._head_meta()
                self.cost.learn(self._head_op(), x, seconds * meta["hidden"] * meta["vocab"] / self.shape.head_params,
                                meta)
            elif kind == "read":
                self.cost.observe("flash:read", x, seconds)
            elif kind == "form":
                ops = [op for op in self.cost.ops() if op.startswith("unpack:cpu:")]
                if not ops:
                    return False
                self.cost.observe(min(ops, key=lambda o: abs(int(o.split(":")[2]) - self.bits)), x, seconds)
            else:
                return False
        except KeyError:  # UnknownOp: the profile has no such op
            return False
        self._memo.clear()
        return True

    def shared(self, tokens: int) -> float:
        """Seconds for the shared expert(s) on the main device (0 if the model has none)."""
        if not self.shape.shared_inter:
            return 0.0
        return self._ffn(self.main, tokens, 3 * self.shape.hidden * self.shape.shared_inter, 16)

    def dense_mlp(self, tokens: int) -> float:
        """Seconds for the MLP of a layer that is not MoE, on the main device."""
        if not self.shape.dense_inter:
            return 0.0
        return self._ffn(self.main, tokens, 3 * self.shape.hidden * self.shape.dense_inter, 16)

    def _attn_ops(self) -> list[str]:
        """The main device's attention ops, smallest batch first."""
        dev = self._dev(self.main)
        ops = sorted((op for op in self.cost.ops() if op.startswith(f"attn:{dev}:b")),
                     key=lambda o: int(o.rsplit(":b", 1)[1]))
        if not ops:
            raise UnknownOp(f"the machine profile has no attention timings for {dev}")
        return ops

    def _attn_ref(self) -> int:
        """Projection weights of the attention layer the main device's attention ops were probed on."""
        meta = self.cost.curve(self._attn_ops()[0]).meta
        return meta["hidden"] * meta["head_dim"] * (2 * meta["heads"] + 2 * meta["kv_heads"]) \
            if meta.get("hidden") else self.shape.attn_params

    def _head_op(self) -> str:
        return f"head:{self._dev(self.main)}"

    def _head_meta(self) -> dict:
        """The shape the head op's timings are at: its curve's, or this model's before it has one."""
        op = self._head_op()
        return self.cost.curve(op).meta if op in self.cost.curves else \
            {"hidden": self.shape.hidden, "vocab": self.shape.vocab}

    def attention(self, tokens: int, context: int) -> float:
        """Seconds for one attention layer (and router) for `tokens` new tokens over `context` positions."""
        key = ("attn", tokens, context)
        if key not in self._memo:
            t = self.cost.attention(self._dev(self.main), tokens, context + tokens)
            self._memo[key] = t * self.shape.attn_params / self._attn_ref()
        return self._memo[key]

    def head(self, tokens: int) -> float:
        """Seconds for a step's head on the main device, its work outside the layers (embedding, final norm,
        the output projection) for `tokens` positions (0 when the shape has no vocabulary size); until the
        engine has timed it, the output projection's weights at the expert kernel's time per weight at
        HEAD_BITS (a matrix-vector product a position, as an expert's; attention's time per weight, with its
        smaller matrices and per-call work, gave 28 ms for the 3.9 ms the engine timed on bench/offload_cpu.py's
        model)."""
        if not self.shape.vocab:
            return 0.0
        key = ("head", tokens)
        if key not in self._memo:
            op, meta = self._head_op(), self._head_meta()
            if op in self.cost.curves:
                t = self.cost.predict(op, tokens) * self.shape.head_params / (meta["hidden"] * meta["vocab"])
            else:
                t = self._ffn(self.main, tokens, self.shape.head_params, HEAD_BITS)
            self._memo[key] = t
        return self._memo[key]

    def h2d(self, nbytes: int) -> float:
        """Seconds to copy nbytes into GPU memory (0 on unified memory)."""
        if self.unified or not self.has_gpu:
            return 0.0
        key = ("h2d", nbytes)
        if key not in self._memo:
            self._memo[key] = self.cost.h2d(nbytes)
        return self._memo[key]

    def read(self, nbytes: int) -> float:
        """Seconds to read nbytes from flash, page cache bypassed."""
        key = ("read", nbytes)
        if key not in self._memo:
            self._memo[key] = self.cost.flash_read(nbytes)
        return self._memo[key]


def _roof(dev: dict, nbytes: float, flops: float) -> float:
    bw = dev["bandwidth_Bps"] * dev.get("bandwidth_efficiency", 1.0)
    fl = dev["flops"] * dev.get("flops_efficiency", 1.0)
    return dev.get("launch_s", 0.0) + max(nbytes / bw, flops / fl)


def roofline_costmodel(spec: dict, shape: ModelShape, bits: int) -> CostModel:
    """A CostModel sampled from a spec sheet's roofline at the model's shapes."""
    samples: list[Sample] = []
    meta: dict[str, dict] = {}
    p = shape.expert_params
    devices = [("cpu", spec["cpu"])] + ([("cuda", spec["gpu"])] if spec.get("gpu") else [])
    for name, dev in devices:
        for b in sorted({bits, 16}):
            op = f"ffn:{name}:{b}:roofline"
            nbytes = shape.expert_bytes(b)
            samples += [Sample(op, t, _roof(dev, nbytes, 2.0 * p * t)) for t in TOKEN_GRID]
            meta[op] = {"hidden": shape.hidden, "inter": shape.moe_inter}
    main_name, main = devices[-1]
    kv_row = 2 * shape.kv_heads * shape.head_dim * 2  # fp16 keys and values per position
    for b in TOKEN_GRID:
        op = f"attn:{main_name}:b{b}"
        meta[op] = {"hidden": shape.hidden, "heads": shape.heads, "kv_heads": shape.kv_heads,
                    "head_dim": shape.head_dim}
        for c in CONTEXT_GRID:
            nbytes = 2 * shape.attn_params + c * kv_row
            flops = 2.0 * shape.attn_params * b + 4.0 * b * c * shape.heads * shape.head_dim
            samples.append(Sample(op, c, _roof(main, nbytes, flops)))
    if shape.vocab:  # fp16 output projection, logits for `b` positions
        meta[f"head:{main_name}"] = {"hidden": shape.hidden, "vocab": shape.vocab}
        samples += [Sample(f"head:{main_name}", b, _roof(main, 2 * shape.head_params, 2.0 * shape.head_params * b))
                    for b in TOKEN_GRID]
    links = [("flash:read", spec["flash"])] + ([("h2d:cuda:pinned", spec["pcie"])] if spec.get("pcie") else [])
    for op, link in links:
        samples += [Sample(op, n, link.get("latency_s", 0.0) + n / link["bandwidth_Bps"]) for n in BYTES_GRID]
    return CostModel.fit(samples, meta)


def _spec_machine(d: dict, path: Path) -> Machine:
    for key in ("name", "cpu", "flash", "ram_bytes"):
        if key not in d:
            raise MoedError(f"machine parameter file lacks {key!r}", path)
    gpu = d.get("gpu")
    if gpu and not d.get("unified") and not d.get("pcie"):
        raise MoedError("a machine with a discrete GPU needs 'pcie' parameters", path)
    return Machine(d["name"], d.get("description", ""), "spec-sheet", bool(gpu), bool(d.get("unified")),
                   int(gpu["memory_bytes"]) if gpu else 0, int(d["ram_bytes"]), tuple(d.get("sources", ())),
                   None, d)


def _measured_machine(d: dict, path: Path) -> Machine:
    cost = CostModel.from_dict(d["costmodel"])
    facts = d.get("facts", {})
    gpus = facts.get("gpus", [])
    has_gpu = any(op.startswith("ffn:cuda:") for op in cost.ops())
    cpu = facts.get("cpu", {}).get("model", "?")
    desc = f"measured on {facts.get('hostname', 'this machine')}: {cpu}, " \
           f"{facts.get('ram_total_bytes', 0) / 2**30:.1f} GiB RAM" + \
           (f", {gpus[0].get('name')}" if has_gpu and gpus else ", no GPU")
    return Machine(d.get("name") or "this-machine", desc, "measured", has_gpu, False,
                   int(gpus[0].get("memory_total_bytes", 0)) if has_gpu and gpus else 0,
                   int(facts.get("ram_total_bytes", 0)), ("measured by `moed profile`",), cost, {})


def machine_names() -> list[str]:
    """Names of the parameter files shipped under profiler/machines/."""
    return sorted(p.stem for p in MACHINES_DIR.glob("*.json"))


def load_machine(spec: str | os.PathLike) -> Machine:
    """A machine by shipped name, by path to a parameter file or profile, or 'this' (the stored profile)."""
    s = str(spec)
    if s == "this":
        from profiler.profile import default_profile_path
        path = default_profile_path()
        if not path.exists():
            raise MoedError("no stored profile of this machine; run `moed profile` first", path)
    elif (MACHINES_DIR / f"{s}.json").exists():
        path = MACHINES_DIR / f"{s}.json"
    else:
        path = Path(s)
        if not path.exists():
            raise MoedError(f"no such machine profile (shipped: {', '.join(machine_names())}, or 'this')", path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoedError(f"cannot read machine profile: {e}", path) from None
    fmt = d.get("format")
    try:
        if fmt == "moed-machine":
            return _spec_machine(d, path)
        if fmt == "moed-profile":
            return _measured_machine(d, path)
    except (KeyError, TypeError, ValueError) as e:
        raise MoedError(f"bad machine profile: {e}", path) from None
    raise MoedError(f"not a machine profile (format={fmt!r})", path)
