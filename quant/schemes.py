"""Bit-nested storage schemes: how a matrix becomes a head plus 8 bit-planes, and the r-bit view of a prefix.

- "msb": 8-bit per-group min-max codes split into bit-planes, most significant first; the r-bit view
  reads the top r planes and dequantises to the middle of the bucket (ALGORITHMS.md section 4).
- "residual": D^2MoE-style (MWQ) nesting: a 2-bit base (planes 0-1: the group's range cut into 4
  buckets, each read at its middle), then 6 binary residual planes, each with its own per-group scale
  (the mean absolute residual, which is L2-optimal for a sign plane; data-free, no GPTQ calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from quant.groups import PARAM_DTYPE, grouped, quantize
from quant.planes import PLANES, PackedCodes, pack_planes, plane_nbytes, unpack_planes
from quant.views import AffineTerm, QuantView, msb_view

PARAM_BYTES = torch.finfo(PARAM_DTYPE).bits // 8


@dataclass(frozen=True, slots=True)
class Encoded:
    """One matrix in a scheme's stored form: head params and its first len(planes) bit-planes."""

    shape: tuple[int, int]
    group: int
    head: torch.Tensor  # [h, N, K/G] PARAM_DTYPE: params every view needs
    planes: torch.Tensor | tuple[torch.Tensor, ...]  # [p, N*K/8] uint8 (or p such rows), most significant first
    plane_params: tuple[torch.Tensor, ...]  # per plane [q_i, N, K/G] PARAM_DTYPE (q_i may be 0)

    def head_bytes(self) -> bytes:
        """The head as stored."""
        return self.head.contiguous().numpy().tobytes()

    def plane_bytes(self, i: int) -> bytes:
        """Plane i as stored: its params, then its bits."""
        return self.plane_params[i].contiguous().numpy().tobytes() + self.planes[i].numpy().tobytes()


