"""Timing probes (torch): expert FFN vs tokens, attention vs batch and context, host-to-device copies, unpacking.

Every probe returns cost-model Samples (profiler.costmodel names the ops and units) plus the
shape facts of its op. Expert FFNs rotate over several experts so that weights come from
memory, not from the CPU's caches, as they do when decoding. The kernels probed come from
quant's registry when it is importable (`quant_ffn_runners`, the one place that knows it);
otherwise only the fp32 torch path the runtime uses today (StackedExperts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from profiler.costmodel import Sample
from profiler.shapes import ModelShape

Runner = Callable[[torch.Tensor, int], torch.Tensor]  # (x [T, D], expert index) -> [T, D]


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """Sizes and repeats of one profiling run."""

    tokens: tuple[int, ...]
    ffn_bits: tuple[int, ...]  # bit-widths for quant backends
    rotate: int  # experts cycled through
    attn_batches: tuple[int, ...]
    attn_contexts: tuple[int, ...]
    copy_sizes: tuple[int, ...]
    flash_sizes: tuple[int, ...]
    flash_file_bytes: int
    unpack_bits: tuple[int, ...]
    unpack_rows: tuple[int, ...]
    repeats: int
    min_time: float  # seconds of timed calls wanted per point (more repeats for fast ops)
    max_time: float  # seconds after which a slow point stops repeating

    def timing(self) -> dict:
        """Keyword arguments of time_call for this plan."""
        return {"repeats": self.repeats, "min_time": self.min_time, "max_time": self.max_time}


QUICK = ProbePlan(tokens=(1, 4, 16, 64, 256), ffn_bits=(8, 4), rotate=3, attn_batches=(1, 4),
                  attn_contexts=(256, 2048), copy_sizes=tuple(1 << i for i in range(16, 27, 2)),
                  flash_sizes=(4096, 65536, 1 << 20, 8 << 20), flash_file_bytes=64 << 20, unpack_bits=(8, 4),
                  unpack_rows=(128, 512), repeats=3, min_time=0.01, max_time=0.25)
FULL = ProbePlan(tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), ffn_bits=(8, 6, 4, 3, 2), rotate=4,
                 attn_batches=(1, 2, 4, 8), attn_contexts=(128, 512, 2048, 8192),
                 copy_sizes=tuple(1 << i for i in range(12, 29, 2)),
                 flash_sizes=(4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20),
                 flash_file_bytes=256 << 20, unpack_bits=(8, 6, 4, 3, 2), unpack_rows=(64, 256, 768, 1536),
                 repeats=5, min_time=0.05, max_time=0.8)


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_call(fn: Callable[[int], object], repeats: int, device: str = "cpu", min_time: float = 0.0,
              max_time: float = float("inf"), warmup: bool = True, min_calls: int = 2) -> list[float]:
    """Seconds of calls fn(i), after one warm-up call unless told not to (device work waited for).

    At least `repeats` calls and on until they add up to `min_time` (at most 4x repeats); fewer
    (but at least `min_calls`) once they add up to `max_time`.
    """
    sync = _sync(device)
    if warmup:
        fn(0)
        sync()
    out: list[float] = []
    while len(out) < 4 * repeats:
        t0 = time.perf_counter()
        fn(len(out) + 1)
        sync()
        out.append(time.perf_counter() - t0)
        total = sum(out)
        if (len(out) >= repeats and total >= min_time) or (len(out) >= min_calls and total >= max_time):
            break
    return out


PASSES = 3  # sweeps over a probe's sizes: a burst of other work spoils one sweep, not every sample of a size


def sweep(points: list[tuple[str, float, Callable[[int], object]]], plan: ProbePlan,
          device: str = "cpu") -> list[Sample]:
    """Samples of every (op, x, fn) point, taken in PASSES interleaved sweeps over the points."""
    per = max(1, -(-plan.repeats // PASSES))
    out: list[Sample] = []
    with torch.inference_mode():
        for n in range(PASSES):
            for op, x, fn in points:
                out += [Sample(op, x, s) for s in time_call(fn, per, device, plan.min_time / PASSES,
                                                            plan.max_time / PASSES, warmup=n == 0, min_calls=1)]
    return out


def random_experts(shape: ModelShape, n: int, device: str = "cpu", seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """n random experts (gate [I, D], up [I, D], down [D, I]) in fp32."""
    g = torch.Generator().manual_seed(seed)
    d, i = shape.hidden, shape.moe_inter
    return [tuple((torch.randn(*s, generator=g) * s[1] ** -0.5).to(device) for s in ((i, d), (i, d), (d, i)))
            for _ in range(n)]


def torch_ffn_runner(experts: list[tuple[torch.Tensor, ...]], act: str = "silu") -> Runner:
    """The runtime's fp32 path: StackedExperts with every token routed to one expert."""
    from daemon.models.moe import ExpertWeights, Routing, StackedExperts

    stack = StackedExperts(ExpertWeights(*(torch.stack(m) for m in zip(*experts))), act)
    n = len(experts)

    def run(x: torch.Tensor, e: int) -> torch.Tensor:
        t = x.shape[0]
        idx = torch.full((t, 1), e % n, dtype=torch.long, device=x.device)
        return stack(x, Routing(idx, torch.ones(t, 1, dtype=x.dtype, device=x.device),
                                torch.zeros(t, n, device=x.device)))

    return run


