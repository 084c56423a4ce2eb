"""The torch backend: the int4 and int8 weight-only matmuls torch ships for the CPU, bfloat16 activations.

A term of b <= 4 bits runs `aten._weight_int4pack_mm_for_cpu` on q << (4 - b) with scale / 2^(4-b),
computing (q - c) * scale for the code centre c = (2^b - 1) / 2; a term of 5-8 bits runs
`aten._weight_int8pack_mm` (per-channel scales) once per group on q - 2^(b-1). Scales are bfloat16.
Each term's per-group offset (zero + centre * scale) is added in float32 as one small matmul of the
group sums of x: offsets in bfloat16, or uncentred codes, would cost far more accuracy than the
scales do. Results are summed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.kernels.base import Backend
from quant.views import AffineTerm, QuantView

INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
INNER_K_TILES = 2


@dataclass(frozen=True, slots=True)
class Int4Term:
    """A b <= 4-bit term as 4-bit codes q' = q << (4-b); the kernel computes (q' - 8) * scale' + zero'."""

    packed: torch.Tensor  # [N', K/2] uint8, N' = N rounded up to 16
    scales_zeros: torch.Tensor  # [K/G, N', 2] bfloat16


@dataclass(frozen=True, slots=True)
class Int8Term:
    """A 5-8 bit term as signed codes per group for the int8 kernel: w = (q - 2^(b-1)) * scale."""

    codes: tuple[torch.Tensor, ...]  # per group [N, G] int8
    scales: tuple[torch.Tensor, ...]  # per group [N] bfloat16


@dataclass(frozen=True, slots=True)
class TorchMatrix:
    """One matrix's terms, plus the summed per-group offsets of all terms ([K/G, N] float32)."""

    int4: tuple[Int4Term, ...]
    int8: tuple[Int8Term, ...]
    offset: torch.Tensor
    n: int
    group: int


class TorchCPU(Backend, name="torch"):
    """Weight-only int4 / int8 matmuls from torch's CPU kernels (bfloat16 in, float32 out)."""

    def prepare(self, view: QuantView) -> TorchMatrix:
        n, k = view.shape
        int4, int8 = [], []
        offset = torch.zeros(k // view.group, n)
        for t in view.terms:
            centre = ((1 << t.bits) - 1) / 2 if t.bits <= 4 else 1 << (t.bits - 1)
            offset += (t.zero + centre * t.scale.to(torch.bfloat16).float()).t()  # with the kernel's scales
            if t.bits <= 4:
                int4.append(_int4(t))
            else:
                int8.append(_int8(t, view.group, centre))
        return TorchMatrix(tuple(int4), tuple(int8), offset, n, view.group)

    def linear(self, x: torch.Tensor, form: TorchMatrix) -> torch.Tensor:
        x = x.float()
        xb = x.to(torch.bfloat16)
        g = form.group
        y = torch.zeros(x.shape[0], form.n, dtype=torch.float32)
        for t in form.int4:
            y += torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t.packed, g, t.scales_zeros)[:, :form.n]
        for t in form.int8:
            for i, (q, s) in enumerate(zip(t.codes, t.scales)):
                y += torch.ops.aten._weight_int8pack_mm(xb[:, i * g:(i + 1) * g], q, s)
        y += x.reshape(x.shape[0], -1, g).sum(dim=-1) @ form.offset  # [T, K/G] @ [K/G, N]
        return y


def _int4(t: AffineTerm) -> Int4Term:
    n = t.codes.shape[0]
    pad = -n % INT4_N_MULTIPLE
    spread = 4 - t.bits  # (q' - 8) * s / 2^spread + s / 2 == (q - centre) * s, every factor a power of two
    q = torch.nn.functional.pad(t.codes.to(torch.int32) << spread, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
    scale = torch.nn.functional.pad(t.scale, (0, 0, 0, pad)).to(torch.bfloat16)
    sz = torch.stack([scale.t() / (1 << spread), scale.t() / 2], dim=-1).contiguous()  # [K/G, N', 2]
    return Int4Term(packed, sz)


def _int8(t: AffineTerm, group: int, mid: int) -> Int8Term:
    k = t.codes.shape[1]
    signed = (t.codes.to(torch.int16) - mid).to(torch.int8)
    codes = tuple(signed[:, i * group:(i + 1) * group].contiguous() for i in range(k // group))
    scales = tuple(t.scale[:, i].to(torch.bfloat16).contiguous() for i in range(k // group))
    return Int8Term(codes, scales)