class Scheme:
    """A bit-nesting scheme; subclasses register by name (`scheme(name)` finds them)."""

    name: ClassVar[str] = ""
    head_params: ClassVar[int] = 0  # params per group in the head
    _registry: ClassVar[dict[str, type["Scheme"]]] = {}

    def __init_subclass__(cls, *, name: str, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.name = name
        Scheme._registry[name] = cls

    def plane_params(self, i: int) -> int:
        """Params per group stored with plane i."""
        return 0

    def encode(self, w: torch.Tensor, group: int) -> Encoded:
        """Quantise a float [N, K] matrix into head and 8 planes."""
        raise NotImplementedError

    def view(self, enc: Encoded, bits: int, packed: bool = False) -> QuantView:
        """The `bits`-bit view from the first `bits` planes (enc may hold more); `packed`: its codes may be left as
        the planes they are in (PackedCodes, for a backend that reads planes; only where a term's codes are the
        planes as they are)."""
        raise NotImplementedError

    def head_nbytes(self, shape: tuple[int, int], group: int) -> int:
        """Stored size of the head of a matrix."""
        return self.head_params * _n_groups(shape, group) * PARAM_BYTES

    def plane_nbytes(self, i: int, shape: tuple[int, int], group: int) -> int:
        """Stored size of plane i (params and bits) of a matrix."""
        return self.plane_params(i) * _n_groups(shape, group) * PARAM_BYTES + plane_nbytes(shape[0] * shape[1])

    def decode(self, shape: tuple[int, int], group: int, head, planes: list) -> Encoded:
        """An Encoded from stored bytes: the head and the first len(planes) planes (buffers)."""
        n, k = shape
        ng = k // group
        h = _array(head, np.float16, self.head_params * n * ng, 0).reshape(self.head_params, n, ng)
        bits, params = [], []
        for i, buf in enumerate(planes):
            q = self.plane_params(i)
            params.append(torch.from_numpy(_array(buf, np.float16, q * n * ng, 0).reshape(q, n, ng)))
            bits.append(_array(buf, np.uint8, plane_nbytes(n * k), q * n * ng * PARAM_BYTES))
        return Encoded(shape, group, torch.from_numpy(h), tuple(torch.from_numpy(b) for b in bits), tuple(params))

    def roundtrip(self, w: torch.Tensor, group: int, bits: int) -> torch.Tensor:
        """w encoded and read back at `bits` bits (float32)."""
        return self.view(self.encode(w, group), bits).dequantize()

    @staticmethod
    def _check(enc: Encoded, bits: int) -> None:
        if not 1 <= bits <= min(PLANES, len(enc.planes)):
            raise ValueError(f"a {bits}-bit view needs {bits} planes; {len(enc.planes)} are loaded")


class MSB(Scheme, name="msb"):
    """8-bit min-max codes as bit-planes; head = (scale, minimum) per group."""

    head_params = 2

    def encode(self, w: torch.Tensor, group: int) -> Encoded:
        q = quantize(w, 8, group)
        n, ng = q.scale.shape
        empty = torch.empty(0, n, ng, dtype=PARAM_DTYPE)
        return Encoded(tuple(w.shape), group, torch.stack([q.scale, q.minimum]), pack_planes(q.codes),
                       (empty,) * PLANES)

    def view(self, enc: Encoded, bits: int, packed: bool = False) -> QuantView:
        self._check(enc, bits)
        rows = tuple(x.numpy() if isinstance(x, torch.Tensor) else x for x in enc.planes[:bits])
        codes = PackedCodes(rows, enc.shape) if packed else unpack_planes(rows, enc.shape)
        return msb_view(None, enc.head[0], enc.head[1], bits, enc.group, codes_r=codes)


class Residual(Scheme, name="residual"):
    """2-bit base (scale, minimum in the head) plus binary residual planes with a scale each."""

    head_params = 2
    BASE = 2

    def plane_params(self, i: int) -> int:
        return 0 if i < self.BASE else 1

    def encode(self, w: torch.Tensor, group: int) -> Encoded:
        w = w.float()
        scale, minimum, q0 = bucket_base(w, group, 1 << self.BASE)
        n, ng = scale.shape
        err = grouped(w, group) - (grouped(q0.float() + 0.5, group) * scale.float()[..., None]
                                   + minimum.float()[..., None])  # [N, K/G, G]: what the base misses
        code = q0 << (PLANES - self.BASE)
        params = [torch.empty(0, n, ng, dtype=PARAM_DTYPE)] * self.BASE
        for j in range(PLANES - self.BASE):
            sign = err >= 0
            s = err.abs().mean(dim=-1).to(PARAM_DTYPE)  # [N, K/G]: L2-optimal scale of a sign plane
            err -= s.float()[..., None] * (2 * sign.float() - 1)
            code |= sign.reshape(n, -1).to(torch.uint8) << (PLANES - self.BASE - 1 - j)
            params.append(s[None])
        return Encoded(tuple(w.shape), group, torch.stack([scale, minimum]), pack_planes(code), tuple(params))

    def view(self, enc: Encoded, bits: int, packed: bool = False) -> QuantView:
        self._check(enc, bits)
        q = unpack_planes(enc.planes[:bits], enc.shape)  # top `bits` bits of the nested code
        s0, m0 = enc.head[0].float(), enc.head[1].float()
        if bits < self.BASE:  # the base's top bit, at the middle of its (double) bucket
            return QuantView((AffineTerm(q, 1, 2 * s0, m0 + s0),), 1, enc.group)
        terms = [AffineTerm(q >> (bits - self.BASE), self.BASE, s0, m0 + 0.5 * s0)]
        for j in range(bits - self.BASE):
            s = enc.plane_params[self.BASE + j][0].float()
            terms.append(AffineTerm((q >> (bits - self.BASE - 1 - j)) & 1, 1, 2 * s, -s))
        return QuantView(tuple(terms), bits, enc.group)


def bucket_base(w: torch.Tensor, group: int, buckets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each group's [min, max] into equal buckets: (scale, minimum) as stored and bucket indices [N, K]."""
    g = grouped(w, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("weights contain NaN or infinity")
    minimum = lo.to(PARAM_DTYPE)
    scale = ((hi - minimum.float()) / buckets).to(PARAM_DTYPE)
    s = scale.float()[..., None]
    q = ((g - minimum.float()[..., None]) / torch.where(s > 0, s, torch.ones_like(s))).floor()
    return scale, minimum, q.clamp_(0, buckets - 1).to(torch.uint8).reshape(w.shape)


def scheme(name: str) -> Scheme:
    """The scheme registered under `name`."""
    try:
        return Scheme._registry[name]()
    except KeyError:
        raise ValueError(f"unknown quantisation scheme {name!r} (known: {', '.join(scheme_names())})") from None


def scheme_names() -> tuple[str, ...]:
    """Names of the registered schemes."""
    return tuple(Scheme._registry)


def _n_groups(shape: tuple[int, int], group: int) -> int:
    n, k = shape
    if k % group:
        raise ValueError(f"rows of length {k} do not split into groups of {group}")
    return n * (k // group)


def _array(buf, dtype, count: int, offset: int) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of a buffer, as a writable array (copied if needed)."""
    a = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return a if a.flags.writeable else a.copy()
