"""The native backend: moed's own int8 kernels (quant/native.c) computing on the store's codes as they are.

A matrix's compute form is its codes, centred and regrouped in blocks of 16 rows (one byte each at 5-8
bits, two to a byte at 4 bits or fewer), with three 16-bit parameters per group (float16 scale and offset,
the codes' int16 sum): about 8.4 (or 4.4) bits per weight at groups of 128 (a llama.cpp Q8_0 tensor holds
8.5), made in one pass over the codes.
Activations are quantised per group to int8 (as onnxruntime's MatMulNBits at accuracy level 4); an x86
CPU with AVX512-VNNI runs the dot products 16 rows at a time with vpdpbusd, one with AVX2 8 rows at a time
with vpmaddubsw and vpmaddwd (the same integer sums), any other CPU the same arithmetic in plain C. A whole
expert FFN is one call. Calls release the GIL. A large matrix's row blocks, and a decode step's resident
experts, are split over threads of quant/native.c's own, which wait for the next job spinning for a while;
experts that wait for reads run side by side on the Python workers.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from quant import native
from quant.kernels.base import MsbMatrix, PooledBackend, PreparedExpert, activation
from quant.planes import PackedCodes
from quant.views import ExpertViews, QuantView

ROWS = 16  # rows per block of the compute form
ACT_CODES = {"silu": 0, "swish": 0, "gelu": 1, "relu": 2}
# a matrix of at least this many codes is split over the threads by row blocks (quant/native.c's own
# threads: a hand-off costs microseconds, not the ~0.1 ms of a Python pool's)
SPLIT_CODES = 1 << 20
MAX_GROUP = 256  # a group's sum of centred codes fits the form's int16 up to this


@dataclass(frozen=True, slots=True)
class NativeTerm:
    """One affine term in the kernel's layout: centred codes [blocks * 16 * K] int8 (or uncentred nibbles, half
    that); scale and offset [blocks, K/G, 16] float16 and the centred codes' sums per group int16 (quant/native.c).
    """

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    sums: np.ndarray
    bits: int  # <= 4: codes two to a byte (nibbles), uncentred
    _ptrs: tuple[int, int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # (an array's .ctypes.data takes microseconds: asked once)
        arrays = (self.codes, self.scale, self.offset, self.sums)
        object.__setattr__(self, "_ptrs", tuple(a.ctypes.data for a in arrays))

    def args(self) -> tuple[int, int, int, int]:
        """The kernel's pointers to codes, scale, offset and sums."""
        return self._ptrs