def quant_ffn_runners(experts: list[tuple[torch.Tensor, ...]], device: str, bits: tuple[int, ...],
                      act: str = "silu", together: int = 1) -> tuple[list[tuple[str, Runner]], list[str], set[str]]:
    """(op, runner) per quant backend available on `device` and bit-width; notes on what was skipped; the ops
    whose one-token runner runs `together` experts.

    together > 1: a backend with threads of its own (Backend.threads_inside) runs one token through `together`
    experts in one call split over its threads (ffn_many(parallel=True)), as the tiered engine runs a decode
    layer's resident experts; its one-token runner returns those outputs stacked (time it, then divide by
    `together`: the time an expert adds to such a layer). Other token counts run one expert a call."""
    try:
        from quant.groups import quantize
        from quant.kernels import available_backends, get_backend
        from quant.views import ExpertViews, msb_view
    except ImportError as e:
        return [], [f"quant kernels not importable ({e}); only the fp32 torch path was probed"], set()
    out: list[tuple[str, Runner]] = []
    notes: list[str] = []
    batched: set[str] = set()
    codes = [[quantize(m.float().cpu(), 8) for m in ex] for ex in experts]
    for name in available_backends():
        be = get_backend(name)
        if be.device != device:
            continue
        for b in bits:
            try:
                prepared = [be.prepare_expert(ExpertViews(*(msb_view(c.codes, c.scale, c.minimum, b, c.group)
                                                            for c in cs)), act) for cs in codes]
            except Exception as e:  # a backend that cannot hold this bit-width
                notes.append(f"{name} at {b} bits skipped: {type(e).__name__}: {e}")
                continue
            op = f"ffn:{device}:{b}:{name}"
            many = together > 1 and be.threads_inside
            if many:
                batched.add(op)

            def run(x, i, be=be, p=prepared, many=many):
                if many and x.shape[0] == 1:
                    return torch.stack(be.ffn_many(x, [p[(i + j) % len(p)] for j in range(together)], parallel=True))
                return be.ffn(x, p[i % len(p)])
            out.append((op, run))
    return out, notes, batched


def probe_ffn(shape: ModelShape, plan: ProbePlan, device: str = "cpu") -> tuple[list[Sample], dict, list[str]]:
    """Expert FFN time vs tokens for the fp32 torch path and every quant backend and bit-width."""
    together = shape.top_k if device == "cpu" else 1
    experts = random_experts(shape, max(plan.rotate, together), device)  # one call's experts all different
    runners: list[tuple[str, Runner]] = [(f"ffn:{device}:32:torch", torch_ffn_runner(experts))]
    more, notes, batched = quant_ffn_runners(experts, device, plan.ffn_bits, together=together)
    runners += more
    g = torch.Generator().manual_seed(1)
    xs = {t: torch.randn(t, shape.hidden, generator=g).to(device) for t in plan.tokens}
    meta = {op: {"hidden": shape.hidden, "inter": shape.moe_inter} for op, _ in runners}
    points = [(op, t, lambda i, run=run, x=xs[t]: run(x, i)) for op, run in runners for t in plan.tokens]
    if batched:
        notes.append(f"one token: {shape.top_k} experts a call, split over the backend's threads, as the engine runs "
                     f"a decode layer's resident experts, per expert ({', '.join(sorted(batched))})")
    return [Sample(x.op, x.x, x.seconds / shape.top_k) if x.op in batched and x.x == 1 else x
            for x in sweep(points, plan, device)], meta, notes


