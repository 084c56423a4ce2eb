"""Intra-layer scheduler: where each routed expert of one MoE layer runs, and in what order. No torch.

Timing model, shared by `schedule`, `optimal_plan` and `simulate` (seconds from the moment the
layer's routing is known). Four resources work at once, each doing one op after another in the
order the plan gives: `flash` (one I/O queue: reads of missing bit-planes into RAM), `copy` (one
host-to-device stream: copies of missing planes into VRAM), `gpu` (one compute stream) and `cpu`
(the CPU worker pool, taken as one serial resource: each expert uses all threads). An expert runs
on the GPU once VRAM holds it at the requested bits: at once, or after a copy of the planes VRAM
lacks, which waits for a flash read of those RAM lacks. It runs on the CPU once RAM holds it, at
once or after a read. Flash holds every expert at 8 bits; at b bits an expert is nbytes(b) =
ceil(b * plane_bytes / 8) + overhead_bytes (scales and minimums, moved with the first planes),
and raising it from r to b bits moves nbytes(b) - nbytes(r), the missing planes only. On unified
memory VRAM and RAM are one pool and nothing is copied. `free_at` says when each resource frees
from earlier work (the shared expert on the GPU, prefetches on the links). A plan's finish time
is when both compute resources are done. Not modelled: an expert starting on its low planes while
higher ones are on their way, two experts sharing the CPU's threads, prefetches still in flight.

`schedule` starts from HybriMoE's rules (experts resident in VRAM on the GPU; of the rest the
heaviest to the GPU or the lightest to the CPU, whichever would finish its next one earlier). A
split's orders follow rules: each device runs its resident experts first (earliest-ready-first is
optimal on one machine); the CPU's reads go in Johnson's order of (read, CPU time), optimal for one
flash queue feeding one CPU and, with reads of equal size, hottest first; the GPU's in Johnson's
order of (read + copy, copy + GPU time); the two are merged by the work waiting behind each; copies
of experts held in RAM follow Johnson's order of (copy, GPU time), merged with the others by the
best of four rules. Each split has a bound no order of it beats (the work of each resource, and the
reads and copies each followed by the shortest op that must come after them). Where the splits are
few enough to weigh them all (experts with the same op times are one class, so decode, with many
alike, has a few dozen), a branch and bound finds a split of least bound, which no plan beats; it
is skipped when HybriMoE's split meets cheap bounds on every split (the reads no device avoids, the
best split of the GPU's and the CPU's work). When the rules' orders meet that bound (in the decode
benchmark, always), the plan is optimal and nothing more is tried. Otherwise (or with more experts)
a branch and bound over splits, cut by their bounds, keeps the best few with the best of the rules'
orders, and those whose GPU experts need reads then have their read and copy orders improved one
move at a time. Without a GPU the plan is Johnson's order, which is optimal.

`optimal_plan` finds the true minimum of the same model for up to MAX_EXACT experts by dynamic
programming over the set of experts placed so far, keeping the Pareto-best (flash, copy, gpu,
cpu) free times of each set. It searches schedules of a canonical form, which loses nothing since
any schedule can be made canonical without finishing later: each device runs its resident experts
first and the others in the order they become ready; flash never idles; copies of experts read
from flash go in their read order (if j is read before k but copied after it, reading j right
after k delays nothing). Within that form it tries every split and every interleaving of reads
and copies; Johnson's rule is not assumed anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from profiler.shapes import ModelShape
    from profiler.simulator import OpTimes

TIERS = ("vram", "ram", "flash")
RESOURCES = ("flash", "copy", "gpu", "cpu")
MAX_BITS = 8
MAX_EXACT = 8  # optimal_plan's limit on demanded experts
TOLERANCE = 0.005  # the split search stops once within this share of a lower bound
POLISH_PASSES = 4  # rounds of single-op moves in the read and copy orders
SEARCH_WORK = 2048  # the split search's budget of options weighed (for 8 experts; less for more)
SEARCH_LEAVES = 16384  # and of splits evaluated times experts squared (every split of 8 experts)
POLISH_OPS = 16  # reads and copies beyond which orders are left to the rules
KEEP = 3  # splits the search hands to order polishing
EXACT_SPLITS = 512  # splits (product of class sizes + 1) up to which the search weighs them all
MEMO = 1 << 16  # op-time rows a LayerCosts keeps before starting afresh
_EPS = 1e-12  # relative: an improvement smaller than this is rounding


def _held_key(n: int, b: int, v: int, r: int, unified: bool) -> tuple[int, int, int, int]:
    """(n, b, v, r) with bits held beyond b counted as b, and on unified memory VRAM's and RAM's as one:
    the same op times and moves, and one key."""
    if v > b:
        v = b
    if r > b:
        r = b
    return (n, b, 0, v if v > r else r) if unified else (n, b, v, r)


@dataclass(frozen=True, slots=True)
class LayerCosts:
    """The op times a layer's schedule depends on, in seconds, and the size of one expert.

    Answers are memoised per (tokens, bits, bits held in VRAM, bits held in RAM); call clear()
    when the underlying cost model has been refined.
    """

    cpu: Callable[[int, int], float]  # (tokens, bits) -> one expert on the CPU
    gpu: Callable[[int, int], float] | None  # (tokens, bits) -> one expert on the GPU; None: no GPU
    h2d: Callable[[int], float]  # nbytes RAM -> VRAM
    read: Callable[[int], float]  # nbytes flash -> RAM
    plane_bytes: int  # bytes of the 8 bit-planes of one expert
    overhead_bytes: int = 0  # scales and minimums, moved with an expert's first planes
    unified: bool = False  # one memory for GPU and CPU: nothing is copied
    sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)  # nbytes(b) for b = 0..8
    memo: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.plane_bytes < 0 or self.overhead_bytes < 0:
            raise ValueError(f"expert sizes must be >= 0 (plane_bytes={self.plane_bytes}, "
                             f"overhead_bytes={self.overhead_bytes})")
        sizes = (0,) + tuple((b * self.plane_bytes + 7) // 8 + self.overhead_bytes for b in range(1, MAX_BITS + 1))
        object.__setattr__(self, "sizes", sizes)

    @property
    def has_gpu(self) -> bool:
        """Whether there is a GPU."""
        return self.gpu is not None

    def nbytes(self, bits: int) -> int:
        """Bytes of one expert held at `bits` (0 bits: nothing)."""
        return self.sizes[bits]

    def clear(self) -> None:
        """Forget memoised op times (after the cost model changed)."""
        self.memo.clear()

    def row(self, n: int, b: int, v: int, r: int) -> tuple:
        """(pc, rc, nrc, pg, rg, cg, nrg, ncg) of an expert over n tokens at b bits, held at v bits in
        VRAM and r in RAM: compute, read and copy seconds and the bytes moved, for each device."""
        key = _held_key(n, b, v, r, self.unified)
        row = self.memo.get(key)
        if row is not None:
            return row
        n, b, v, r = key
        sizes, read, nb = self.sizes, self.read, self.sizes[b]
        if self.unified:  # one pool: whatever either tier holds serves both devices
            have = v if v > r else r
            xc = x = nb - sizes[have] if have < b else 0
            y = 0
        else:
            xc = nb - sizes[r] if r < b else 0
            y = nb - sizes[v] if v < b else 0
            x = 0 if r >= b or not y else nb - sizes[v if v > r else r]
        row = (self.cpu(n, b), read(xc) if xc else 0.0, xc)
        if self.gpu is None:
            row += (0.0, 0.0, 0.0, 0, 0)
        else:
            row += (self.gpu(n, b), read(x) if x else 0.0, self.h2d(y) if y else 0.0, x, y)
        if len(self.memo) >= MEMO:
            self.memo.clear()
        self.memo[key] = row
        return row

    @classmethod
    def linear(cls, cpu: tuple[float, float], gpu: tuple[float, float] | None, h2d: tuple[float, float],
               read: tuple[float, float], plane_bytes: int, overhead_bytes: int = 0, unified: bool = False,
               bits_scale: bool = False) -> LayerCosts:
        """Op times a + b * size (tokens, bytes); with bits_scale, compute times scale with bits / 8."""
        def compute(ab: tuple[float, float]) -> Callable[[int, int], float]:
            a, b = ab
            return (lambda n, bits: (a + b * n) * bits / 8) if bits_scale else (lambda n, bits: a + b * n)

        def link(ab: tuple[float, float]) -> Callable[[int], float]:
            a, b = ab
            return lambda nbytes: a + b * nbytes

        return cls(compute(cpu), None if gpu is None else compute(gpu), link(h2d), link(read), plane_bytes,
                   overhead_bytes, unified)

    @classmethod
    def from_op_times(cls, times: Mapping[int, OpTimes], shape: ModelShape) -> LayerCosts:
        """Costs from the simulator's op times at each bit-width held (the nearest answers for the others)."""
        if not times:
            raise ValueError("from_op_times needs op times at one bit-width at least")
        held = sorted(times)
        near = {b: times[min(held, key=lambda h: (abs(h - b), -h))] for b in range(1, MAX_BITS + 1)}
        some = times[held[0]]
        planes = shape.expert_params  # one byte per weight at 8 bits
        return cls(lambda n, b: near[b].expert("cpu", n), (lambda n, b: near[b].expert("gpu", n)) if some.has_gpu
                   else None, some.h2d, some.read, planes, shape.expert_bytes(8) - planes, some.unified)