@dataclass(frozen=True, slots=True)
class NativeMatrix:
    """A matrix's terms (the first's offsets are all terms' offsets summed; the others' are zero) and shape."""

    terms: tuple[NativeTerm, ...]
    n: int
    k: int
    group: int

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(a.nbytes for t in self.terms for a in (t.codes, t.scale, t.offset, t.sums))

    @property
    def blocks(self) -> int:
        """Blocks of 16 rows."""
        return -(-self.n // ROWS)


@dataclass(frozen=True, slots=True)
class NativeExpert(PreparedExpert):
    """An expert's forms and, where one C call computes its FFN (one term a matrix), that call's arguments
    (holding pointers into the forms, which it lives with)."""

    call: native.Expert | None = None
    slab: np.ndarray | None = None  # the one buffer every array of the forms lies in (Slabs)


class Slabs:
    """Buffers for expert forms, reused. When a tier lets an expert's form go, its buffer waits here (at most
    SPARE of them, the oldest dropped first) and the next form of the same size is made in it once nothing
    refers to it any more. A miss then writes into memory already paged in: a fresh buffer's pages cost ~2 us
    each to fault in on this VM, and under a memory cap each new page can make the kernel reclaim first, which
    took more time than reading and making the form. Waiting buffers are outside every tier's budget, as freed
    memory an allocator keeps is."""

    SPARE = 4

    def __init__(self) -> None:
        self._spare: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of nbytes: a waiting one nothing refers to, else a new one."""
        with self._lock:
            for i in range(len(self._spare)):
                # referred to by the list and getrefcount's argument only: no form or array of one is left
                if self._spare[i].nbytes == nbytes and sys.getrefcount(self._spare[i]) == 2:
                    return self._spare.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, slab: np.ndarray) -> None:
        """A buffer whose form has been let go."""
        with self._lock:
            if any(a is slab for a in self._spare):
                return
            self._spare.append(slab)
            if len(self._spare) > self.SPARE:
                self._spare.pop(0)

    @property
    def waiting(self) -> int:
        """Buffers waiting."""
        return len(self._spare)


class Native(PooledBackend, name="native"):
    """moed's int8 kernels on the store's codes (quant/native.c), run side by side on `threads` workers, or
    split over quant/native.c's own threads (large linears; ffn_many(parallel=True))."""

    threads_inside = True
    reads_planes = True

    @classmethod
    def available(cls) -> bool:
        return native.library() is not None

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self.slabs = Slabs()

    def prepare(self, view: QuantView) -> NativeMatrix:
        return self._prepare(view, lambda count, dtype: np.empty(count, dtype=dtype))

    def _prepare(self, view: QuantView, alloc: Callable[[int, type], np.ndarray]) -> NativeMatrix:
        """A matrix's form, its arrays from alloc(count, dtype) (their bytes add up to _form_bytes(view))."""
        lib = native.library()
        n, k = view.shape
        g = view.group
        _check_group(k, g)
        blocks, ng = -(-n // ROWS), k // g
        # w = s * (c - mid) + (z + s * mid): each term's codes centred, the offsets of all terms in the first's
        offsets = sum(t.zero.float() + t.scale.float() * (1 << (t.bits - 1)) for t in view.terms)
        terms = []
        for i, t in enumerate(view.terms):
            packed = alloc(_packed_count(n, k, t.bits), np.int8)  # nibbles at <= 4 bits
            sums = alloc(blocks * ng * ROWS, np.int16).reshape(blocks, ng, ROWS)
            if isinstance(t.codes, PackedCodes):  # the planes as read: unpacked 16 rows at a time, in cache
                if len(t.codes.planes) != t.bits:
                    raise ValueError(f"{len(t.codes.planes)} planes do not hold {t.bits}-bit codes")
                planes = [np.ascontiguousarray(p, dtype=np.uint8) for p in t.codes.planes]  # (alive for the call)
                ptrs = (ctypes.c_void_p * t.bits)(*(p.ctypes.data for p in planes))
                if lib.moed_interleave_planes(ptrs, t.bits, n, k, g, packed.ctypes.data, sums.ctypes.data,
                                              self.threads):
                    raise MemoryError("no memory for a block of codes")
            else:
                codes = np.ascontiguousarray(t.codes.numpy(), dtype=np.uint8)
                lib.moed_interleave(codes.ctypes.data, n, k, g, t.bits, packed.ctypes.data, sums.ctypes.data)
            params = []
            for p in (t.scale, offsets if i == 0 else torch.zeros_like(t.zero)):
                src = np.ascontiguousarray(p.numpy(), dtype=np.float32)
                out = alloc(blocks * ng * ROWS, np.float16).reshape(blocks, ng, ROWS)
                if lib.moed_interleave_params(src.ctypes.data, n, ng, out.ctypes.data):  # stored scales: exact
                    raise ValueError("a scale or offset exceeds the float16 range of the native kernels' form")
                params.append(out)
            terms.append(NativeTerm(packed, *params, sums, t.bits))
        return NativeMatrix(tuple(terms), n, k, g)

    def prepare_rows(self, blocks: Iterable[QuantView], n: int) -> NativeMatrix:
        """The form made into its final arrays a block of rows at a time (blocks of a multiple of ROWS rows, the
        last excepted): the whole matrix's codes are never held besides the form. Blocks of other sizes are
        joined first (the base class's way)."""
        it = iter(blocks)
        first = next(it)
        k, g, bits = first.shape[1], first.group, [t.bits for t in first.terms]
        if first.shape[0] == n or first.shape[0] % ROWS:
            return super().prepare_rows(itertools.chain((first,), it), n)
        arrays = [np.empty(count, dtype) for count, dtype in _form_arrays(n, k, g, bits)]
        filled = [0] * len(arrays)  # each array's elements made so far: where the next block's part begins
        a = 0
        for view in itertools.chain((first,), it):
            if a % ROWS or view.shape[1] != k or view.group != g or [t.bits for t in view.terms] != bits:
                raise ValueError(f"blocks of rows at {a} do not continue the matrix's form")
            asked = itertools.count()

            def carve(count: int, dtype, asked=asked) -> np.ndarray:  # _prepare's arrays, in _form_arrays' order
                i = next(asked)
                filled[i] += count
                return arrays[i][filled[i] - count:filled[i]]

            self._prepare(view, carve)
            a += view.shape[0]
        if a != n:
            raise ValueError(f"blocks of {a} rows for a matrix of {n}")
        shape = (-1, k // g, ROWS)
        return NativeMatrix(tuple(NativeTerm(c, s.reshape(shape), o.reshape(shape), u.reshape(shape), b)
                                  for (c, u, s, o), b in zip(zip(*[iter(arrays)] * 4), bits)), n, k, g)

    def linear(self, x: torch.Tensor, form: NativeMatrix) -> torch.Tensor:
        x = _f32(x)
        t = x.shape[0]
        y = torch.empty(t, form.n)
        threads = self.threads if form.n * form.k >= SPLIT_CODES else 1
        lib = native.library()
        for i, term in enumerate(form.terms):
            lib.moed_qgemm_mt(x.data_ptr(), t, *term.args(), form.n, form.k, form.group, term.bits, 0, form.blocks,
                              y.data_ptr(), form.n, int(i > 0), threads)
        return y

    def form_nbytes(self, form: NativeMatrix) -> int:
        return form.nbytes

    def prepare_expert(self, views: ExpertViews, act: str) -> PreparedExpert:
        activation(act)
        mats = (views.gate, views.up, views.down)
        slab = self.slabs.take(sum(_form_bytes(v) for v in mats))
        carve = _Carver(slab)
        forms = tuple(self._prepare(v, carve) for v in mats)
        return self._expert(forms, act, views.bits, slab, carve)

    def prepare_msb(self, mats: Iterable[MsbMatrix], bits: int, act: str) -> PreparedExpert:
        """prepare_expert's form, byte for byte, of an MSB-scheme expert (quant.schemes.MSB) at `bits` from its
        stored bytes as read: one C call a matrix (quant/native.c's moed_form_msb), no views in between. Each
        matrix's head and planes are addresses that must stay valid for the call (offload.store.Store.form)."""
        activation(act)
        mats = tuple(mats)
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        for m in mats:
            _check_group(m.k, m.group)
            if len(m.planes) < bits:
                raise ValueError(f"an MSB matrix of {len(m.planes)} planes has no {bits}-bit native form")
        slab = self.slabs.take(sum(_nbytes(_form_arrays(m.n, m.k, m.group, [bits])) for m in mats))
        carve = _Carver(slab)
        lib = native.library()
        forms = []
        for m in mats:
            (cn, ct), (un, ut), (sn, st), (zn, zt) = _form_arrays(m.n, m.k, m.group, [bits])
            codes, sums, scale, offset = carve(cn, ct), carve(un, ut), carve(sn, st), carve(zn, zt)
            ptrs = (ctypes.c_void_p * bits)(*m.planes[:bits])
            err = lib.moed_form_msb(m.head, ptrs, bits, m.n, m.k, m.group, codes.ctypes.data, sums.ctypes.data,
                                    scale.ctypes.data, offset.ctypes.data, self.threads)
            if err:
                self.slabs.give(slab)
                if err == -1:
                    raise MemoryError("no memory for a block of codes")
                raise ValueError("a scale or offset exceeds the float16 range of the native kernels' form")
            shape = (-1, m.k // m.group, ROWS)
            forms.append(NativeMatrix((NativeTerm(codes, scale.reshape(shape), offset.reshape(shape),
                                                  sums.reshape(shape), bits),), m.n, m.k, m.group))
        return self._expert(tuple(forms), act, bits, slab, carve)

    def _expert(self, forms: tuple[NativeMatrix, ...], act: str, bits: int, slab: np.ndarray,
                carve: "_Carver") -> NativeExpert:
        """An expert of forms made in `slab` (all of it carved), with its one-call arguments where it has them."""
        assert carve.at == slab.nbytes, "_form_bytes and the form's arrays disagree on its layout"
        call = None
        if act in ACT_CODES and all(len(f.terms) == 1 for f in forms):  # one C call computes it
            terms = [f.terms[0] for f in forms]
            ptrs = [(ctypes.c_void_p * 3)(*(t.args()[i] for t in terms)) for i in range(4)]
            call = native.Expert(*ptrs, (ctypes.c_int * 3)(*(f.group for f in forms)),
                                 (ctypes.c_int * 3)(*(t.bits for t in terms)), forms[0].k, forms[0].n, ACT_CODES[act])
        return NativeExpert(forms, act, bits, sum(f.nbytes for f in forms), call, slab)

    def idle(self) -> None:
        native.library().moed_park()

    def recycle(self, e: PreparedExpert) -> None:
        if isinstance(e, NativeExpert) and e.slab is not None:
            self.slabs.give(e.slab)

    def ffn(self, x: torch.Tensor, e: PreparedExpert) -> torch.Tensor:
        return self.ffn_many(x, [e])[0]

    def ffn_many(self, x: torch.Tensor, experts: list[PreparedExpert], parallel: bool = False) -> list[torch.Tensor]:
        if not experts:
            return []
        d = experts[0].forms[2].n
        one = [e for e in experts if getattr(e, "call", None) is not None and e.forms[2].n == d]
        if len(one) < len(experts):  # several terms a matrix (or another width): three linears; the rest one call
            ys = dict(zip(map(id, one), self.ffn_many(x, one, parallel)))
            return [ys[id(e)] if id(e) in ys else super(Native, self).ffn(x, e) for e in experts]
        x = _f32(x)
        y = torch.empty(len(experts), x.shape[0], d)
        calls = (native.Expert * len(experts))(*(e.call for e in experts))
        native.library().moed_ffn_many_mt(x.data_ptr(), x.shape[0], len(experts), ctypes.addressof(calls),
                                          y.data_ptr(), self.threads if parallel else 1)
        return list(y.unbind(0))


def _packed_count(n: int, k: int, bits: int) -> int:
    """Bytes of a term's codes in the kernel's layout: blocks of 16 rows, two codes a byte at <= 4 bits."""
    return -(-n // ROWS) * ROWS * k // (2 if bits <= 4 else 1)


def _form_arrays(n: int, k: int, group: int, bits: list[int]) -> list[tuple[int, type]]:
    """(elements, dtype) of each array of a matrix's form, in the order _prepare makes them: per term (of these
    bits), its codes, the codes' sums per group, and scale and offset ([blocks, K/G, 16] each)."""
    per_group = -(-n // ROWS) * (k // group) * ROWS
    return [a for b in bits for a in ((_packed_count(n, k, b), np.int8), (per_group, np.int16),
                                      (per_group, np.float16), (per_group, np.float16))]


def _check_group(k: int, g: int) -> None:
    """ValueError unless the kernels can take rows of k in groups of g."""
    if k % g or g % 8 or g > MAX_GROUP:
        raise ValueError(f"the native kernels need groups of a multiple of 8 dividing K, at most {MAX_GROUP} "
                         f"(got K={k}, group {g})")


def _nbytes(arrays: list[tuple[int, type]]) -> int:
    """Bytes of (elements, dtype) arrays."""
    return sum(count * np.dtype(dtype).itemsize for count, dtype in arrays)


def _form_bytes(view: QuantView) -> int:
    """Bytes of a matrix's form (_form_arrays)."""
    n, k = view.shape
    return _nbytes(_form_arrays(n, k, view.group, [t.bits for t in view.terms]))


class _Carver:
    """Arrays cut one after another from the front of a slab: carve(count, dtype)."""

    def __init__(self, slab: np.ndarray) -> None:
        self.slab, self.at = slab, 0

    def __call__(self, count: int, dtype) -> np.ndarray:
        size = count * np.dtype(dtype).itemsize
        self.at += size
        return self.slab[self.at - size:self.at].view(dtype)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous float32 tensor on the CPU with no grad (itself when it is one already)."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.requires_grad:
        x = x.detach().float().contiguous()
    return x
