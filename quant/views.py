"""What a kernel consumes: a matrix at some bit-width as a sum of per-group affine integer codes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.groups import expand


@dataclass(frozen=True, slots=True)
class AffineTerm:
    """w = scale * q + zero per group of `group` along K; q holds `bits` bits."""

    codes: torch.Tensor  # [N, K] uint8 in [0, 2**bits) (or PackedCodes, for a backend that reads planes)
    bits: int
    scale: torch.Tensor  # [N, K/G] float32
    zero: torch.Tensor  # [N, K/G] float32

    def dequantize(self, group: int) -> torch.Tensor:
        """This term's float32 [N, K] contribution."""
        return expand(self.scale, group) * self.codes.float() + expand(self.zero, group)


@dataclass(frozen=True, slots=True)
class QuantView:
    """One [N, K] matrix at `bits` bits: the sum of its terms (one for MSB views, several for residual)."""

    terms: tuple[AffineTerm, ...]
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        return tuple(self.terms[0].codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The reference float32 [N, K] matrix: terms dequantised and added in order."""
        w = self.terms[0].dequantize(self.group)
        for t in self.terms[1:]:
            w = w + t.dequantize(self.group)
        return w


@dataclass(frozen=True, slots=True)
class ExpertViews:
    """An expert's three matrices at one bit-width: gate/up [I, D], down [D, I]."""

    gate: QuantView
    up: QuantView
    down: QuantView

    @property
    def bits(self) -> int:
        """The bit-width of the views."""
        return self.gate.bits


def msb_view(codes8: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, group: int,
             codes_r: torch.Tensor | None = None) -> QuantView:
    """The r-bit view of 8-bit codes: q_r = q8 >> (8-r), dequantised to the middle of its bucket.

    w = scale * (q_r * 2^(8-r) + (2^(8-r) - 1) / 2) + minimum, i.e. an ordinary r-bit code with
    scale * 2^(8-r) and a shifted minimum. `codes_r` (already shifted, e.g. unpacked from the top
    r planes) may be given instead of `codes8`.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    drop = 8 - bits
    q = codes_r if codes_r is not None else codes8 >> drop
    s = scale.float()
    return QuantView((AffineTerm(q, bits, s * float(1 << drop), minimum.float() + s * (((1 << drop) - 1) / 2)),),
                     bits, group)