class Task(NamedTuple):
    """One demanded expert in a plan: where it runs, at which bits, and what it moves first."""

    expert: int
    device: str  # "gpu" or "cpu"
    bits: int
    tokens: int
    read_bytes: int  # flash -> RAM before it can run (0: none)
    copy_bytes: int  # then RAM -> VRAM (GPU only; 0: none)

    @property
    def transfers(self) -> tuple[tuple[str, int], ...]:
        """The moves this expert waits for, in order: ("read", nbytes), ("copy", nbytes)."""
        return tuple((kind, nb) for kind, nb in (("read", self.read_bytes), ("copy", self.copy_bytes)) if nb)


@dataclass(frozen=True, slots=True)
class Plan:
    """A layer's schedule: every demanded expert's task and the order of each resource's queue."""

    tasks: dict[int, Task]  # expert -> task
    gpu: tuple[int, ...]  # GPU compute order
    cpu: tuple[int, ...]  # CPU compute order
    copies: tuple[int, ...]  # host-to-device copy stream order
    reads: tuple[int, ...]  # flash queue order
    finish_time: float  # predicted seconds until both compute resources are done
    busy: dict[str, float]  # resource -> seconds of work it was given
    ends: dict[str, float]  # resource -> when its last op ends (when it was free, if it got none)


class _Jobs(NamedTuple):
    """A layer's demanded experts, validated, with every op time looked up once (index = position)."""

    ids: list[int]
    tokens: tuple[int, ...]
    bits: tuple[int, ...]
    pc: tuple[float, ...]  # CPU compute
    rc: tuple[float, ...]  # flash read before the CPU (0.0: none)
    nrc: tuple[int, ...]  # its bytes
    pg: tuple[float, ...]  # GPU compute (0.0 without a GPU)
    rg: tuple[float, ...]  # flash read before the GPU
    cg: tuple[float, ...]  # copy before the GPU
    nrg: tuple[int, ...]
    ncg: tuple[int, ...]
    free: tuple[float, float, float, float]  # flash, copy, gpu, cpu
    has_gpu: bool
    rows: list[tuple]  # each expert's row of op times, as LayerCosts.row gives it (one object per key)


def _free_at(free_at: Mapping[str, float] | None) -> tuple[float, float, float, float]:
    if not free_at:
        return 0.0, 0.0, 0.0, 0.0
    for k, v in free_at.items():
        if k not in RESOURCES:
            raise ValueError(f"free_at names unknown resource {k!r} (known: {', '.join(RESOURCES)})")
        if not (isinstance(v, (int, float)) and 0.0 <= v < float("inf")):
            raise ValueError(f"free_at[{k!r}] must be finite seconds >= 0, got {v!r}")
    return tuple(float(free_at.get(r, 0.0)) for r in RESOURCES)  # type: ignore[return-value]


def _prepare(demand: Mapping[int, int], residency: Mapping[int, Mapping[str, int]], bits: int | Mapping[int, int],
             costs: LayerCosts, free_at: Mapping[str, float] | None) -> _Jobs:
    """Validate the input and look up each expert's op times on each device."""
    free = _free_at(free_at)
    has_gpu, row, memo, unified = costs.gpu is not None, costs.row, costs.memo, costs.unified
    one = type(bits) is int
    if not one and not isinstance(bits, Mapping) or one and not 1 <= bits <= MAX_BITS:  # type: ignore[operator]
        raise ValueError(f"bits must be an int in 1..{MAX_BITS} or a mapping expert -> bits, got {bits!r}")
    ids = sorted(demand)
    tokens, bl, rows, held_by = [], [], [], residency.get
    b = bits
    for e in ids:
        n = demand[e]
        if type(n) is not int or n < 0:
            raise ValueError(f"expert {e}: tokens must be an int >= 0, got {n!r}")
        if not one:
            b = bits.get(e)  # type: ignore[union-attr]
            if type(b) is not int or not 1 <= b <= MAX_BITS:
                raise ValueError(f"expert {e}: bits must be an int in 1..{MAX_BITS}, got {b!r}")
        v = r = 0
        held = held_by(e)
        if held:
            for tier, hb in held.items():
                if type(hb) is not int or not 0 <= hb <= MAX_BITS:
                    raise ValueError(f"expert {e}: {tier} must hold 0..{MAX_BITS} bits, got {hb!r}")
                if tier == "vram":
                    if hb and not has_gpu:
                        raise ValueError(f"expert {e}: residency names VRAM on a machine without a GPU")
                    v = hb
                elif tier == "ram":
                    r = hb
                elif tier != "flash":
                    raise ValueError(f"expert {e}: unknown tier {tier!r} (known: {', '.join(TIERS)})")
                elif hb != MAX_BITS:
                    raise ValueError(f"expert {e}: flash holds every expert at {MAX_BITS} bits, not {hb}")
        tokens.append(n)
        bl.append(b)
        if v > b:  # bits held beyond those asked for are as good as those (the key _held_key gives)
            v = b
        if r > b:
            r = b
        key = (n, b, 0, v if v > r else r) if unified else (n, b, v, r)
        rows.append(memo.get(key) or row(*key))
    cols = tuple(zip(*rows)) if rows else ((),) * 8
    return _Jobs(ids, tuple(tokens), tuple(bl), *cols, free, has_gpu, rows)  # type: ignore[arg-type]