def probe_attention(shape: ModelShape, plan: ProbePlan, device: str = "cpu") -> tuple[list[Sample], dict]:
    """Decode attention layer time (projections, attention over the cache, output) vs batch and context."""
    g = torch.Generator().manual_seed(2)
    d, h, kv, hd = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim

    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=g) * k ** -0.5).to(device)

    wq, wk, wv, wo = w(h * hd, d), w(kv * hd, d), w(kv * hd, d), w(d, h * hd)
    def make_step(b: int, c: int) -> Callable[[int], torch.Tensor]:
        kc = torch.randn(b, kv, c, hd, generator=g).to(device)
        vc = torch.randn(b, kv, c, hd, generator=g).to(device)
        x = torch.randn(b, 1, d, generator=g).to(device)

        def step(_: int) -> torch.Tensor:
            q = F.linear(x, wq).view(b, 1, h, hd).transpose(1, 2)
            k = F.linear(x, wk).view(b, 1, kv, hd).transpose(1, 2)
            v = F.linear(x, wv).view(b, 1, kv, hd).transpose(1, 2)
            kk, vv = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
            o = F.scaled_dot_product_attention(q, kk, vv, enable_gqa=h != kv)
            return F.linear(o.transpose(1, 2).reshape(b, 1, h * hd), wo)

        return step

    meta = {f"attn:{device}:b{b}": {"hidden": d, "heads": h, "kv_heads": kv, "head_dim": hd}
            for b in plan.attn_batches}
    points = [(f"attn:{device}:b{b}", c + 1, make_step(b, c)) for b in plan.attn_batches for c in plan.attn_contexts]
    return sweep(points, plan, device), meta


def probe_h2d(plan: ProbePlan) -> tuple[list[Sample], list[str]]:
    """Host-to-device copy time vs size, pinned and pageable; nothing without CUDA."""
    if not torch.cuda.is_available():
        return [], ["no CUDA device: host-to-device copies not probed"]
    samples = []
    for pinned in (True, False):
        op = f"h2d:cuda:{'pinned' if pinned else 'pageable'}"
        for n in plan.copy_sizes:
            src = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
            dst = torch.empty(n, dtype=torch.uint8, device="cuda")

            def copy(i: int, src=src, dst=dst, pinned=pinned):
                return dst.copy_(src, non_blocking=pinned)

            samples += [Sample(op, n, s) for s in time_call(copy, device="cuda", **plan.timing())]
    return samples, []


def _reference_unpack(planes: torch.Tensor, rows: int, cols: int, scale: torch.Tensor, minimum: torch.Tensor,
                      group: int) -> torch.Tensor:
    """Top-r MSB-first bit-planes [r, rows*cols/8] -> float32 weights, dequantised to bucket middles."""
    r = planes.shape[0]
    bits = torch.stack([(planes >> s) & 1 for s in range(7, -1, -1)], dim=-1).reshape(r, -1)  # [r, numel]
    q = torch.zeros(bits.shape[1], dtype=torch.int32)
    for i in range(r):
        q |= bits[i].int() << (r - 1 - i)
    drop = 8 - r
    q = q.reshape(rows, cols // group, group).float()
    s = scale[..., None] * (1 << drop)
    return (q * s + minimum[..., None] + scale[..., None] * (((1 << drop) - 1) / 2)).reshape(rows, cols)


def probe_unpack(shape: ModelShape, plan: ProbePlan, device: str = "cpu") -> tuple[list[Sample], dict, list[str]]:
    """Time to turn the top r stored bit-planes of a matrix into compute form, vs bytes of planes."""
    g = torch.Generator().manual_seed(3)
    d, group = shape.hidden, 128
    meta, notes = {}, []
    try:
        from quant.kernels import fast_cpu_backend, get_backend
        from quant.planes import unpack_planes
        from quant.views import msb_view
        name = fast_cpu_backend()  # the form the engine makes of what it reads
        be = get_backend(name)

        def convert(planes, rows, scale, minimum):
            codes = unpack_planes(planes, (rows, d))
            return be.prepare(msb_view(None, scale, minimum, planes.shape[0], group, codes_r=codes))
    except ImportError:
        name = "reference-fallback"
        notes.append("quant not importable: unpack timed with the profiler's reference unpacker")

        def convert(planes, rows, scale, minimum):
            return _reference_unpack(planes, rows, d, scale, minimum, group)

    points = []
    for r in plan.unpack_bits:
        op = f"unpack:{device}:{r}"
        meta[op] = {"backend": name, "group": group}
        for rows in plan.unpack_rows:
            planes = torch.randint(0, 256, (r, rows * d // 8), dtype=torch.uint8, generator=g)
            scale = torch.rand(rows, d // group, generator=g) * 0.01
            minimum = -torch.rand(rows, d // group, generator=g)

            def fn(i: int, planes=planes, rows=rows, scale=scale, minimum=minimum):
                return convert(planes, rows, scale, minimum)

            try:
                fn(0)
            except Exception as e:
                notes.append(f"unpack at {r} bits with {name} failed: {type(e).__name__}: {e}")
                break
            points.append((op, planes.numel() + 4 * scale.numel(), fn))
    return sweep(points, plan, device), meta, notes