def _run(reads: list[int], copies: list[int], gpu: list[int], cpu: list[int], rd: list[float], cp: list[float],
         pg: list[float], pc: list[float],
         free: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """When each resource ends (flash, copy, gpu, cpu), given the queues and each expert's op times.

    rd[i]: expert i's read on its own device's path; cp[i]: its copy. The one timing function
    every plan is judged by.
    """
    f, k, g, c = free
    ready = [0.0] * len(rd)
    for i in reads:
        f += rd[i]
        ready[i] = f
    for i in copies:
        t = ready[i]
        k = ready[i] = (t if k < t else k) + cp[i]
    return f, k, _serial(gpu, ready, pg, g), _serial(cpu, ready, pc, c)


def _serial(queue: list[int], ready: list[float], p: list[float], free: float) -> float:
    """When one machine that frees at `free` ends the queue, each op starting once it is ready."""
    for i in queue:
        t = ready[i]
        free = (t if free < t else free) + p[i]
    return free


def simulate(plan: Plan, costs: LayerCosts, free_at: Mapping[str, float] | None = None) -> float:
    """A plan's finish time under the timing model, from its tasks and queues (ValueError if inconsistent)."""
    free = _free_at(free_at)
    ids = list(plan.tasks)
    pos = {e: i for i, e in enumerate(ids)}
    n = len(ids)
    rd, cp, pg, pc = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    for i, t in enumerate(plan.tasks.values()):
        if t.device == "gpu":
            if costs.gpu is None:
                raise ValueError(f"expert {t.expert} is planned on a GPU this machine does not have")
            pg[i] = costs.gpu(t.tokens, t.bits)
        elif t.device == "cpu":
            pc[i] = costs.cpu(t.tokens, t.bits)
            if t.copy_bytes:
                raise ValueError(f"expert {t.expert} runs on the CPU but is copied to VRAM")
        else:
            raise ValueError(f"expert {t.expert}: unknown device {t.device!r}")
        rd[i] = costs.read(t.read_bytes) if t.read_bytes else 0.0
        cp[i] = costs.h2d(t.copy_bytes) if t.copy_bytes else 0.0
    queues = []
    for name, q, want in (("reads", plan.reads, lambda t: t.read_bytes > 0),
                          ("copies", plan.copies, lambda t: t.copy_bytes > 0),
                          ("gpu", plan.gpu, lambda t: t.device == "gpu"),
                          ("cpu", plan.cpu, lambda t: t.device == "cpu")):
        if sorted(q) != sorted(e for e, t in plan.tasks.items() if want(t)):
            raise ValueError(f"the plan's {name} queue {list(q)} does not match its tasks")
        queues.append([pos[e] for e in q])
    _, _, g, c = _run(*queues, rd, cp, pg, pc, free)
    return g if g > c else c


def _plan(J: _Jobs, dev: list[int], reads: list[int], copies: list[int], gpu: list[int], cpu: list[int],
          ends: tuple[float, float, float, float] | None = None) -> Plan:
    """The Plan of a split (dev[i]: 1 GPU, 0 CPU) and queues of expert indices; ends: what `_run` gives
    them, if known."""
    ids, pg, pc, rg, rc, cg, bits, tokens = J.ids, J.pg, J.pc, J.rg, J.rc, J.cg, J.bits, J.tokens
    nrg, nrc, ncg = J.nrg, J.nrc, J.ncg
    if ends is None:
        rd, cp = [*rc], [0.0] * len(ids)
        for i in gpu:
            rd[i] = rg[i]
            cp[i] = cg[i]
        ends = _run(reads, copies, gpu, cpu, rd, cp, pg, pc, J.free)
    new, tasks = tuple.__new__, {}
    for i, e in enumerate(ids):
        if dev[i]:
            tasks[e] = new(Task, (e, "gpu", bits[i], tokens[i], nrg[i], ncg[i]))
        else:
            tasks[e] = new(Task, (e, "cpu", bits[i], tokens[i], nrc[i], 0))
    bf = bk = bg = bc = 0.0  # seconds of work of flash, copy, gpu, cpu
    for i in reads:
        bf += rg[i] if dev[i] else rc[i]
    for i in copies:
        bk += cg[i]
    for i in gpu:
        bg += pg[i]
    for i in cpu:
        bc += pc[i]
    g, c = ends[2], ends[3]
    return Plan(tasks, tuple([ids[i] for i in gpu]), tuple([ids[i] for i in cpu]), tuple([ids[i] for i in copies]),
                tuple([ids[i] for i in reads]), g if g > c else c, {"flash": bf, "copy": bk, "gpu": bg, "cpu": bc},
                dict(zip(RESOURCES, ends)))


def _johnson(items: list[int], a: Callable[[int], float], b: Callable[[int], float]) -> list[int]:
    """Johnson's rule for two-stage jobs (a(i), then b(i)): a <= b first by ascending a, the rest by descending b."""
    if len(items) < 2:
        return items[:]
    first, last = [], []
    for i in items:
        x, y = a(i), b(i)
        if x <= y:
            first.append((x, -y, i))
        else:
            last.append((-y, x, i))
    first.sort()
    last.sort()
    return [t[2] for t in first] + [t[2] for t in last]


def _greedy(J: _Jobs) -> list[int]:
    """HybriMoE's split: VRAM-resident experts on the GPU; of the rest, the heaviest to the GPU or the
    lightest to the CPU, whichever would finish its expert earlier."""
    n = len(J.ids)
    rg, cg, pg, rc, pc, nrg, ncg, nrc = J.rg, J.cg, J.pg, J.rc, J.pc, J.nrg, J.ncg, J.nrc
    f, k, g, c = J.free
    dev = [0] * n
    rest = []
    for i in range(n):
        if nrg[i] or ncg[i]:
            rest.append(i)
        else:
            dev[i] = 1
            g += pg[i]
    tokens = J.tokens
    if rest and tokens.count(tokens[0]) < n:  # hottest first (in decode, every expert has one token)
        rest.sort(key=lambda i: (-tokens[i], i))
    lo, hi = 0, len(rest) - 1
    while lo <= hi:
        h, light = rest[lo], rest[hi]
        fg, t = f, 0.0
        if nrg[h]:
            fg = t = f + rg[h]
        kg = k
        if ncg[h]:
            kg = t = (t if k < t else k) + cg[h]
        gf = (t if g < t else g) + pg[h]
        fc, t = f, 0.0
        if nrc[light]:
            fc = t = f + rc[light]
        cf = (t if c < t else c) + pc[light]
        if gf <= cf:
            dev[h] = 1
            f, k, g = fg, kg, gf
            lo += 1
        else:
            c, f = cf, fc
            hi -= 1
    return dev


def _ratio_split(J: _Jobs) -> list[int]:
    """The split of least load bound among those giving the GPU the experts it runs relatively fastest."""
    n = len(J.ids)
    pg, pc, cg, rg, rc = J.pg, J.pc, J.cg, J.rg, J.rc
    f0, k0, g0, c0 = J.free
    order = sorted(range(n), key=lambda i: ((pg[i] + cg[i]) / (pc[i] + rc[i]) if pc[i] + rc[i] > 0 else 1e300, i))
    sg, sk, sc, sf = g0, k0, c0 + sum(pc), f0 + sum(rc)
    best, cut = max(sg, sc, sf), 0
    for m, i in enumerate(order, 1):
        sg += pg[i]
        sk += cg[i]
        sc -= pc[i]
        sf += rg[i] - rc[i]
        t = max(sg, sc, sk, sf)
        if t < best:
            best, cut = t, m
    dev = [0] * n
    for i in order[:cut]:
        dev[i] = 1
    return dev


def _fractional(a0: float, b0: float, a: tuple[float, ...], b: tuple[float, ...], lazy: bool) -> float:
    """min over fractional splits of max(a0 + what stays on side A, b0 + what moves to side B).

    Item i costs a[i] on side A or b[i] on side B: two resources of the timing model (the CPU, and
    the GPU or the copy stream) one of which every expert needs, so a bound on any plan's finish.
    lazy: b0 counts only once B has work (a busy copy stream delays only the experts copied).
    """
    left, load, alone = a0 + sum(a), 0.0, None
    for i in sorted(range(len(a)), key=lambda i: b[i] / a[i] if a[i] > 0 else float("inf")):
        x, y = a[i], b[i]
        if y <= 0.0:  # moves for free
            left -= x
            continue
        if alone is None:
            alone = left
        right = b0 + load
        if left - x >= right + y:
            left, load = left - x, load + y
            continue
        f = (left - right) / (x + y)
        f = 0.0 if f < 0.0 else f
        both = max(left - f * x, right + f * y)
        break
    else:
        both = max(left, b0 + load)
    return min(both, left if alone is None else alone) if lazy else both


def _balance_bound(J: _Jobs) -> float:
    """A finish no split beats, by the CPU's and the GPU's work alone: the best split of that work in whole
    experts when each takes the same time on each device, in fractions of experts otherwise."""
    pg, pc, (_, _, g0, c0), n = J.pg, J.pc, J.free, len(J.pg)
    p, q = pg[0], pc[0]
    if pg.count(p) < n or pc.count(q) < n:
        return _fractional(c0, g0, pc, pg, False)
    x = int((c0 + n * q - g0) / (p + q)) if p + q > 0.0 else n  # where the GPU's and the CPU's work meet
    x = 0 if x < 0 else n if x > n else x
    best = max(g0 + x * p, c0 + (n - x) * q)
    if x < n:
        best = min(best, max(g0 + (x + 1) * p, c0 + (n - x - 1) * q))
    return best


def _lower_bound(J: _Jobs, best: float = float("inf")) -> float:
    """A finish no split or order can beat: each expert's earliest end, the reads no device avoids,
    and the CPU against the GPU and against the copy stream (fractional splits; skipped when the
    others already come within TOLERANCE of `best`)."""
    pg, pc, rg, cg, rc, nrg, ncg, nrc = J.pg, J.pc, J.rg, J.cg, J.rc, J.nrg, J.ncg, J.nrc
    f0, k0, g0, c0 = J.free
    one, reads, tail = 0.0, 0.0, None
    for i in range(len(J.ids)):
        t = f0 + rg[i] if nrg[i] else 0.0
        if ncg[i]:
            t = (t if t > k0 else k0) + cg[i]
        t = (t if t > g0 else g0) + pg[i]
        u = f0 + rc[i] if nrc[i] else 0.0
        u = (u if u > c0 else c0) + pc[i]
        t = t if t < u else u
        one = t if t > one else one
        if nrg[i] and nrc[i]:  # read wherever it runs
            reads += rg[i] if rg[i] < rc[i] else rc[i]
            q = min(cg[i] + pg[i], pc[i])
            tail = q if tail is None or q < tail else tail
    lb = one if tail is None else max(one, f0 + reads + tail)
    if lb * (1 + TOLERANCE) >= best:  # good enough to stop the search: spare the fractional bounds
        return lb
    return max(lb, _fractional(c0, g0, pc, pg, False), _fractional(c0, k0, pc, cg, True))


def _evaluator(J: _Jobs) -> Callable:
    """evaluate(dev, orders=False, bound=None): a split's finish time with the queues the rules give (and
    the queues); bound: its `_split_bound`, if known (no order beats it).

    It tries three orders of the GPU's reads (Johnson's rule for (read + copy, copy + GPU) and for
    (read, copy), and most work behind first) and, when both devices read, two of the CPU's
    (Johnson's rule, longest first) and two merges of the two (by work behind, the GPU's first),
    each with four merges of the copies, and keeps the best (remembered per split), or the first
    that meets the bound.
    """
    n = len(J.ids)
    pc, rc, nrc, pg, rg, cg, nrg, ncg = J.pc, J.rc, J.nrc, J.pg, J.rg, J.cg, J.nrg, J.ncg
    f0, k0, g0, c0 = J.free
    cpu_reads, need, copy_only, resident = [], [], [], []
    for i in range(n):
        if nrc[i]:
            cpu_reads.append(i)
        if nrg[i]:
            need.append(i)
        elif ncg[i]:
            copy_only.append(i)
        else:
            resident.append(i)
    cpu_reads = _johnson(cpu_reads, rc.__getitem__, pc.__getitem__)
    copy_only = _johnson(copy_only, cg.__getitem__, pg.__getitem__)
    ready = [0.0] * n
    gpu_orders: list[list[int]] = []  # the GPU's read orders, and the CPU's longest first: made on first use
    cpu_longest: list[list[int]] = []
    seen_splits: dict[tuple, tuple] = {}  # split -> its best queues

    def gpu_order(x: int) -> list[int]:
        while len(gpu_orders) <= x:
            made = len(gpu_orders)
            gpu_orders.append(_johnson(need, lambda i: rg[i] + cg[i], lambda i: cg[i] + pg[i]) if made == 0 else
                              _johnson(need, rg.__getitem__, cg.__getitem__) if made == 1 else
                              sorted(need, key=lambda i: (-cg[i] - pg[i], i)))
        return gpu_orders[x]

    def evaluate(dev: list[int], orders: bool = False, bound: float | None = None):
        key = tuple(dev)
        best = seen_splits.get(key)
        if best is None:
            best = seen_splits[key] = best_queues(dev, _split_bound(J, dev) if bound is None else bound)
        t, reads, seq, cr, cpu, gpu = best
        if not orders:
            return t
        return t, reads, [i for i in seq if ncg[i]], gpu + seq, cpu + cr

    def flash_orders(dev: list[int], gr: list[int], cr0: list[int]):
        """(the CPU's read order, the flash order) to try, best bets first."""
        yield cr0, _merge(cr0, gr, pc, pg, cg)
        if gr and len(cr0) > 1:
            if not cpu_longest:
                cpu_longest.append(sorted(cpu_reads, key=lambda i: (-pc[i], i)))
            cr = [i for i in cpu_longest[0] if not dev[i]]
            if cr != cr0:
                yield cr, _merge(cr, gr, pc, pg, cg)
        if cr0 and gr:
            yield cr0, gr + cr0

    def best_queues(dev: list[int], bound: float) -> tuple:
        enough = bound * (1 + _EPS)  # no order does better: stop at the first that gets there
        cr0 = [i for i in cpu_reads if not dev[i]]
        cpu, gpu, c1, g1 = [], [], c0, g0
        for i in range(n):
            if not dev[i]:
                if not nrc[i]:
                    cpu.append(i)
                    c1 += pc[i]
            elif not nrg[i] and not ncg[i]:
                gpu.append(i)
                g1 += pg[i]
        co = [i for i in copy_only if dev[i]]
        best, seen = None, []
        for x in range(3) if any([dev[i] for i in need]) else (-1,):
            gr = [i for i in gpu_order(x) if dev[i]] if x >= 0 else []
            if gr in seen:
                continue
            seen.append(gr)
            for cr, reads in flash_orders(dev, gr, cr0):
                f = f0
                for i in reads:
                    f += rg[i] if dev[i] else rc[i]
                    ready[i] = f
                c = _serial(cr, ready, pc, c1)
                for q in copy_orders(co, gr) if co and gr else (co or gr,):
                    k, h = k0, g1
                    for i in q:
                        t = ready[i] if nrg[i] else 0.0
                        if ncg[i]:
                            k = (t if k < t else k) + cg[i]
                            t = k
                        h = (t if h < t else h) + pg[i]
                    t = h if h > c else c
                    if best is None or t < best[0]:
                        best = (t, reads, q, cr, cpu, gpu)
                        if t <= enough:
                            return best
        return best

    def copy_orders(co: list[int], gr: list[int]):
        """Merges of the copies of experts held in RAM (co) and of those read from flash (gr, once read)."""
        yield co + gr
        yield gr + co
        k1 = [i for i in co if cg[i] <= pg[i]]
        yield k1 + gr + co[len(k1):]
        yield _fill(co, gr, ready, cg, k0)

    return evaluate


def _rules(J: _Jobs, dev: list[int]) -> tuple[tuple[float, float, float, float], list[int], list[int], list[int],
                                               list[int]]:
    """(ends, reads, copies, gpu, cpu) of a split with the orders the rules give first (those `_evaluator`
    tries first): each device's resident experts first; the CPU's reads in Johnson's order of (read,
    CPU time), the GPU's of (read + copy, copy + GPU time), merged by `_merge`; copies of experts held
    in RAM in Johnson's order of (copy, GPU time), then those of experts read from flash."""
    pc, rc, nrc, pg, rg, cg, nrg, ncg = J.pc, J.rc, J.nrc, J.pg, J.rg, J.cg, J.nrg, J.ncg
    f, k, g, c = J.free
    cpu, gpu, cr, gr, co = [], [], [], [], []
    for i in range(len(dev)):
        if dev[i]:
            if nrg[i]:
                gr.append(i)
            elif ncg[i]:
                co.append(i)
            else:
                gpu.append(i)
                g += pg[i]
        elif nrc[i]:
            cr.append(i)
        else:
            cpu.append(i)
            c += pc[i]
    cr = _johnson(cr, rc.__getitem__, pc.__getitem__)
    gr = _johnson(gr, lambda i: rg[i] + cg[i], lambda i: cg[i] + pg[i])
    seq = _johnson(co, cg.__getitem__, pg.__getitem__) + gr
    reads = _merge(cr, gr, pc, pg, cg)
    ready = [0.0] * len(dev)
    for i in reads:
        f += rg[i] if dev[i] else rc[i]
        ready[i] = f
    c = _serial(cr, ready, pc, c)
    for i in seq:
        t = ready[i]
        if ncg[i]:
            k = (t if k < t else k) + cg[i]
            t = k
        g = (t if g < t else g) + pg[i]
    return (f, k, g, c), reads, [i for i in seq if ncg[i]], gpu + seq, cpu + cr


def _merge(cr: list[int], gr: list[int], pc: tuple[float, ...], pg: tuple[float, ...],
           cg: tuple[float, ...]) -> list[int]:
    """One flash order keeping each device's read order: first the read with more work waiting behind it."""
    if not (cr and gr):
        return cr or gr
    na, nb = len(cr), len(gr)
    qc, s = [0.0] * na, 0.0
    for j in range(na - 1, -1, -1):
        s += pc[cr[j]]
        qc[j] = s
    qg, s, t, last = [0.0] * nb, 0.0, 0.0, pg[gr[-1]]
    for j in range(nb - 1, -1, -1):  # the GPU's: its own copy then every later GPU op, or every later copy
        i = gr[j]
        s += pg[i]
        t += cg[i]
        qg[j] = cg[i] + s if cg[i] + s > t + last else t + last
    reads, a, b = [], 0, 0
    while a < na and b < nb:
        if qc[a] >= qg[b]:
            reads.append(cr[a])
            a += 1
        else:
            reads.append(gr[b])
            b += 1
    return reads + (cr[a:] if a < na else gr[b:])


def _fill(co: list[int], gr: list[int], ready: list[float], cg: tuple[float, ...], k: float) -> list[int]:
    """Copies of experts read from flash as soon as they are read; the others fill the gaps."""
    seq, a, b = [], 0, 0
    while a < len(co) or b < len(gr):
        if b < len(gr) and (a == len(co) or ready[gr[b]] <= k):
            i = gr[b]
            b += 1
            k = ready[i] if k < ready[i] else k
        else:
            i = co[a]
            a += 1
        k += cg[i]
        seq.append(i)
    return seq


def _classes(J: _Jobs) -> list[list[int]]:
    """The experts grouped by op times and moves (alike to the plan): those that move planes first, then
    the most work first."""
    pg, pc, nrg, ncg, nrc = J.pg, J.pc, J.nrg, J.ncg, J.nrc
    alike: dict[int, list[int]] = {}
    for i, row in enumerate(J.rows):  # equal rows are one object: LayerCosts.row keys them canonically
        same = alike.get(id(row))
        if same is None:
            alike[id(row)] = [i]
        else:
            same.append(i)

    def order(members: list[int]) -> tuple:
        i = members[0]
        return not (nrg[i] or ncg[i] or nrc[i]), -len(members) * (pg[i] if pg[i] > pc[i] else pc[i]), i

    return sorted(alike.values(), key=order)


def _least_split(J: _Jobs, classes: list[list[int]], start: float, dev: list[int],
                 low: float) -> tuple[float, list[int]]:
    """The least `_split_bound` of any split, which no plan beats, and a split that has it; dev: a split
    whose bound is `start`, to beat; low: a bound no split beats, met by the first split that reaches it.

    Branch and bound over how many of each class (`_classes`) run on the GPU, the options of least
    bound first (of equal bounds, the better balanced, at once if it meets `low`), each bounded by the
    work every resource must do for the classes so far and at least for the others.
    """
    pg, pc, rg, cg, rc, nrg, ncg, nrc = J.pg, J.pc, J.rg, J.cg, J.rc, J.nrg, J.ncg, J.nrc
    inf = float("inf")
    f0, k0, g0, c0 = J.free
    # per class: size; GPU and CPU time; read before the GPU, before the CPU, copy (0.0: none); the
    # shortest op after a read for the GPU, for the CPU, after a copy (inf: none); whether the copy
    # waits for a read, and whether it moves anything; and what the later classes add at least:
    # compute, reads (of those read wherever they run), the shortest op after a read and after a copy
    levels = []
    rest = reads = 0.0
    tail = ktail = inf
    for members in reversed(classes):
        i, m = members[0], len(members)
        p, q = pg[i], pc[i]
        r1, t1 = (rg[i], cg[i] + p) if nrg[i] else (0.0, inf)
        r2, t2 = (rc[i], q) if nrc[i] else (0.0, inf)
        y, t3 = (cg[i], p) if ncg[i] else (0.0, inf)
        levels.append((m, p, q, r1, r2, y, t1, t2, t3, nrg[i] and ncg[i], nrg[i] or ncg[i] or nrc[i], rest, reads,
                       tail, ktail))
        rest += m * (p if p < q else q)
        if t1 < inf and t2 < inf:
            reads += m * (r1 if r1 < r2 else r2)
        if t1 < tail:
            tail = t1
        if t2 < tail:
            tail = t2
        if t3 < ktail:
            ktail = t3
    levels.reverse()
    last = len(levels) - 1
    take = [0] * len(levels)  # how many of each class run on the GPU
    best: list = [start, None]  # the least bound, and the takes that have it (None: dev's)

    def visit(j: int, g: float, c: float, moved: tuple) -> None:
        # moved: the GPU's and the CPU's reads and the copies so far (after flash and the copy stream
        # free); the shortest op after one of each (inf: none yet); and the copies that wait for a read,
        # with the shortest of those reads and of their GPU ops
        m, p, q, r1, r2, y, t1, t2, t3, both, moves, rest, reads, tail, ktail = levels[j]
        options, cut, other, moved2 = [], best[0], -1.0, moved
        for x in range(m + 1):  # x of the class on the GPU
            g2, c2 = g + x * p, c + (m - x) * q
            bound = g2 if g2 > c2 else c2
            if bound >= cut:
                continue
            balance = bound
            if j < last:  # and what the later classes add at least
                h = (g2 + c2 + rest) * 0.5
                if h > bound:
                    bound = h
            if moves or other < 0.0:  # flash and the copy stream (the same for every x if it moves nothing)
                fg, fc, k, tg, tc, tk, kr, rmin, tkr = moved
                if x:
                    if t1 < inf:
                        fg += x * r1
                        if t1 < tg:
                            tg = t1
                    if t3 < inf:
                        k += x * y
                        if t3 < tk:
                            tk = t3
                    if both:
                        kr += x * y
                        if r1 < rmin:
                            rmin = r1
                        if p < tkr:
                            tkr = p
                if x < m and t2 < inf:
                    fc += (m - x) * r2
                    if t2 < tc:
                        tc = t2
                other, tf = 0.0, tg if tg < tc else tc
                if j == last:  # the split's bound
                    if tf < inf:
                        other = f0 + fg + fc + tf
                        if tg < inf and f0 + fg + tg > other:
                            other = f0 + fg + tg
                        if tc < inf and f0 + fc + tc > other:
                            other = f0 + fc + tc
                    if tk < inf and k0 + k + tk > other:
                        other = k0 + k + tk
                    if tkr < inf and f0 + rmin + kr + tkr > other:
                        other = f0 + rmin + kr + tkr
                else:
                    if tf < inf or reads:
                        other = f0 + fg + fc + reads + (tf if tf < tail else tail)
                    if tk < inf and k0 + k + (tk if tk < ktail else ktail) > other:
                        other = k0 + k + (tk if tk < ktail else ktail)
                    if moves:
                        moved2 = (fg, fc, k, tg, tc, tk, kr, rmin, tkr)
            if other > bound:
                bound = other
            if bound >= cut:
                continue
            if j == last:  # a better split
                take[j] = x
                cut = best[0] = bound
                best[1] = take[:]
                if cut <= low:
                    return
            elif bound <= low:  # no option does better: on with it at once, and stop if it gets there
                take[j] = x
                visit(j + 1, g2, c2, moved2)
                if best[0] <= low:
                    return
                cut = best[0]
            else:
                options.append((bound, balance, x, g2, c2, moved2))
        if len(options) > 1:
            options.sort()
        for bound, _, x, g2, c2, moved2 in options:
            if bound >= best[0] or best[0] <= low:
                return
            take[j] = x
            visit(j + 1, g2, c2, moved2)

    if levels:
        visit(0, g0, c0, (0.0, 0.0, 0.0, inf, inf, inf, 0.0, inf, inf))
    if best[1] is None:
        return start, dev
    dev = [0] * len(pg)
    for members, x in zip(classes, best[1]):
        for e in members[:x]:
            dev[e] = 1
    return best[0], dev


def _split_search(J: _Jobs, evaluate: Callable, found: list, lb: float) -> None:
    """Branch and bound over the splits, bounding each by the work every resource must do.

    found: (finish, split) pairs, best first, that the search adds to (keeping KEEP). Experts with
    the same op times are one class, so it chooses how many of a class run on the GPU, not which.
    A branch is cut when its bound is within TOLERANCE of the best finish found; the search stops
    after SEARCH_WORK * 8 / n options or SEARCH_LEAVES / n^2 splits.
    """
    n = len(J.ids)
    pg, pc, rg, cg, rc, nrg, ncg, nrc = J.pg, J.pc, J.rg, J.cg, J.rc, J.nrg, J.ncg, J.nrc
    f0, k0, g0, c0 = J.free
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        groups.setdefault((pg[i], pc[i], rg[i], cg[i], rc[i], nrg[i] > 0, ncg[i] > 0, nrc[i] > 0), []).append(i)
    classes = sorted(groups.values(), key=lambda m: (-len(m) * max(pg[m[0]], pc[m[0]]), m[0]))
    rest = [0.0] * (len(classes) + 1)
    for j in range(len(classes) - 1, -1, -1):
        i = classes[j][0]
        rest[j] = rest[j + 1] + len(classes[j]) * (pg[i] if pg[i] < pc[i] else pc[i])
    take = [0] * len(classes)  # how many of each class run on the GPU
    cut, stop = [found[0][0] / (1 + TOLERANCE)], lb * (1 + TOLERANCE)
    budget = [SEARCH_WORK * 8 // max(n, 8), max(4, SEARCH_LEAVES // max(n * n, 1))]  # options weighed, splits

    def visit(j: int, sg: float, sc: float, sf: float, sk: float) -> None:
        # sf, sk: reads and copies so far, counted from when flash and the copy stream free (-1.0: none yet)
        if found[0][0] <= stop or budget[0] < 0 or budget[1] <= 0:
            return
        if j == len(classes):
            budget[1] -= 1
            cur = [0] * n
            for members, x in zip(classes, take):
                for e in members[:x]:
                    cur[e] = 1
            _keep(found, evaluate(cur), cur)
            cut[0] = found[0][0] / (1 + TOLERANCE)
            return
        members = classes[j]
        m, i, r = len(members), members[0], rest[j + 1]
        budget[0] -= m + 1
        options = []
        for x in range(m + 1):  # x of the class on the GPU
            g2, c2, f2, k2 = sg + x * pg[i], sc + (m - x) * pc[i], sf, sk
            if x and nrg[i] or x < m and nrc[i]:
                f2 = (f0 if sf < 0.0 else sf) + (x * rg[i] if nrg[i] else 0.0) + ((m - x) * rc[i] if nrc[i] else 0.0)
            if x and ncg[i]:
                k2 = (k0 if sk < 0.0 else sk) + x * cg[i]
            bound = max((g2 + c2 + r) * 0.5, g2, c2, f2, k2)
            if bound < cut[0]:
                options.append((bound, x, g2, c2, f2, k2))
        options.sort()
        for bound, x, g2, c2, f2, k2 in options:
            if bound >= cut[0]:
                break
            take[j] = x
            visit(j + 1, g2, c2, f2, k2)

    visit(0, g0, c0, -1.0, -1.0)


def _keep(found: list, t: float, dev: list[int]) -> None:
    """Add a split to the best few (finish, split) pairs, best first, if it is new and among them."""
    if len(found) >= KEEP and t >= found[-1][0] or any(d == dev for _, d in found):
        return
    found.append((t, dev[:]))
    found.sort(key=lambda x: x[0])
    del found[KEEP:]


def _split_bound(J: _Jobs, dev: list[int]) -> float:
    """A finish no order of this split can beat: the work of each resource; the reads (all, the GPU's,
    the CPU's) and the copies, each followed by the shortest op that must come after the last one; and
    the copies of experts read from flash, which wait for the first such read."""
    pg, pc, rg, rc, cg, nrg, nrc, ncg = J.pg, J.pc, J.rg, J.rc, J.cg, J.nrg, J.nrc, J.ncg
    inf = float("inf")
    f0, k0, g, c = J.free
    fg = fc = k = kr = 0.0
    tg = tc = tk = tkr = rmin = inf
    for i in range(len(dev)):
        if dev[i]:
            g += pg[i]
            if nrg[i]:
                fg += rg[i]
                tg = min(tg, cg[i] + pg[i])
            if ncg[i]:
                k += cg[i]
                tk = min(tk, pg[i])
                if nrg[i]:
                    kr += cg[i]
                    rmin = min(rmin, rg[i])
                    tkr = min(tkr, pg[i])
        else:
            c += pc[i]
            if nrc[i]:
                fc += rc[i]
                tc = min(tc, pc[i])
    return max(g, c, f0 + fg + fc + min(tg, tc) if tg < inf or tc < inf else 0.0, f0 + fg + tg if tg < inf else 0.0,
               f0 + fc + tc if tc < inf else 0.0, k0 + k + tk if tk < inf else 0.0,
               f0 + rmin + kr + tkr if tkr < inf else 0.0)


def _polish(J: _Jobs, dev: list[int], reads: list[int], copies: list[int], enough: float) -> tuple:
    """Better read and copy orders for a split: other rules for the GPU's reads, then moving one op at a
    time while that shortens the plan. Copies of experts read from flash follow their read order."""
    n, pg, pc, rg, cg, nrg, ncg = len(dev), J.pg, J.pc, J.rg, J.cg, J.nrg, J.ncg
    rd = [rg[i] if dev[i] else J.rc[i] for i in range(n)]
    cp = [cg[i] if dev[i] else 0.0 for i in range(n)]
    gres = [i for i in range(n) if dev[i] and not nrg[i] and not ncg[i]]
    cres = [i for i in range(n) if not dev[i] and not J.nrc[i]]
    gr = [i for i in reads if dev[i]]

    def finish(reads: list[int], copies: list[int]) -> tuple[float, list[int], list[int], list[int], list[int]]:
        order = iter([i for i in reads if dev[i] and ncg[i]])
        copies = [next(order) if nrg[i] else i for i in copies]  # read ones in read order, in the same slots
        gpu = gres + copies + [i for i in reads if dev[i] and not ncg[i]]
        cpu = cres + [i for i in reads if not dev[i]]
        _, _, g, c = _run(reads, copies, gpu, cpu, rd, cp, pg, pc, J.free)
        return (g if g > c else c), reads, copies, gpu, cpu

    def with_gpu_reads(order: list[int]) -> list[int]:
        it = iter(order)
        return [next(it) if dev[i] else i for i in reads]

    cur = finish(reads, copies)  # the rules keep copies of read experts in read order: this is `best`
    for key in ((rg, cg), (rg, pg)):  # Johnson's rule for reads feeding copies, and for reads feeding the GPU
        t = finish(with_gpu_reads(_johnson(gr, key[0].__getitem__, key[1].__getitem__)), cur[2])
        if t[0] < cur[0] * (1 - _EPS):
            cur = t
    for _ in range(POLISH_PASSES):
        improved = False
        for which in (1, 2):
            q = cur[which]
            for a in range(len(q)):
                for b in range(len(q)):
                    for swap in (False, True):
                        if a == b or swap and (b < a or b == a + 1):  # nothing, or a move made already
                            continue
                        q2 = q[:]
                        if swap:
                            q2[a], q2[b] = q2[b], q2[a]
                        else:  # the op at a moves to position b
                            q2.insert(b, q2.pop(a))
                        t = finish(q2, cur[2]) if which == 1 else finish(cur[1], q2)
                        if t[0] < cur[0] * (1 - _EPS):
                            cur, q, improved = t, t[which], True
                            if cur[0] <= enough:
                                return cur
        if not improved:
            break
    return cur


def _solve(J: _Jobs, search: bool = True) -> Plan:
    """The heuristic plan of a prepared layer."""
    n = len(J.ids)
    if not J.has_gpu:  # Johnson's rule: optimal for one flash queue feeding one CPU
        reads = _johnson([i for i in range(n) if J.nrc[i]], J.rc.__getitem__, J.pc.__getitem__)
        return _plan(J, [0] * n, reads, [], [], [i for i in range(n) if not J.nrc[i]] + reads)
    dev, classes, splits, inf = _greedy(J), [], 1 << n, float("inf")
    if search and splits > EXACT_SPLITS:
        classes, splits = _classes(J), 1
        for members in classes:
            splits *= len(members) + 1
    exact = search and n > 0 and splits <= EXACT_SPLITS
    if exact:  # weigh every split: one of least bound, which no plan beats (HybriMoE's if it meets `low`)
        lb, low = _split_bound(J, dev), max(_lower_bound(J, 0.0), _balance_bound(J))  # cheap global bounds
        if lb > low * (1 + _EPS):
            lb, dev = _least_split(J, classes or _classes(J), lb, dev, low)
        lb = lb if lb > low else low
        ends, reads, copies, gpu, cpu = _rules(J, dev)
        if max(ends[2], ends[3]) <= lb * (1 + _EPS):  # the rules' orders meet it: optimal
            return _plan(J, dev, reads, copies, gpu, cpu, ends)
        evaluate = _evaluator(J)  # else other orders, and other splits as below
        found = [(evaluate(dev, bound=lb), dev)]
        lb = inf if found[0][0] <= lb * (1 + _EPS) else lb * (1 + TOLERANCE)
        if found[0][0] > lb:
            for other in (_greedy(J), _ratio_split(J)):
                _keep(found, evaluate(other), other)
            if found[0][0] > lb:
                _split_search(J, evaluate, found, lb / (1 + TOLERANCE))
    else:
        evaluate = _evaluator(J)
        found = [(evaluate(dev), dev)]
        lb = _lower_bound(J, found[0][0]) * (1 + TOLERANCE) if search else inf
        if found[0][0] > lb:
            other = _ratio_split(J)
            _keep(found, evaluate(other), other)
            if found[0][0] > lb:
                _split_search(J, evaluate, found, lb / (1 + TOLERANCE))
    best = None
    for rank, (t, dev) in enumerate(found):  # the best split, and the others if polishing may help them
        polish = t > lb and any(dev[i] and J.nrg[i] for i in range(n)) and 1 < sum(
            (J.nrg[i] > 0) + (J.ncg[i] > 0) if dev[i] else J.nrc[i] > 0 for i in range(n)) <= POLISH_OPS
        if rank and not polish:
            continue
        _, reads, copies, gpu, cpu = evaluate(dev, True)
        enough = max(_split_bound(J, dev) * (1 + TOLERANCE), lb) if polish else t
        if t > enough:
            t, reads, copies, gpu, cpu = _polish(J, dev, reads, copies, enough)
        if best is None or t < best[0] * (1 - _EPS):
            best = (t, dev, reads, copies, gpu, cpu)
    return _plan(J, *best[1:])


def schedule(demand: Mapping[int, int], residency: Mapping[int, Mapping[str, int]], bits: int | Mapping[int, int],
             costs: LayerCosts, free_at: Mapping[str, float] | None = None, search: bool = True) -> Plan:
    """A fast, near-optimal plan for one layer's demand (expert -> tokens) given where each expert is held.

    residency: expert -> {tier: bits held} with tiers "vram", "ram" (and "flash", always 8); an
    expert it does not name is on flash only. bits: the bit-width every expert runs at, or expert
    -> bits. free_at: resource -> seconds until it frees (default: all free now). search=False:
    HybriMoE's split with the order rules, nothing more. ValueError on bad input.
    """
    return _solve(_prepare(demand, residency, bits, costs, free_at), search)


def _dominated(front: list, f: float, k: float, g: float, c: float) -> bool:
    for e in front:
        if e[0] <= f and e[1] <= k and e[2] <= g and e[3] <= c:
            return True
    return False


def optimal_plan(demand: Mapping[int, int], residency: Mapping[int, Mapping[str, int]], bits: int | Mapping[int, int],
                 costs: LayerCosts, free_at: Mapping[str, float] | None = None) -> Plan:
    """The plan of least finish time under the timing model, by exact search (at most MAX_EXACT experts)."""
    J = _prepare(demand, residency, bits, costs, free_at)
    n = len(J.ids)
    if n > MAX_EXACT:
        raise ValueError(f"optimal_plan searches at most {MAX_EXACT} experts, the layer demands {n}")
    ub = _solve(J).finish_time * (1 + 1e-9)
    opts = []  # per expert: (device, needs read, needs copy, read, copy, compute)
    for i in range(n):
        o = [(0, J.nrc[i] > 0, False, J.rc[i], 0.0, J.pc[i])]
        if J.has_gpu:
            o.append((1, J.nrg[i] > 0, J.ncg[i] > 0, J.rg[i], J.cg[i], J.pg[i]))
        opts.append(o)
    least = [min(p for *_, p in o) for o in opts]
    full = (1 << n) - 1
    rest_min = [sum(least[i] for i in range(n) if not m >> i & 1) for m in range(full + 1)]
    # an entry: (flash, copy, gpu, cpu, parent entry, expert, device); fronts per (placed set, phase)
    fronts: dict[tuple[int, int], list] = {(0, 0): [(*J.free, None, -1, -1)]}
    for mask in range(full + 1):
        for phase in (0, 1):
            front = fronts.pop((mask, phase), None)
            if not front:
                continue
            if mask == full:
                fronts[(mask, phase)] = front
                continue
            for ent in front:
                f, k, g, c = ent[0], ent[1], ent[2], ent[3]
                if (g + c + rest_min[mask]) * 0.5 > ub:
                    continue
                for i in range(n):
                    bit = 1 << i
                    if mask & bit:
                        continue
                    for d, need_r, need_c, r, cc, p in opts[i]:
                        f2, k2, g2, c2 = f, k, g, c
                        if not need_r and not need_c:
                            if phase:
                                continue
                            key = (mask | bit, 0)
                            if d:
                                g2 = g + p
                            else:
                                c2 = c + p
                        else:
                            key = (mask | bit, 1)
                            t = 0.0
                            if need_r:
                                f2 = t = f + r
                            if need_c:
                                k2 = t = (t if k < t else k) + cc
                            if d:
                                g2 = (t if g < t else g) + p
                            else:
                                c2 = (t if c < t else c) + p
                        if (g2 if g2 > c2 else c2) > ub:
                            continue
                        dst = fronts.setdefault(key, [])
                        if _dominated(dst, f2, k2, g2, c2):
                            continue
                        dst[:] = [e for e in dst if not (f2 <= e[0] and k2 <= e[1] and g2 <= e[2] and c2 <= e[3])]
                        dst.append((f2, k2, g2, c2, ent, i, d))
    ends = [e for ph in (0, 1) for e in fronts.get((full, ph), ())]
    if not ends:  # the heuristic's plan is optimal to within rounding
        return _solve(J)
    best = min(ends, key=lambda e: e[2] if e[2] > e[3] else e[3])
    events = []
    while best[4] is not None:
        events.append((best[5], best[6]))
        best = best[4]
    events.reverse()
    dev = [0] * n
    for i, d in events:
        dev[i] = d
    reads = [i for i, d in events if (J.nrg[i] if d else J.nrc[i])]
    copies = [i for i, d in events if d and J.ncg[i]]
    gpu = [i for i, d in events if d]
    cpu = [i for i, d in events if not d]
    return _plan(J, dev, reads, copies, gpu, cpu)
